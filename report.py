"""
Presentation of analyze.py's results: the code explorer, one offline HTML page (assets/explorer.html with the data
inlined: search, sort, filter and read every code; its only computations are each code's best token and logit
effect) and matplotlib plots (code frequencies, the state x code heatmap, codes against neurons, the paper's Fig. 6a),
written into the analysis directory by `python analyze.py`; the table of steer.py's FSM swap.
"""

import base64
import html
import json
import os

import torch

from plumbing.configuration import ConfigError
from plumbing.entry import require
from plumbing.files import atomic_write

EXPLORER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "explorer.html")
LOGIT_TOKENS = 6  # tokens listed per code on each side of its logit effect


def fsm_strs(fsm):
    """Token strings of an FSM row: digits, '|' for BOS, a space before the first digit of each state."""
    return lambda row: ["|" if x == fsm.EOT else (" " if t % fsm.digits == 1 % fsm.digits else "") + str(x)
                        for t, x in enumerate(row)]


def explorer_books(names, books):
    """The rows of model.books() that `names` selects: comma-separated books (`h.0.attn_heads:2`) or codebooks
    (`h.0.attn_heads`, every head); "" selects all. Raises ConfigError naming an unknown name and the choices."""
    if not names.strip():
        return list(books)
    want = [n.strip() for n in names.split(",") if n.strip()]
    for n in want:
        if not any(n in (book, site) for book, site, _, _ in books):
            raise ConfigError(f"--html_books: no book or codebook {n!r}; this model has "
                              f"{', '.join(dict.fromkeys(s for _, s, _, _ in books))} (a head: SITE:HEAD)")
    return [b for b in books if b[0] in want or b[1] in want]


def intern_rows(tokens, row_strs):
    """(strings, ids (n, T) int32): each position's display string, as an index into a table of distinct strings."""
    table = {}
    ids = [[table.setdefault(s, len(table)) for s in row_strs(row)] for row in tokens.tolist()]
    return list(table), torch.tensor(ids, dtype=torch.int32).view(tokens.shape)


def token_concepts(text, codes, num_codes, strs):
    """{code: [('token "s"', P, R)]}: per used code, the display string it detects best by F1 at all positions.

    text: (N,) string ids; codes: (N, k) code ids (-1 = none). P = #(code fires on s) / #(code fires),
    R = #(code fires on s) / #(s), as analyze.precision_recall, with the strings as labels."""
    ok = codes >= 0  # (N, k)
    S = len(strs)
    pair = (codes.long().clamp(min=0) * S + text.long().unsqueeze(1))[ok]
    keys, n = pair.unique(return_counts=True)
    code, s = keys // S, keys % S
    fired = torch.bincount(codes[ok].long(), minlength=num_codes)
    per_str = torch.bincount(text.long(), minlength=S)
    P, R = n / fired[code], n / per_str[s]
    f = 2 * P * R / (P + R)
    best = torch.full((num_codes,), -1.0, dtype=f.dtype).scatter_reduce(0, code, f, "amax")
    pick = (f == best[code]).nonzero().flatten()
    out = {}
    for c, i, p, r in zip(code[pick].tolist(), s[pick].tolist(), P[pick].tolist(), R[pick].tolist()):
        out.setdefault(c, [(f"token {json.dumps(strs[i])}", p, r)])  # one per code: the first of any ties
    return out


@torch.no_grad()
def logit_effects(model, site, g, cb, ids, n=LOGIT_TOKENS, chunk=256):
    """The direct logit effect of codes: each code's vector as written into the residual stream (a head's code through
    its slice of attn.c_proj; a group's code in its slice of n_embd), centred and scaled by ln_f's gain, then through
    the unembedding (lm_head). LayerNorm's division by the residual's norm is left out, so values compare codes'
    directions, not sizes (as sae_vis and Neuronpedia do for decoder rows). Biases are left out.

    ids: (m,) code ids of the book (site, g). Returns (top ids (m, n), top values, bottom ids, bottom values)."""
    layer, kind = int(site.split(".")[1]), site.split(".")[2]
    W, ln = model.lm_head.weight.float(), model.transformer.ln_f
    parts = []
    for c in ids.split(chunk):
        v = cb.codes[g, c].float()  # (m, d)
        if kind == "attn_heads":  # (C, d) columns of c_proj that read head g
            v = v @ model.transformer.h[layer].attn.c_proj.weight[:, g * v.shape[1]:(g + 1) * v.shape[1]].float().T
        elif cb.groups > 1:
            v = torch.nn.functional.pad(v, (g * v.shape[1], (cb.groups - g - 1) * v.shape[1]))  # (m, C)
        v = (v - v.mean(-1, keepdim=True)) * ln.weight.float()  # (m, C)
        logits = v @ W.T  # (m, V)
        top, bot = logits.topk(min(n, W.shape[0])), logits.topk(min(n, W.shape[0]), largest=False)
        parts.append((top.indices, top.values, bot.indices, bot.values))
    return tuple(torch.cat(p) for p in zip(*parts))


