"""
Read what the codes mean (Codebook Features, Sections 4.2 and 5.2): collect the codes a trained model
chooses, count them, match them to concepts (FSM states, regexes over text), compare them with single
neurons, and write plots and a static HTML code browser.

    python analyze.py --out_dir=out                              # a TokFSM run: everything below, in out/analysis
    python analyze.py --out_dir=/tmp/exp/table/k1 --save_dir=out/analysis-k1
    python analyze.py --out_dir=out --codes=out/analysis/codes.pt     # reuse collected codes (no model run for them)
    python analyze.py --out_dir=out-tinystories --regex=" dragon"     # an LM run: concept search for a regex
    python analyze.py --out_dir=out-tinystories --max_tokens=100000   # topic codes -> save_dir/topic_codes.json

Outputs in save_dir: codes.pt (token ids and chosen code ids, int16/int32, reloadable with torch.load),
stats.json, freq.png, browser.html; for TokFSM also fsm.json, fsm_tables.pt, heatmap.png, neurons.png; for
an LM also topic_codes.json (read by `steer.py --task=topics`) and concepts.json.

A codebook "book" is one (site, group): per-head attention codebooks have one book per head, named
`h.0.attn.codebook:2` (head 2); single-group sites are named by the site alone, e.g. `h.1.mlp_cb`.

TokFSM concepts (D digits per state; position t >= 1 of a sequence holds digit (t-1) % D of state (t-1) // D):
- "state S": read at the LAST digit of each state (t - 1 = D*i + D - 1); the label is state i, the state the
  model has just finished reading and whose successors it must predict next.
- "state S + next digit d": read at the FIRST digit of the next state (t - 1 = D*(i + 1)); the label is
  (state i, that digit d) = S * 10 + d, the pair that decides the rest of the next state.
For each concept and book, precision P = #(code fires and label) / #(code fires) and recall
R = #(code fires and label) / #(label), over the readout positions. A concept "owns" a code with P >= 0.9 and
R >= 0.9. Two readouts are reported:
- every state of every sequence (all positions): the strict one, a code must name the state wherever it occurs;
- the first state only (BOS + the state's digits, position D; "state + digit" at D + 1): the authors'
  protocol, which partitions the inputs "BOS + 2 digits" (and "+ 3 digits") by the code they get.
A state's code is its best code by F1 over the MLP books; the neuron baseline (paper Fig. 6a) is,
for that state, the single MLP neuron (post-GELU activation of mlp.c_fc, any layer) with the highest
precision when thresholded so that its recall matches the code's.
"""

import functools
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fsm import TokFSM
from train import ConfigError, load_checkpoint, load_tokens, model_from_checkpoint, parse_args, token_windows

TOPICS = {"dragon": "dragon", "slide": "slide", "friend": "friend", "flower": "flower", "fire": "fire",
          "baby": "baby", "princess": "prince|crown|king|castle"}  # the paper's topics (Table 3), case-insensitive


@dataclass
class AnalyzeConfig:
    """Analysis. Defaults: the TokFSM run in out/, results in out/analysis."""

    out_dir: str = "out"  # the run whose ckpt.pt is analysed
    save_dir: str = "out/analysis"  # where results go
    codes: str = ""  # a codes.pt from an earlier run: reuse it instead of running the model to collect codes
    num_seqs: int = 4096  # TokFSM: sequences of the fixed eval set (seed 1234) to read codes on
    dataset: Optional[str] = None  # LM: a data/prepare.py directory; None = the checkpoint's
    max_tokens: int = 200_000  # LM: tokens of consecutive val windows to read codes on
    batch_size: int = 256  # sequences per forward (LM: fewer, so that the logits stay within 256 MiB)
    regex: str = ""  # LM: rank codes as detectors of the tokens this regex matches
    topics: str = ",".join(TOPICS)  # LM: topics to find codes for (names from TOPICS or NAME=REGEX)
    window: int = 16  # LM: a code's context is this many tokens either side of it
    top: int = 5  # codes listed per concept
    html_codes: int = 100  # codes per book in the browser (the most frequent)
    contexts: int = 3  # contexts shown per code
    device: str = "auto"


