"""
Read what the codes mean (Codebook Features, Sections 4.2 and 5.2): collect the codes a trained model chooses,
count them, match them to concepts (FSM states, regexes over text) and compare them with single neurons.

    python analyze.py --out_dir=out                                # a TokFSM run: everything below, in out/analysis
    python analyze.py --out_dir=out --codes=out/analysis/codes.pt  # reuse collected codes (no model run for them)
    python analyze.py --out_dir=out-tinystories --regex=" dragon"  # an LM run: concept search for a regex
    python analyze.py --out_dir=out --ref_dir=out-nocb             # + loss recovered against a run without codebooks

Outputs in save_dir (default <out_dir>/analysis), replacing it as a whole only when all are complete: codes.pt
(token ids and chosen code ids, int16/int32, for torch.load), stats.json, freq.png, browser.html (the offline code
explorer, report.py); TokFSM: fsm.json, fsm_tables.pt, heatmap.png, neurons.png; an LM with --regex: concepts.json.
topics.py finds topic codes in language models. Codes are read per "book": `h.1.mlp`, or `h.0.attn_heads:2`.

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
A state's code is its best code by F1 over the MLP books; the neuron baseline (paper Fig. 6a, evaluate.py) is,
for that state, the single MLP neuron with the highest precision when thresholded so that its recall matches the
code's.
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

import report
import stories
from evaluate import (dictionary_metrics, eval_batches, f1, mlp_neurons, neuron_baseline, precision_recall,  # noqa: F401
                      reference_loss)
from fsm import TokFSM
from model import load_run
from plumbing.configuration import ConfigError, is_device, is_out_dir, is_regex, parse_config, spec, validate
from plumbing.entry import cli
from plumbing.files import read_json, read_torch
from plumbing.memory import check_analysis
from plumbing.progress import progress
from plumbing.rundir import claim, staged_dir
from plumbing.tokens import load_tokenizer, vocab_strings


@dataclass
class AnalyzeConfig:
    """Analysis. Defaults: the TokFSM run in out/, results in out/analysis."""

    out_dir: str = "out"  # the run whose ckpt.pt is analysed
    save_dir: Optional[str] = spec(None, check=is_out_dir)  # where results go; None = <out_dir>/analysis
    codes: str = ""  # a codes.pt from an earlier run: reuse it instead of running the model to collect codes
    num_seqs: int = spec(4096, ">= 1")  # TokFSM: sequences of the fixed eval set (seed 1234) to read codes on
    dataset: Optional[str] = None  # LM: a data/prepare.py directory; None = the checkpoint's
    max_tokens: int = spec(200_000, ">= 1")  # LM: tokens of consecutive val windows to read codes on
    batch_size: int = spec(256, ">= 1")  # sequences per forward (LM: fewer, so that the logits stay within 256 MiB)
    regex: str = spec("", check=is_regex)  # LM: rank codes as detectors of the tokens this regex matches
    top: int = spec(5, ">= 1")  # codes listed per concept
    html_codes: int = spec(1000, ">= 0")  # explorer: codes per book with their logit effect (the most frequent)
    contexts: int = spec(5, ">= 0")  # explorer: top contexts shown per code
    html_mb: float = spec(8.0, "> 0")  # explorer: page size cap in MiB, met by embedding fewer rows of token positions
    html_books: str = ""  # explorer: books or codebooks in it, comma-separated (h.1.mlp,h.0.attn_heads:2); "" = all
    ref_dir: str = ""  # a run without codebooks on the same data: its loss is L_ref of recovered_vs_ref (evaluate.py)
    device: str = spec("auto", check=is_device)

    def __post_init__(self):
        validate(self)
        self.save_dir = self.save_dir or os.path.join(self.out_dir, "analysis")
        claim(self.save_dir, "analysis", "save_dir")  # before any work: no other kind, no user's folder


# ---------------------------------------------------------------------------------------------- collecting
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
    for x in progress(batches, desc="collecting codes"):
        model(x.to(device))
        tokens.append(x.to(torch.int32).cpu())
        for site, cb in model.codebooks():
            dtype = torch.int16 if cb.num_codes <= 32767 else torch.int32
            codes[site].append(cb.last_indices.to(dtype).cpu())  # (B, T, G, k), compact as soon as it is read
    return {"tokens": torch.cat(tokens), "codes": {s: torch.cat(c) for s, c in codes.items()}}


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


def owners(P, R, labels):
    """(L,) bools: the labels that own a code (P >= 0.9 and R >= 0.9), and the labels present in `labels` (N,)."""
    seen = torch.bincount(labels, minlength=P.size(0)) > 0
    return ((P >= 0.9) & (R >= 0.9)).any(1) & seen, seen


def by_f1(found, n):
    """The n best of [(name, precision, recall, ...)] by F1."""
    return sorted(found, key=lambda x: -(2 * x[1] * x[2] / (x[1] + x[2]) if x[1] + x[2] else 0))[:n]


def best_codes(precision, recall):
    """For each label, the code with the best F1: (code (L,), precision (L,), recall (L,))."""
    c = f1(precision, recall).argmax(1)
    rows = torch.arange(len(c))
    return c, precision[rows, c], recall[rows, c]


def top_concepts(counts, P, R, names, n=2):
    """{code: [(name, precision, recall)]}: each used code's n labels with the best F1 (tables of precision_recall)."""
    score = f1(P, R)
    out = {}
    for c in (counts.sum(0) > 0).nonzero().flatten().tolist():
        best = score[:, c].topk(min(n, len(names))).indices.tolist()
        out[c] = [(names[l], P[l, c].item(), R[l, c].item()) for l in best if counts[l, c] > 0]
    return out


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