def b64(t):
    """{"dtype", "b64"}: a tensor as little-endian bytes for the page (int16, int32 or float32)."""
    t = t.contiguous().flatten()
    return {"dtype": str(t.dtype).replace("torch.", ""), "b64": base64.b64encode(t.numpy().tobytes()).decode()}


def explorer_data(col, row_strs, stats, concepts, model, n_codes, books):
    """The page's data except its token positions: strings, per book its counts and statistics, concepts (those of
    analyze.py and each code's best token), and the logit effects of the n_codes most frequent codes per book."""
    strs, text = intern_rows(col["tokens"], row_strs)  # (n, T) ids into strs
    table = {s: i for i, s in enumerate(strs)}
    vocab = lambda t: table.setdefault(row_strs([t])[0], len(table))  # noqa: E731  a token id's string
    out, merged = {"books": []}, {}
    for book, site, g, cb in books:
        codes = col["codes"][site][:, :, g]  # (n, T, k)
        st, entry = stats[book], {}
        found = token_concepts(text.flatten(), codes.reshape(-1, cb.k), cb.num_codes, strs)
        for c in set(found) | set((concepts or {}).get(book, {})):
            merged.setdefault(book, {})[str(c)] = [[n, round(p, 4), round(r, 4)] for n, p, r in
                                                   (concepts or {}).get(book, {}).get(c, []) + found.get(c, [])]
        used = st["counts"].argsort(descending=True)[:n_codes]
        used = used[st["counts"][used] > 0]
        if model is not None and len(used):
            ti, tv, bi, bv = logit_effects(model, site, g, cb, used)
            entry["logits"] = {str(c): [[vocab(t) for t in ti[j].tolist()], [round(x, 3) for x in tv[j].tolist()],
                                        [vocab(t) for t in bi[j].tolist()], [round(x, 3) for x in bv[j].tolist()]]
                               for j, c in enumerate(used.tolist())}
        entry.update(name=book, site=site, layer=int(site.split(".")[1]), group=g, M=cb.num_codes, k=cb.k,
                     counts=b64(st["counts"].to(torch.int32)), dead_pct=st["dead_pct"], entropy=st["entropy_bits"],
                     effective=st["effective"], logit_codes=len(used) if model is not None else 0)
        out["books"].append(entry)
    out.update(strs=list(table), concepts=merged)
    return out, text