# ---------------------------------------------------------------------------------------------- collecting
def books(model):
    """[(book name, site name, group, CodebookLayer)] for every codebook group of the model."""
    out = []
    for site, cb in model.codebooks():
        for g in range(cb.groups):
            out.append((site if cb.groups == 1 else f"{site}:{g}", site, g, cb))
    return out


@torch.no_grad()
def collect_codes(model, batches, device="cpu"):
    """Run token batches (B, T) through the model and record, per codebook site, the code ids it chose.

    Args:
        batches: an iterable of (B, T) long token tensors (streamed: only one batch is on the device).
    Returns:
        {"tokens": (n, T) int32, "codes": {site: (n, T, G, k) int16 (int32 for > 32767 codes)}}; -1 marks a
        code removed by a hook. The codes are `last_indices` of each layer, so hooks are reflected.
    """
    model.eval()
    tokens, codes = [], {site: [] for site, _ in model.codebooks()}
    for x in batches:
        model(x.to(device))
        tokens.append(x.to(torch.int32).cpu())
        for site, cb in model.codebooks():
            dtype = torch.int16 if cb.num_codes <= 32767 else torch.int32
            codes[site].append(cb.last_indices.to(dtype).cpu())  # (B, T, G, k), compact as soon as it is read
    return {"tokens": torch.cat(tokens), "codes": {s: torch.cat(c) for s, c in codes.items()}}