def state_codes(model, path):
    """{state: (codebook, group, code)}: each state's code by F1 over the MLP books, from analyze.py's fsm.json."""
    per_state = read_json(path, "analyze.py's fsm.json", "run analyze.py on this model").get("mlp", {}).get("per_state")
    if not isinstance(per_state, list) or not per_state:
        raise ConfigError(f"{path} holds no state codes (mlp.per_state): run analyze.py on a model with MLP codebooks")
    books = {book: (name, g) for book, name, g, _ in model.books()}
    try:
        return {int(s["state"]): (*books[s["book"]], int(s["code"])) for s in per_state}
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path} does not describe this model's codebooks: run analyze.py on it again") from None


# ---------------------------------------------------------------------------------------------- language
def regex_mask(tokens, tok, regex, what=None):
    """(n, T) bool: tokens that overlap a match of `regex` (case-insensitive) in their row's decoded text. what: the
    regex's name for a ConfigError when nothing matches (a concept without examples would still get codes)."""
    pattern = re.compile(regex, re.I)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, row in enumerate(tokens.tolist()):
        strs = [tok(t) for t in row]
        ends = torch.tensor([len(s) for s in strs]).cumsum(0)  # (T,) end offset of each token
        starts = ends - torch.tensor([len(s) for s in strs])
        for m in pattern.finditer("".join(strs)):
            mask[i] |= (starts < max(m.end(), m.start() + 1)) & (ends > m.start())
    if what and not mask.any():
        raise ConfigError(f"{what} matches nothing in the {tokens.numel():,} tokens read: fix it or pick another, "
                          "or read more text (--max_tokens)")
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


# ---------------------------------------------------------------------------------------------- reports
def report_regex(out, cfg, col, tok):
    """--regex: every code ranked as a detector of the tokens the regex matches -> concepts.json and a printed
    list; returns each code's precision and recall for the browser (topics.py finds topic codes)."""
    if not cfg.regex:
        return None
    target = regex_mask(col["tokens"], tok, cfg.regex, f"--regex={cfg.regex!r}")
    found = concept_search(col, target, cfg.top)
    print(f"\n{cfg.regex!r} ({int(target.sum())} tokens): codes by F1 as token detectors")
    for b, c, p, r, n in found:
        print(f"  {b}:{c}  P {p:.2f}  R {r:.2f}  fires {n}")
    with open(os.path.join(out, "concepts.json"), "w") as f:
        json.dump({"regex": cfg.regex, "tokens": found}, f, indent=1)
    concepts = {}
    for b, name, g, cb in col["books"]:
        counts, P, R = precision_recall(col["codes"][name][:, :, g].reshape(-1, cb.k), target.reshape(-1).long(), 2,
                                        cb.num_codes)
        for c, x in top_concepts(counts[1:], P[1:], R[1:], [f"regex {json.dumps(cfg.regex)}"], 1).items():
            concepts.setdefault(b, {})[c] = x
    return concepts