def write_browser(path, col, row_strs, stats, concepts=None, n_codes=1000, n_ctx=5, title="codes", model=None,
                  html_mb=8.0, books="", out_dir="out", caps=None):
    """The code explorer: one self-contained HTML page (assets/explorer.html with the data inlined; no network) to
    find, sort, filter and read every code of the chosen books. Returns its size in bytes.

    col: analyze.py's collection (tokens (n, T), codes {site: (n, T, G, k)}, books); row_strs: a row's token ids ->
    display strings; stats: {book: analyze.code_stats}; concepts: {book: {code: [(name, P, R)]}} or None;
    n_codes: codes per book with logit effects (the most frequent; needs `model`); n_ctx: contexts shown per code;
    html_mb: the page's size cap, met by embedding only as many whole rows of token positions as fit (counts,
    concepts and logit effects come from every row); books: explorer_books' selection; out_dir: the run, for the
    steer.py commands; caps: an AnalyzeConfig whose html_codes, contexts, html_mb, html_books and out_dir replace
    those five. Raises ConfigError for unknown books."""
    if caps is not None:
        n_codes, n_ctx, html_mb, books, out_dir = caps.html_codes, caps.contexts, caps.html_mb, caps.html_books, caps.out_dir
    chosen = explorer_books(books, col["books"])
    data, text = explorer_data(col, row_strs, stats, concepts, model, n_codes, chosen)
    n, T = col["tokens"].shape
    fixed = len(json.dumps(data)) + 200_000  # + the template, generously
    per_row = T * (4 + sum(cb.k * (2 if cb.num_codes <= 32767 else 4) for _, _, _, cb in chosen)) * 4 / 3
    rows = max(1, min(n, int((html_mb * 2**20 - fixed) // per_row)))
    small = len(data["strs"]) <= 32767
    data.update(text=b64(text[:rows].to(torch.int16 if small else torch.int32)), rows=rows, n=n, T=T, title=title,
                n_ctx=n_ctx, n_codes=n_codes, html_mb=html_mb, out_dir=out_dir, books_total=len(col["books"]))
    for entry, (_, site, g, _) in zip(data["books"], chosen):
        entry["codes"] = b64(col["codes"][site][:rows, :, g])  # (rows, T, k) int16 or int32
    with open(EXPLORER, encoding="utf-8") as f:
        head, tail = f.read().replace("__TITLE__", html.escape(title)).split("__DATA__")
    body = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # nothing in it can close the script
    size = len((head + body + tail.replace("__BYTES__", "0" * 12)).encode())
    with atomic_write(path) as f:
        f.write(head + body + tail.replace("__BYTES__", f"{size:12d}"))
    over = size > html_mb * 2**20  # the list of codes, concepts and logit effects alone are over the cap
    print(f"{os.path.basename(path)}: {size / 2**20:.1f} MiB, {len(chosen)} of {len(col['books'])} books, token "
          f"positions of {rows} of {n} rows (--html_mb={html_mb:g}" + ("; over it even so: lower --html_codes or "
                                                                      "choose fewer --html_books)" if over else ")"))
    return size


def pyplot():
    matplotlib = require("matplotlib", "the plots of analyze.py and sae.py")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)


def plot_frequencies(path, stats, col):
    """Per site, a histogram of how often each used code was chosen (log scale), with the dead %."""
    plt = pyplot()
    sites = list(col["codes"])
    fig, axes = plt.subplots(1, len(sites), figsize=(4 * len(sites), 3), squeeze=False)
    for ax, site in zip(axes[0], sites):
        counts = torch.stack([stats[b]["counts"] for b, s, _, _ in col["books"] if s == site])  # (G, M)
        used = counts[counts > 0].double()
        ax.hist(used.log10().numpy(), bins=30)
        ax.set_title(f"{site}\n{100 * (counts == 0).float().mean():.0f}% dead", fontsize=9)
        ax.set_xlabel("log10(count) of used codes")
    axes[0][0].set_ylabel("codes")
    save(fig, path)


def plot_heatmap(path, counts, book):
    """State x code: P(state | code) for the codes of one book, columns ordered by their best state."""
    plt = pyplot()
    used = (counts.sum(0) > 0).nonzero().flatten()
    P = (counts[:, used] / counts[:, used].sum(0, keepdim=True)).numpy()
    order = sorted(range(len(used)), key=lambda j: (P[:, j].argmax(), -P[:, j].max()))
    fig, ax = plt.subplots(figsize=(8, 5))
    im = ax.imshow(P[:, order], aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel(f"code of {book} (the {len(used)} used, ordered by their most likely state)")
    ax.set_ylabel("state (read at its last digit)")
    fig.colorbar(im, label="P(state | code)")
    save(fig, path)


def plot_neurons(path, code_p, neuron_p):
    """Per state, the precision of its code and of the best neuron at the same recall (paper Fig. 6a)."""
    fig, ax = pyplot().subplots(figsize=(5, 4))
    order = torch.tensor(code_p).argsort(descending=True)
    ax.plot(100 * torch.tensor(code_p)[order], "o", ms=3, label=f"state code (mean {100 * sum(code_p) / len(code_p):.1f}%)")
    ax.plot(100 * torch.tensor(neuron_p)[order], "x", ms=3, label=f"best neuron (mean {100 * sum(neuron_p) / len(neuron_p):.1f}%)")
    ax.set_xlabel("state (sorted by code precision)")
    ax.set_ylabel("precision % at the code's recall")
    ax.legend()
    save(fig, path)


def fsm_summary(out, summary, tables):
    """Write analyze.fsm_analysis's results (fsm.json, fsm_tables.pt, neurons.png, heatmap.png) to `out` and print
    its tables: per book, the concepts owning a code at every state and at the first state."""
    torch.save({c: {b: t.to(torch.int32).to_sparse() for b, t in tb.items()} for c, tb in tables.items()},
               os.path.join(out, "fsm_tables.pt"))  # sparse (L, M) counts: .to_dense() to read
    with open(os.path.join(out, "fsm.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nconcepts owning a code with P >= 0.9 and R >= 0.9 (of those seen), read at every state | at the "
          f"first state:\n  {'book':22s} {'states':>9s} {'state+digit':>12s} {'mean P of best':>15s} | "
          f"{'states':>9s} {'state+digit':>12s}")
    for b, e in summary["books"].items():
        st, sd = e["state"], e["state_digit"]
        print(f"  {b:22s} {st['owned']:4d}/{st['of']:<4d} {sd['owned']:6d}/{sd['of']:<5d} "
              f"{100 * st['mean_precision']:14.1f}% | {st['owned_first']:4d}/{st['of_first']:<4d} "
              f"{sd['owned_first']:6d}/{sd['of_first']:<5d}")
    if "mlp" not in summary:
        return
    m = summary["mlp"]
    print(f"\nstates owning an MLP code: {m['states_owning_code']} of {m['of']} read at every state, "
          f"{m['states_owning_code_first']} of {m['of_first']} at the first state (the authors' protocol)")
    print(f"state codes (best F1 over MLP books, every state): mean precision {100 * m['mean_precision']:.1f}%, "
          f"mean recall {100 * m['mean_recall']:.1f}%")
    for b, e in summary["books"].items():
        if "mlp" in b:
            pos = e["state"]["owned_at_one_position"]
            print(f"  {b}: states owning a code when read at one fixed position: {min(pos)}-{max(pos)}; "
                  f"covered by a union of codes with P >= 0.9: {e['state']['owned_by_pure_codes']}")
    if "neurons" in summary:
        print(f"best single MLP neuron at the code's recall: mean precision "
              f"{100 * summary['neurons']['mean_precision']:.1f}%")
        plot_neurons(os.path.join(out, "neurons.png"), [s["precision"] for s in m["per_state"]],
                     summary["neurons"]["per_state"])
    top = max((b for b in summary["books"] if "mlp" in b), key=lambda b: summary["books"][b]["state"]["owned"])
    plot_heatmap(os.path.join(out, "heatmap.png"), tables["state"][top], top)



def code_summary(out, stats, dictionary):
    """stats.json ({"books": per-book frequency statistics, "codebooks": evaluate.dictionary_metrics}) in `out`,
    and both printed."""
    with open(os.path.join(out, "stats.json"), "w") as f:
        books = {b: {k: v for k, v in st.items() if k != "counts"} for b, st in stats.items()}
        json.dump({"books": books, "codebooks": dictionary}, f, indent=1)
    for b, st in stats.items():
        print(f"  {b:22s} used {int((st['counts'] > 0).sum()):5d}  dead {st['dead_pct']:5.1f}%  "
              f"entropy {st['entropy_bits']:5.2f} bits ({st['effective']:.0f} effective codes)")
    print(f"\n  {'codebook':16s} {'L0':>3s} {'FVU':>6s} {'dead':>6s} {'loss':>7s} {'bypassed':>9s} {'zeroed':>7s} "
          f"{'recovered':>9s}")
    for name, d in dictionary.items():
        print(f"  {name:16s} {d['L0'] or '':>3} {d['fvu']:6.3f} {d['dead_pct']:5.1f}% {d['loss']:7.4f} "
              f"{d['loss_bypass']:9.4f} {d['loss_zero']:7.4f} {d['recovered']:9.3f}")


def print_swap(res, pairs, patch):
    """Print steer.fsm_swap's results {site group: {success, stay, jsd, jsd_token, first_digit}} as a table."""
    print(f"FSM swap over {pairs} pairs (A, B) with disjoint successors, patching the {patch} position(s); "
          "JSD normalised, over next states and next tokens")
    print(f"  {'patched sites':14s} {'success':>8s} {'to A':>7s} {'JSD state':>10s} {'JSD token':>10s} {'1st digit':>10s}")
    for name, r in res.items():
        label = {"none": "none (A)", "B": "B itself", "code": "B's own code"}.get(name, name)
        print(f"  {label:14s} {100 * r['success']:7.1f}% {100 * r['stay']:6.1f}% {r['jsd']:10.3f} "
              f"{r['jsd_token']:10.3f} {100 * r['first_digit']:9.1f}%")
