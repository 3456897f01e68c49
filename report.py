"""
Presentation of analyze.py's results: an offline HTML code browser (each code's frequency, best concepts and the
contexts where it fires) and matplotlib plots (code frequencies, the state x code heatmap, codes against neurons,
the paper's Fig. 6a), written into the analysis directory by `python analyze.py`; the table of steer.py's FSM swap.
Nothing here computes a result.
"""

import html
import json
import os

import torch

from plumbing.entry import require

def occurrences(codes, code, n, seed=0):
    """Up to n (row, position) where `code` fires in codes (rows, T, k): best-ranked slot first, then random."""
    hits = (codes == code).nonzero()  # (m, 3): row, position, slot
    if len(hits) == 0:
        return []
    order = torch.randperm(len(hits), generator=torch.Generator().manual_seed(seed))
    hits = hits[order][hits[order][:, 2].argsort(stable=True)]
    return [(int(r), int(t)) for r, t, _ in hits[:n]]


def context_html(strs, t, before=12, after=3):
    """A context window of token strings with token t marked."""
    lo, hi = max(0, t - before), min(len(strs), t + after + 1)
    esc = [html.escape(s).replace("\n", "&#8629;") for s in strs[lo:hi]]  # newlines as arrows: one line each
    lead = esc[t - lo][: len(esc[t - lo]) - len(esc[t - lo].lstrip())]  # leading spaces stay outside the mark
    esc[t - lo] = f"{lead}<mark>{esc[t - lo].lstrip()}</mark>"
    return ("&hellip;" if lo > 0 else "") + "".join(esc)


def fsm_strs(fsm):
    """Token strings of an FSM row: digits, '|' for BOS, a space before the first digit of each state."""
    return lambda row: ["|" if x == fsm.EOT else (" " if t % fsm.digits == 1 % fsm.digits else "") + str(x)
                        for t, x in enumerate(row)]


def write_browser(path, col, row_strs, stats, concepts=None, n_codes=100, n_ctx=3, title="codes"):
    """A static, self-contained HTML code browser: per book, the most frequent codes with their frequency,
    top contexts (the firing token marked) and best concepts.

    concepts: {book: [(code -> list of (name, precision, recall))]} as a dict of dicts, or None."""
    css = ("body{font:13px sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:2px 6px;vertical-align:top}mark{background:#fd4;font-weight:bold}.ctx{font-family:monospace;"
           "white-space:pre}summary{font-weight:bold;cursor:pointer;margin-top:.5em}")
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{css}</style>"
           f"</head><body><h1>{html.escape(title)}</h1><p>"
           + " &middot; ".join(f"<a href='#{html.escape(b)}'>{html.escape(b)}</a>" for b, _, _, _ in col["books"])
           + "</p><p>Each code: how often it was chosen, the concepts it detects best (precision / recall), and contexts "
           "where it fired (the token marked).</p>"]
    strs_cache = {}
    for book, site, g, cb in col["books"]:
        codes = col["codes"][site][:, :, g]  # (n, T, k)
        st = stats[book]
        counts, total = st["counts"], max(1, int(st["counts"].sum()))
        out.append(f"<details open id='{html.escape(book)}'><summary>{html.escape(book)}: {int((counts > 0).sum())} of {cb.num_codes} codes "
                   f"used ({st['dead_pct']:.1f}% dead), usage entropy {st['entropy_bits']:.2f} bits</summary>"
                   "<table><tr><th>code</th><th>count</th><th>freq</th><th>best concepts (P / R)</th><th>contexts</th></tr>")
        for c in counts.argsort(descending=True)[:n_codes].tolist():
            if counts[c] == 0:
                break
            ctxs = []
            for r, t in occurrences(codes, c, n_ctx):
                if r not in strs_cache:
                    strs_cache[r] = row_strs(col["tokens"][r].tolist())
                ctxs.append(f"<div class=ctx>{context_html(strs_cache[r], t)}</div>")
            con = "<br>".join(f"{html.escape(n)} ({p:.2f} / {rc:.2f})" for n, p, rc in (concepts or {}).get(book, {}).get(c, []))
            out.append(f"<tr id='{html.escape(book)}-{c}'><td>{c}</td><td>{int(counts[c])}</td>"
                       f"<td>{100 * counts[c] / total:.2f}%</td><td>{con}</td><td>{''.join(ctxs)}</td></tr>")
        out.append("</table></details>")
    out.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))



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