def lm_batches(val, block_size, max_tokens, batch_size):
    """Consecutive, non-overlapping val windows, up to max_tokens tokens, as a generator of batches."""
    n = min((len(val) - 1) // block_size, max(1, max_tokens // block_size))
    ix = torch.arange(n) * block_size
    for s in range(0, n, batch_size):
        yield token_windows(val, ix[s : s + batch_size], block_size)[0]


# ---------------------------------------------------------------------------------------------- statistics
def code_stats(codes, num_codes):
    """Frequency, dead % and usage entropy of one book. codes: (..., k) ids (-1 ignored).

    Returns dict(counts (M,) long, dead_pct, entropy_bits, effective = 2**entropy: codes in equal use)."""
    c = codes.reshape(-1).long()
    counts = torch.bincount(c[c >= 0], minlength=num_codes)
    p = counts.double() / counts.sum().clamp(min=1)
    h = -(p[p > 0] * p[p > 0].log2()).sum().item()
    return {"counts": counts, "dead_pct": 100 * (counts == 0).float().mean().item(), "entropy_bits": h,
            "effective": 2**h}


def precision_recall(codes, labels, num_labels, num_codes):
    """Codes as detectors of labels, at N positions.

    Args:
        codes: (N, k) code ids chosen at each position (-1 = none); labels: (N,) in [0, num_labels).
    Returns:
        counts (L, M): positions with label l where code c fired; precision (L, M) = counts / positions where
        c fired; recall (L, M) = counts / positions with label l. Undefined ratios are 0.
    """
    codes, labels = codes.long(), labels.long()
    ok = codes >= 0  # (N, k)
    flat = (labels.unsqueeze(1) * num_codes + codes.clamp(min=0))[ok]
    counts = torch.bincount(flat, minlength=num_labels * num_codes).view(num_labels, num_codes)
    fired = counts.sum(0, keepdim=True)  # (1, M): a code fires at most once per position
    per_label = torch.bincount(labels, minlength=num_labels).unsqueeze(1)  # (L, 1)
    return counts, counts / fired.clamp(min=1), counts / per_label.clamp(min=1)


def owners(P, R, labels):
    """(L,) bools: the labels that own a code (P >= 0.9 and R >= 0.9), and the labels present in `labels` (N,)."""
    seen = torch.bincount(labels, minlength=P.size(0)) > 0
    return ((P >= 0.9) & (R >= 0.9)).any(1) & seen, seen


def f1(p, r):
    return torch.where(p + r > 0, 2 * p * r / (p + r), torch.zeros_like(p))


def by_f1(found, n):
    """The n best of [(name, precision, recall, ...)] by F1."""
    return sorted(found, key=lambda x: -(2 * x[1] * x[2] / (x[1] + x[2]) if x[1] + x[2] else 0))[:n]


def best_codes(precision, recall):
    """For each label, the code with the best F1: (code (L,), precision (L,), recall (L,))."""
    c = f1(precision, recall).argmax(1)
    rows = torch.arange(len(c))
    return c, precision[rows, c], recall[rows, c]


# ---------------------------------------------------------------------------------------------- TokFSM
def fsm_readouts(tokens, fsm):
    """Readout positions and labels of the two FSM concepts (see the module docstring).

    Returns {"state": (rows, cols, labels), "state_digit": (rows, cols, labels)} over (n, T) tokens."""
    n, T = tokens.shape
    D = fsm.digits
    states = fsm.tokens_to_states(tokens[:, 1:].long())  # (n, L): state i ends at position D*i + D
    out = {}
    last = torch.arange(states.shape[1]) * D + D  # (L,) positions of the last digits
    r, i = torch.meshgrid(torch.arange(n), torch.arange(len(last)), indexing="ij")
    out["state"] = (r.flatten(), last[i].flatten(), states.flatten())
    first = last + 1  # the first digit of state i + 1, for the states i that have one inside the window
    first = first[first < T]
    r, i = torch.meshgrid(torch.arange(n), torch.arange(len(first)), indexing="ij")
    labels = states[:, : len(first)] * 10 + tokens[:, first].long()  # (n, L') state * 10 + next first digit
    out["state_digit"] = (r.flatten(), first[i].flatten(), labels.flatten())
    return out


@torch.no_grad()
def mlp_neurons(model, tokens, rows, cols, batch_size=256, device="cpu"):
    """Post-GELU MLP activations (mlp.c_fc then GELU, every layer) at the positions (rows, cols): (N, n_layer * H).
    Read with forward hooks on each block's mlp.gelu module."""
    acts, hooks, out = [], [], []
    for block in model.transformer.h:
        hooks.append(block.mlp.gelu.register_forward_hook(lambda m, i, o: acts.append(o.detach())))
    try:
        for s in range(0, len(tokens), batch_size):
            acts.clear()
            model(tokens[s : s + batch_size].long().to(device))
            sel = (rows >= s) & (rows < s + batch_size)
            out.append(torch.cat([a[rows[sel] - s, cols[sel]] for a in acts], -1).float().cpu())  # (n, L * H)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(out)


def neuron_baseline(acts, labels, recall):
    """For each label l, the best single neuron as a detector, thresholded to match `recall[l]`.

    Args:
        acts: (N, H) activations at the readout positions; labels: (N,); recall: (L,) target recalls.
    Returns:
        (precision (L,), neuron (L,), threshold (L,)): the neuron with the highest precision among all H, where
        each neuron fires when its activation >= the largest threshold that keeps recall >= recall[l].
    """
    N, H = acts.shape
    ranked = acts.t().contiguous().sort(-1).values  # (H, N) ascending: counts above a threshold by bisection
    prec, best, thr = torch.zeros(len(recall)), torch.zeros(len(recall), dtype=torch.long), torch.zeros(len(recall))
    for l, r in enumerate(recall.tolist()):
        pos = acts[labels == l]  # (n_l, H)
        if len(pos) == 0 or r <= 0:
            continue
        m = max(1, math.ceil(r * len(pos) - 1e-9))  # positives that must fire
        t = pos.sort(0, descending=True).values[m - 1]  # (H,) per-neuron threshold
        tp = (pos >= t).sum(0)  # (H,)
        fired = N - torch.searchsorted(ranked, t.unsqueeze(1)).squeeze(1)  # (H,) activations >= t
        p = tp / fired.clamp(min=1)
        best[l] = p.argmax()
        prec[l], thr[l] = p[best[l]], t[best[l]]
    return prec, best, thr


def fsm_analysis(col, fsm, model=None, device="cpu", batch_size=256):
    """State and state+digit codes of every book; the neuron baseline when `model` is given.

    Returns (summary dict, tables {concept: {book: counts (L, M)}}, concepts {book: {code: [(name, P, R)]}})."""
    tokens = col["tokens"]
    reads = fsm_readouts(tokens, fsm)
    S = fsm.num_states
    summary, tables, concepts = {"books": {}}, {"state": {}, "state_digit": {}}, {}
    names = {"state": [f"state {s}" for s in range(S)], "state_digit": [f"state {s // 10} + {s % 10}" for s in range(S * 10)]}
    mlp = {}  # book -> (precision, recall) of the "state" concept, for the MLP books
    for book, site, g, cb in col["books"]:
        entry = {}
        for concept, (rows, cols, labels) in reads.items():
            L = S if concept == "state" else S * 10
            codes = col["codes"][site][rows, cols, g]  # (N, k)
            counts, P, R = precision_recall(codes, labels, L, cb.num_codes)
            owned, seen = owners(P, R, labels)
            at = cols == cols.min()  # the first state (the authors' protocol)
            owned1, seen1 = owners(*precision_recall(codes[at], labels[at], L, cb.num_codes)[1:], labels[at])
            entry[concept] = {"owned": int(owned.sum()), "of": int(seen.sum()), "owned_first": int(owned1.sum()),
                              "of_first": int(seen1.sum()), "owned_first_states": owned1.nonzero().flatten().tolist()}
            tables[concept][book] = counts
            for c, found in top_concepts(counts, P, R, names[concept]).items():
                concepts.setdefault(book, {}).setdefault(c, []).extend(found)
            if concept == "state":  # diagnostics: duplicated state codes (at different positions)
                entry["state"]["owned_by_pure_codes"] = int(((R * (P >= 0.9)).sum(1) >= 0.9).sum())
                entry["state"]["owned_at_one_position"] = [
                    int(owners(*precision_recall(codes[cols == t], labels[cols == t], L, cb.num_codes)[1:],
                               labels[cols == t])[0].sum()) for t in cols.unique()]
                _, bp, br = best_codes(P, R)
                entry["state"].update(mean_precision=bp.mean().item(), mean_recall=br.mean().item(),
                                      owned_states=owned.nonzero().flatten().tolist())
                if "mlp" in site:
                    mlp[book] = (P, R)
        summary["books"][book] = entry
        concepts[book] = {c: by_f1(found, 2) for c, found in concepts.get(book, {}).items()}
    if mlp:  # a state's code: the best by F1 among the codes of all MLP books
        code, P, R = best_codes(torch.cat([p for p, _ in mlp.values()], 1), torch.cat([r for _, r in mlp.values()], 1))
        M = cb.num_codes  # every site has GPTConfig.num_codes codes
        book = [list(mlp)[c // M] for c in code.tolist()]
        owned = set().union(*[summary["books"][b]["state"]["owned_states"] for b in mlp])
        owned1 = set().union(*[summary["books"][b]["state"]["owned_first_states"] for b in mlp])
        seen = (torch.bincount(reads["state"][2], minlength=S) > 0).nonzero().flatten()  # states in the data
        summary["mlp"] = {"states_owning_code": len(owned), "of": len(seen), "states_owning_code_first": len(owned1),
                          "of_first": summary["books"][list(mlp)[0]]["state"]["of_first"],
                          "mean_precision": P[seen].mean().item(),
                          "mean_recall": R[seen].mean().item(),
                          "per_state": [{"state": s, "book": book[s], "code": int(code[s]) % M,
                                         "precision": float(P[s]), "recall": float(R[s])} for s in seen.tolist()]}
        if model is not None:
            rows, cols, labels = reads["state"]
            acts = mlp_neurons(model, tokens, rows, cols, batch_size, device)
            nprec, neuron, _ = neuron_baseline(acts, labels, R)
            summary["neurons"] = {"mean_precision": nprec[seen].mean().item(), "per_state": nprec[seen].tolist(),
                                  "neuron": neuron[seen].tolist(), "per_layer": acts.shape[1] // len(model.transformer.h)}
    return summary, tables, concepts


# ---------------------------------------------------------------------------------------------- language
def vocab_strings(decode):
    """A cached token -> text function for a decode(list[int]) -> str callable (or a Codec)."""
    decode = getattr(decode, "decode", decode)
    return functools.lru_cache(maxsize=None)(lambda t: decode([t]))


def regex_mask(tokens, tok, regex):
    """(n, T) bool: tokens that overlap a match of `regex` (case-insensitive) in their row's decoded text."""
    pattern = re.compile(regex, re.I)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, row in enumerate(tokens.tolist()):
        strs = [tok(t) for t in row]
        ends = torch.tensor([len(s) for s in strs]).cumsum(0)  # (T,) end offset of each token
        starts = ends - torch.tensor([len(s) for s in strs])
        for m in pattern.finditer("".join(strs)):
            mask[i] |= (starts < max(m.end(), m.start() + 1)) & (ends > m.start())
    return mask


def concept_search(col, target, top=5):
    """Rank every code of every book as a detector of the positions marked in target (n, T) bool.

    Returns [(book, code, precision, recall, count)] best first by F1."""
    found = []
    for book, site, g, cb in col["books"]:
        codes = col["codes"][site][:, :, g].reshape(-1, cb.k)  # (N, k)
        counts, P, R = precision_recall(codes, target.reshape(-1).long(), 2, cb.num_codes)
        score = f1(P[1], R[1])
        for c in score.topk(min(top, cb.num_codes)).indices.tolist():
            found.append((book, c, P[1, c].item(), R[1, c].item(), int(counts[:, c].sum())))
    return sorted(found, key=lambda x: -f1(torch.tensor(x[2]), torch.tensor(x[3])).item())[:top]


def dense_codes(codes, num_codes, frac=0.5):
    """Codes that fire on more than `frac` of the tokens of each text. codes: (n, T, k) -> (n, M) bool."""
    n, T, k = codes.shape
    c = codes.long().reshape(n, -1)
    counts = torch.zeros(n, num_codes + 1, dtype=torch.long).scatter_add_(1, c.clamp(min=-1) + 1, torch.ones_like(c))
    return counts[:, 1:] > frac * T


def topic_codes(col, tok, regex, window=16, top=5, min_count=10):
    """Codes for a topic, two ways (Section 5.3):
    - "context": codes whose contexts (`window` tokens either side) contain a match of `regex`, ranked by the
      fraction of their firings that do (precision), among codes firing >= min_count times;
    - "dense": codes that fire on more than half the tokens of a text (a row), ranked by the fraction of the
      texts they are dense in that match the regex.
    Returns {"context": [(book, code, precision, count)], "dense": [(book, code, precision, texts)]}."""
    hit = regex_mask(col["tokens"], tok, regex)  # (n, T)
    near = F.max_pool1d(hit.float().unsqueeze(1), 2 * window + 1, stride=1, padding=window).squeeze(1) > 0
    topical = hit.any(1)  # (n,) texts that match
    ctx, dense = [], []
    for book, site, g, cb in col["books"]:
        codes = col["codes"][site][:, :, g]  # (n, T, k)
        counts, P, _ = precision_recall(codes.reshape(-1, cb.k), near.reshape(-1).long(), 2, cb.num_codes)
        fired = counts.sum(0)
        for c in (P[1] * (fired >= min_count)).topk(min(top, cb.num_codes)).indices.tolist():
            if fired[c] >= min_count:
                ctx.append((book, c, P[1, c].item(), int(fired[c])))
        d = dense_codes(codes, cb.num_codes)  # (n, M)
        texts = d.sum(0)
        prec = (d & topical.unsqueeze(1)).sum(0) / texts.clamp(min=1)
        for c in (prec * (texts > 0)).topk(min(top, cb.num_codes)).indices.tolist():
            if texts[c] > 0:
                dense.append((book, c, prec[c].item(), int(texts[c])))
    return {"context": sorted(ctx, key=lambda x: (-x[2], -x[3]))[:top], "dense": sorted(dense, key=lambda x: (-x[2], -x[3]))[:top]}


def parse_topics(text):
    """"dragon,princess,sea=ocean|sea" -> {name: regex}, names from TOPICS unless given as NAME=REGEX."""
    out = {}
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        name, _, regex = item.partition("=")
        if not regex and name not in TOPICS:
            raise ConfigError(f"unknown topic {name!r}: use one of {', '.join(TOPICS)} or NAME=REGEX")
        out[name] = regex or TOPICS[name]
    return out


# ---------------------------------------------------------------------------------------------- contexts, plots, HTML
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


def write_browser(path, col, row_strs, concepts=None, stats=None, n_codes=100, n_ctx=3, title="codes"):
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
        st = stats[book] if stats else code_stats(codes, cb.num_codes)
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


def top_concepts(counts, P, R, names, n=2):
    """{code: [(name, precision, recall)]}: each used code's n labels with the best F1 (tables of precision_recall)."""
    score = f1(P, R)
    out = {}
    for c in (counts.sum(0) > 0).nonzero().flatten().tolist():
        best = score[:, c].topk(min(n, len(names))).indices.tolist()
        out[c] = [(names[l], P[l, c].item(), R[l, c].item()) for l in best if counts[l, c] > 0]
    return out


def pyplot():
    import matplotlib

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


def report_fsm(cfg, col, model, fsm, device):
    """fsm_analysis -> fsm.json, fsm_tables.pt, heatmap.png, neurons.png and a printed summary; returns concepts."""
    summary, tables, concepts = fsm_analysis(col, fsm, model, device, cfg.batch_size)
    torch.save({c: {b: t.to(torch.int32).to_sparse() for b, t in tb.items()} for c, tb in tables.items()},
               os.path.join(cfg.save_dir, "fsm_tables.pt"))  # sparse (L, M) counts: .to_dense() to read
    with open(os.path.join(cfg.save_dir, "fsm.json"), "w") as f:
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
        return concepts
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
        print(f"best single MLP neuron at the code's recall: mean precision {100 * summary['neurons']['mean_precision']:.1f}%")
        plot_neurons(os.path.join(cfg.save_dir, "neurons.png"), [s["precision"] for s in m["per_state"]],
                     summary["neurons"]["per_state"])
    top = max((b for b in summary["books"] if "mlp" in b), key=lambda b: summary["books"][b]["state"]["owned"])
    plot_heatmap(os.path.join(cfg.save_dir, "heatmap.png"), tables["state"][top], top)
    return concepts


def report_lm(cfg, col, tok):
    """Topic codes and regex concept search -> concepts.json, topic_codes.json and a printed summary; returns
    concepts (each code's best topics as token detectors) for the browser."""
    topics = parse_topics(cfg.topics)
    if cfg.regex:
        topics["regex"] = cfg.regex
    found, concepts = {}, {}
    for name, regex in topics.items():
        found[name] = topic_codes(col, tok, regex, cfg.window, cfg.top)
        target = regex_mask(col["tokens"], tok, regex)
        found[name]["tokens"] = concept_search(col, target, cfg.top)
        print(f"\n{name} ({regex!r}, {int(target.sum())} tokens): codes by F1 as token detectors")
        for b, c, p, r, n in found[name]["tokens"]:
            print(f"  {b}:{c}  P {p:.2f}  R {r:.2f}  fires {n}")
        for b, site, g, cb in col["books"]:
            counts, P, R = precision_recall(col["codes"][site][:, :, g].reshape(-1, cb.k), target.reshape(-1).long(),
                                            2, cb.num_codes)
            for c, x in top_concepts(counts[1:], P[1:], R[1:], [name], 1).items():
                concepts.setdefault(b, {}).setdefault(c, []).extend(x)
    with open(os.path.join(cfg.save_dir, "concepts.json"), "w") as f:
        json.dump(found, f, indent=1)
    with open(os.path.join(cfg.save_dir, "topic_codes.json"), "w") as f:  # for steer.py --task=topics
        json.dump({t: [f"{b}:{c}" for b, c, _, _ in found[t]["context"]] for t in topics}, f, indent=1)
    return {b: {c: by_f1(x, 2) for c, x in cs.items()} for b, cs in concepts.items()}


# ---------------------------------------------------------------------------------------------- main
def main(argv):
    preset, cli = parse_args(argv, (AnalyzeConfig,))
    cfg = AnalyzeConfig(**{**preset, **cli})
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(ckpt).to(device).eval()
    if not model.codebooks():
        raise ConfigError(f"{cfg.out_dir} has no codebooks (codebook_sites={model.config.codebook_sites!r}): nothing to analyse")
    tc, T = ckpt["train_config"], model.config.block_size
    is_fsm = tc.get("dataset", "fsm") == "fsm"
    if is_fsm:
        fsm = TokFSM(tc["num_states"], tc["num_edges"], tc["fsm_seed"])
        row_strs = fsm_strs(fsm)
    else:  # the tokenizer first: fail before the model runs
        from data.prepare import PrepareError, load_tokenizer

        try:
            tok = vocab_strings(load_tokenizer(cfg.dataset or tc["dataset"])[0])
        except PrepareError as e:
            raise ConfigError(str(e)) from None
        row_strs = lambda row: [tok(t) for t in row]  # noqa: E731
    os.makedirs(cfg.save_dir, exist_ok=True)

    if cfg.codes:  # reuse an earlier collection
        if not os.path.isfile(cfg.codes):
            raise ConfigError(f"--codes={cfg.codes}: no such file (analyze.py writes save_dir/codes.pt)")
        col = torch.load(cfg.codes, map_location="cpu", weights_only=True)
        if set(col["codes"]) != {s for s, _ in model.codebooks()}:
            raise ConfigError(f"{cfg.codes} holds codes of {sorted(col['codes'])}, but {cfg.out_dir} has codebooks "
                              f"{[s for s, _ in model.codebooks()]}: collect them again without --codes")
    else:
        if is_fsm:  # the fixed eval set of train.py
            batches = fsm.eval_set(cfg.num_seqs, T)[0].split(cfg.batch_size)
        else:
            rows = max(1, min(cfg.batch_size, 2**26 // (T * model.config.vocab_size)))  # logits <= 256 MiB
            batches = lm_batches(load_tokens(cfg.dataset or tc["dataset"], T, model.config.vocab_size)[1], T,
                                 cfg.max_tokens, rows)
        col = collect_codes(model, batches, device)
        torch.save(col, os.path.join(cfg.save_dir, "codes.pt"))
    col["books"] = books(model)
    print(f"codes of {col['tokens'].numel():,} tokens at {len(col['codes'])} sites ({len(col['books'])} books)")

    stats = {b: code_stats(col["codes"][s][:, :, g], cb.num_codes) for b, s, g, cb in col["books"]}
    with open(os.path.join(cfg.save_dir, "stats.json"), "w") as f:
        json.dump({b: {k: v for k, v in st.items() if k != "counts"} for b, st in stats.items()}, f, indent=1)
    for b, st in stats.items():
        print(f"  {b:22s} used {int((st['counts'] > 0).sum()):5d}  dead {st['dead_pct']:5.1f}%  "
              f"entropy {st['entropy_bits']:5.2f} bits ({st['effective']:.0f} effective codes)")
    plot_frequencies(os.path.join(cfg.save_dir, "freq.png"), stats, col)
    concepts = report_fsm(cfg, col, model, fsm, device) if is_fsm else report_lm(cfg, col, tok)
    path = os.path.join(cfg.save_dir, "browser.html")
    write_browser(path, col, row_strs, concepts, stats, cfg.html_codes, cfg.contexts,
                  title=f"codes of {cfg.out_dir} (iteration {ckpt.get('iter_num', '?')})")
    print(f"\nwrote {cfg.save_dir}: codes.pt, stats.json, freq.png, browser.html" +
          (", fsm.json, fsm_tables.pt, heatmap.png, neurons.png" if is_fsm else ", concepts.json, topic_codes.json"))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