# ---------------------------------------------------------------------------------------------- main
def collect(cfg, model, batches):
    """The codes the model chooses on the batches, or those of --codes."""
    if cfg.codes:  # reuse an earlier collection
        col = read_torch(cfg.codes, "codes.pt of analyze.py", ("tokens", "codes"),
                         "pass a codes.pt that analyze.py wrote")
        if not isinstance(col["codes"], dict) or set(col["codes"]) != {n for n, _ in model.codebooks()}:
            raise ConfigError(f"{cfg.codes} holds codes of {sorted(col['codes'])}, but {cfg.out_dir} has codebooks "
                              f"{[n for n, _ in model.codebooks()]}: collect them again without --codes")
        return col
    return collect_codes(model, [x for x, _ in batches], next(model.parameters()).device)


def main(argv):
    cfg = parse_config(argv, AnalyzeConfig)
    ckpt, model = load_run(cfg.out_dir, cfg.device)
    report.explorer_books(cfg.html_books, model.books())  # an unknown book stops here
    if not model.codebooks():
        raise ConfigError(f"{cfg.out_dir} has no codebooks (codebook_sites={model.config.codebook_sites!r}): "
                          "nothing to analyse; train with codebooks")
    tc = ckpt["train_config"]
    check_analysis(cfg, model.config, tc, cfg.device)  # sizes that cannot fit stop here
    fsm = TokFSM(tc["num_states"], tc["num_edges"], tc["fsm_seed"]) if tc.get("dataset", "fsm") == "fsm" else None
    if fsm is None:  # the tokenizer first: fail before the model runs
        tok = vocab_strings(load_tokenizer(cfg.dataset or tc["dataset"])[0])
    batches = eval_batches(cfg, ckpt, model, fsm)
    loss_ref = reference_loss(cfg.ref_dir, tc, model, batches, cfg.device) if cfg.ref_dir else None
    col = collect(cfg, model, batches)
    col_books = model.books()
    print(f"codes of {col['tokens'].numel():,} tokens at {len(col['codes'])} codebooks ({len(col_books)} books)")
    dictionary = dictionary_metrics(model, batches, loss_ref=loss_ref)  # L0, FVU, dead, CE loss recovered
    if loss_ref is not None:
        t = dictionary["total"]
        print(f"loss {t['loss']:.4f}, {cfg.ref_dir} (no codebooks) {loss_ref:.4f}, zeroed {t['loss_zero']:.4f}: "
              f"loss recovered against it {t['recovered_vs_ref']:.3f}")
    with staged_dir(cfg.save_dir, "analysis") as out:  # every output or none: replaced when all are written
        torch.save(col, os.path.join(out, "codes.pt"))
        col["books"] = col_books
        stats = {b: code_stats(col["codes"][n][:, :, g], cb.num_codes) for b, n, g, cb in col["books"]}
        report.code_summary(out, stats, dictionary)
        report.plot_frequencies(os.path.join(out, "freq.png"), stats, col)
        if fsm:
            summary, tables, concepts = fsm_analysis(col, fsm, model, model.lm_head.weight.device, cfg.batch_size)
            report.fsm_summary(out, summary, tables)
        else:  # the story language's truth (stories.py), else --regex
            concepts = (stories.report_truth(out, col, model, cfg.dataset or tc["dataset"], cfg.batch_size)
                        or report_regex(out, cfg, col, tok))
        row_strs = report.fsm_strs(fsm) if fsm else lambda row: [tok(t) for t in row]
        report.write_browser(os.path.join(out, "browser.html"), col, row_strs, stats, concepts, model=model, caps=cfg,
                             title=f"codes of {cfg.out_dir} (iteration {ckpt['iter_num']})")
    print(f"\nwrote {cfg.save_dir}: codes.pt, stats.json, freq.png, browser.html" +
          (", fsm.json, fsm_tables.pt, heatmap.png, neurons.png" if fsm else ", concepts.json" if cfg.regex else ""))


if __name__ == "__main__":
    cli(main)
