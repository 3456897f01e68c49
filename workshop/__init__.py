"""
Checks and helpers for workshop/workshop.ipynb. Each `check_*` runs a learner's answer against this repository's own code
on known inputs and raises an AssertionError that names the likely mistake; the answers are in
workshop/solutions.py. The helpers train with a live plot (`train_live`), run the learner's state swap over every
codebook (`swap_table`), read out a dictionary of features (`dictionary_row`) and draw the figures.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch
import torch.nn.functional as F

import codebook
import steer
from analyze import collect_codes, fsm_analysis, fsm_readouts, precision_recall
from codebook import CodebookLayer
from evaluate import mlp_neurons, neuron_baseline
from evaluate import Recorder, bypassed, evaluate_fsm, mean_ce
from steer import jsd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py, the runs


def _missing(fn, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        raise AssertionError("not answered yet: replace `raise NotImplementedError` by your code") from None


# ---------------------------------------------------------------------------------------------- the codebook layer
def check_codebook(codebook_forward):
    """codebook_forward(a (N, d), codes (M, d), k) -> (out (N, d), idx (N, k), recon ()) against CodebookLayer
    (one group, no LayerNorm): chosen codes, output, reconstruction loss, and gradients to a and to the codes."""
    torch.manual_seed(0)
    for k in (1, 3):
        layer = CodebookLayer(8, num_codes=16, k=k, layernorm=False)
        with torch.no_grad():
            layer.codes.mul_(torch.rand(1, 16, 1) * 3)  # codes of different lengths: cosine is not a dot product
        a = torch.randn(10, 8, requires_grad=True)
        codes = layer.codes.detach()[0].clone().requires_grad_(True)
        out, idx, recon = _missing(codebook_forward, a, codes, k)
        want = layer(a)
        want_idx = layer.last_indices.view(10, k)
        assert idx.shape == (10, k), f"idx has shape {tuple(idx.shape)}, expected (N, k) = (10, {k})"
        if not torch.equal(idx.sort(-1).values, want_idx.sort(-1).values):
            dot = (a @ codes.T).topk(k).indices
            hint = " (those are the top dot products: normalise a and the codes first)" if torch.equal(
                idx.sort(-1).values, dot.sort(-1).values) else ""
            raise AssertionError(f"k={k}: chosen codes differ, e.g. row 0 {idx[0].tolist()} instead of "
                                 f"{want_idx[0].tolist()}: take the top-k cosine similarities{hint}")
        assert out.shape == a.shape, f"out has shape {tuple(out.shape)}, expected {tuple(a.shape)}"
        assert torch.allclose(out, want, atol=1e-5), f"k={k}: the output should be the sum of the chosen codes"
        if torch.allclose(recon, layer.recon_loss * a.shape[1], atol=1e-5):
            raise AssertionError("recon is the squared norm |q - a|^2 averaged over rows; the formula's 1/(N d) "
                                 "averages over all N * d coordinates, as F.mse_loss does")
        assert torch.allclose(recon, layer.recon_loss, atol=1e-6), \
            f"k={k}: recon is {recon.item():.4f}, expected MSE(q, a.detach()) = {layer.recon_loss.item():.4f}"
        g = torch.randn_like(out)
        ga, gc = torch.autograd.grad((out * g).sum() + recon, [a, codes], allow_unused=True)
        if ga is not None and torch.allclose(ga - g, 2 * (a - want).detach() / a.numel(), atol=1e-6):
            raise AssertionError("recon = MSE(q, a.detach()): the reconstruction loss trains the codes, not a")
        assert ga is not None and torch.allclose(ga, g, atol=1e-6), \
            "the gradient to a should be the upstream gradient itself: straight-through, out = q + a - a.detach()"
        from_recon = torch.autograd.grad(layer.recon_loss, layer.codes, retain_graph=True)[0][0]
        (want * g).sum().add(layer.recon_loss).backward()
        if gc is not None and torch.allclose(gc, from_recon, atol=1e-6):
            raise AssertionError("the codes learn from recon only: that is VQ-VAE's form, a + (q - a).detach(); here "
                                 "out = q + a - a.detach() lets the task loss train the chosen codes through q too")
        assert gc is not None and torch.allclose(gc, layer.codes.grad[0], atol=1e-5), \
            "the codes' gradient differs: the codes learn from the output (through q) and from " \
            "recon = MSE(q, a.detach())"
    return "correct: cosine top-k, sum of codes, straight-through, reconstruction loss"


# ---------------------------------------------------------------------------------------------- k-means
def kmeans_reference(a, init, k, iters, assign="cosine"):
    """k-means of a (N, d) from init (M, d): `iters` rounds of "assign each row to its best code, move each code to
    the mean of its rows (a code without rows stays)", then divided by k. assign: "cosine" (CodebookLayer's),
    "dot" or "distance" (the usual mistakes). Returns (M, d)."""
    codes = init.clone()
    for _ in range(iters):
        if assign == "cosine":
            scores = F.normalize(a, dim=-1) @ F.normalize(codes, dim=-1).T  # (N, M)
        elif assign == "dot":
            scores = a @ codes.T
        else:
            scores = -torch.cdist(a, codes)
        best = scores.argmax(1)  # (N,)
        n = torch.bincount(best, minlength=len(codes)).unsqueeze(1)  # (M, 1)
        sums = torch.zeros_like(codes).index_add_(0, best, a)
        codes = torch.where(n > 0, sums / n.clamp(min=1), codes)
    return codes / k


def kmeans_data(seed=0):
    """Activations for the k-means check and demo: (a (400, 8), init (11, 8)). Five clusters of rows with lengths
    from 0.2 to 3.2 (distance and dot product then disagree with cosine); init holds two rows of each cluster and a
    last code that points away from all of them, so that it wins no row."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(8, generator=g), dim=0)
    centers = F.normalize(2 * u + torch.randn(5, 8, generator=g), dim=-1)  # (5, 8) all on u's side
    labels = torch.arange(400) % 5
    a = (centers[labels] + 0.3 * torch.randn(400, 8, generator=g)) * (0.2 + 3 * torch.rand(400, 1, generator=g))
    return a, torch.cat([a[:10], -2 * u.unsqueeze(0)])


def check_kmeans(fn):
    """fn(a (N, d), init (M, d), k, iters) -> codes (M, d), against CodebookLayer.kmeans_init started from the same
    codes: clustered rows (k = 1 and 2, an empty code among them) and unclustered ones (1 and 2 rounds)."""
    a, init = kmeans_data()
    g = torch.Generator().manual_seed(1)
    b = torch.randn(200, 8, generator=g) * (0.2 + 3 * torch.rand(200, 1, generator=g))  # no clusters: slow to settle
    for x, start, k, iters in ((a, init, 1, 5), (a, init, 2, 5), (b, b[:16], 1, 1), (b, b[:16], 1, 2)):
        layer = CodebookLayer(x.shape[1], num_codes=len(start), k=k, layernorm=False)
        layer.kmeans_iters = iters
        with mock.patch.object(codebook, "_distinct_rows", lambda rows, m: start.clone()):
            layer.kmeans_init(x.unsqueeze(1))  # (N, 1, d): one group
        want = layer.codes.detach()[0]
        got = _missing(fn, x.clone(), start.clone(), k, iters)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, \
            f"returned {type(got).__name__} {tuple(getattr(got, 'shape', ()))}: expected codes (M, d) = " \
            f"{tuple(want.shape)}"
        if torch.allclose(got.float(), want, atol=1e-5):
            continue
        if x is a and not torch.isfinite(got[-1]).all():
            raise AssertionError("the last code wins no activation and became NaN (the mean of nothing): a code "
                                 "without members keeps its value")
        if x is a and got[-1].abs().max() == 0:
            raise AssertionError("the last code wins no activation and became 0: a code without members keeps "
                                 "its value")
        for assign in ("dot", "distance"):
            if torch.allclose(got, kmeans_reference(x, start, k, iters, assign), atol=1e-5):
                raise AssertionError(f"members chosen by {'dot product' if assign == 'dot' else 'distance'}: assign "
                                     "each activation to the code with the highest cosine similarity (normalise both)")
        if k > 1 and torch.allclose(got, want * k, atol=1e-5):
            raise AssertionError(f"k={k}: divide the means by k at the end: k codes are summed per token, so each is "
                                 "a k-th of an activation's size")
        norms = got.norm(dim=-1)
        if torch.allclose(norms, norms[:1].expand_as(norms), atol=1e-4):
            raise AssertionError("every code has the same length: a code is the mean of its members itself (then "
                                 "divided by k), not its direction; the layer outputs codes, so their length matters")
        for n in (iters - 1, iters + 1):
            if n >= 0 and torch.allclose(got, kmeans_reference(x, start, k, n), atol=1e-5):
                raise AssertionError(f"iters={iters}: your codes are those of {n} rounds (assign, then move)")
        raise AssertionError(f"k={k}, iters={iters}: codes differ from CodebookLayer.kmeans_init's (largest "
                             f"difference {(got - want).abs().max().item():.3g}): each round, assign every row to the "
                             "code of highest cosine, then move each code to the mean of its rows; divide by k last")
    return "correct: cosine assignment, codes at the means of their members (empty ones kept), divided by k"


def mean_cosine(a, codes):
    """The mean cosine similarity of each row of a (N, d) to its best code of codes (M, d): how tight the clusters
    are (1 = every row points exactly along its code)."""
    return (F.normalize(a, dim=-1) @ F.normalize(codes, dim=-1).T).max(1).values.mean().item()


# ---------------------------------------------------------------------------------------------- precision, recall
def check_precision_recall(fn, codes=None, labels=None, num_labels=None, num_codes=None):
    """fn(codes (N,), labels (N,), num_labels, num_codes) -> (precision (L, M), recall (L, M)) against
    analyze.precision_recall, on a hand-made case and, when given, on a real model's codes and labels."""
    c = torch.tensor([0, 0, 1, 2, 2, 2])
    y = torch.tensor([0, 0, 0, 1, 1, 0])
    P, R = _missing(fn, c, y, 3, 5)  # label 2 and codes 3, 4 never occur
    if tuple(P.shape) == (2, 3):
        raise AssertionError("tables of shape (2, 3), sized from the data (max() + 1): use (num_labels, num_codes) = "
                             "(3, 5); a code that never fires and a label that never occurs still have a column, a row")
    assert P.shape == R.shape == (3, 5), f"shapes {tuple(P.shape)}, {tuple(R.shape)}: expected (num_labels, num_codes)"
    want_p = torch.tensor([[1.0, 1.0, 1 / 3, 0, 0], [0.0, 0.0, 2 / 3, 0, 0], [0, 0, 0, 0, 0]])
    want_r = torch.tensor([[0.5, 0.25, 0.25, 0, 0], [0.0, 0.0, 1.0, 0, 0], [0, 0, 0, 0, 0]])
    if not torch.isfinite(P.float()).all() or not torch.isfinite(R.float()).all():
        raise AssertionError("NaN for a code that never fires or a label that never occurs: 0 when undefined")
    if not torch.allclose(P.float(), want_p):
        raise AssertionError(f"precision {P.tolist()}: P[l, c] is the share of code c's firings that carry label l "
                             "(divide by how often the code fires)")
    if not torch.allclose(R.float(), want_r):
        raise AssertionError(f"recall {R.tolist()}: R[l, c] is the share of label l's positions where code c fires "
                             "(divide by how often the label occurs)")
    if codes is not None:
        L = num_labels or int(labels.max()) + 1
        M = num_codes or int(codes.max()) + 1
        _, P0, R0 = precision_recall(codes.view(-1, 1), labels, L, M)
        P, R = fn(codes, labels, L, M)
        assert torch.allclose(P.float(), P0.float(), atol=1e-6) and torch.allclose(R.float(), R0.float(), atol=1e-6), \
            "right on the small case, wrong on the model's codes: check codes that never fire and unseen labels"
    return "correct: precision and recall match analyze.py"


# ---------------------------------------------------------------------------------------------- your layer in the model
def check_your_layer(fn, model, fsm, site="h.0.mlp", eval_seqs=512, samples=1000, seed=1337):
    """fn(layer, x) -> out: the forward of the trained CodebookLayer `layer` (one group) written by the learner, put
    in place of the model's `site` codebook. Compares the logits and chosen codes on one batch with the layer's own,
    then evaluates the model with it as train.py does (evaluate_fsm with train.py's eval set and seed); says the
    loss and the valid transitions."""
    layer = dict(model.codebooks())[site]
    x, y = fsm.eval_set(eval_seqs, model.config.block_size)
    model.eval()
    with torch.no_grad():
        want, _, _ = model(x[:64])
        want_idx = layer.last_indices.clone()
        layer.last_indices = None
        with layer_replaced(model, site, fn):
            try:
                got, _, _ = _missing(model, x[:64])
            except AssertionError:
                raise
            except Exception as e:  # the model's next layer could not use the output
                raise AssertionError(f"the model failed with your layer ({type(e).__name__}: {str(e)[:120]}): "
                                     "return out with x's shape (B, T, d)") from None
            idx = layer.last_indices
    if idx is None or tuple(idx.shape) != tuple(want_idx.shape):
        raise AssertionError(f"layer.last_indices is {None if idx is None else tuple(idx.shape)}: set it to the "
                             f"chosen codes, (B, T, 1, k) = {tuple(want_idx.shape)}: the metrics read it")
    if not torch.allclose(got, want, atol=1e-4):
        with torch.no_grad(), layer_replaced(model, site, _no_layernorm):
            plain, _, _ = model(x[:64])
        hint = ("the trained codes live after the layer's LayerNorm: a = layer.ln(x) first" if torch.allclose(
            got, plain, atol=1e-4) else "the output should be the sum of the chosen codes of layer.codes[0]")
        raise AssertionError(f"the model's logits change with your layer (largest difference "
                             f"{(got - want).abs().max().item():.3g}): {hint}")
    if not torch.equal(idx, want_idx):
        raise AssertionError("same output, but last_indices differ from the codes chosen: store idx as (B, T, 1, k)")
    with layer_replaced(model, site, fn):  # (its loss recovered would differ: your layer has no bypass)
        m = evaluate_fsm(model, fsm, x, y, samples, seed)
    return (f"correct: the model with your layer at {site}: eval loss {m['loss']:.4f}, valid transitions "
            f"{100 * m['valid']:.1f}% ({eval_seqs} eval sequences, {samples} samples, as train.py evaluates)")


def _no_layernorm(layer, x):  # the likely mistake, for the hint above
    a = x.reshape(-1, layer.dim)
    c = layer.codes[0]
    idx = (F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T).topk(layer.k).indices
    layer.last_indices = idx.view(*x.shape[:-1], 1, layer.k)
    return c[idx].sum(1).view(x.shape)


class layer_replaced:
    """Within the block, the codebook `site` of `model` runs fn(layer, x) as its forward."""

    def __init__(self, model, site, fn):
        self.layer, self.fn = dict(model.codebooks())[site], fn

    def __enter__(self):
        self.layer.forward = lambda x: self.fn(self.layer, x)  # an instance attribute shadows the class's forward
        return self.layer

    def __exit__(self, *exc):
        del self.layer.forward


# ---------------------------------------------------------------------------------------------- Jensen-Shannon
def check_jsd(fn):
    """fn(p (n, K), q (n, K)) -> (n,) Jensen-Shannon divergence in nats, against steer.jsd."""
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.6, 0.4]])
    got = _missing(fn, p, q)
    want = jsd(p, q)
    assert got.shape == want.shape, f"shape {tuple(got.shape)}: one divergence per row, {tuple(want.shape)}"
    assert torch.isfinite(got).all(), "not finite: 0 * log 0 counts as 0 (mask the zeros)"
    if torch.allclose(got, want / torch.log(torch.tensor(2.0))):
        raise AssertionError("in bits: use the natural log (nats), as the paper's Fig. 4")
    assert torch.allclose(got, want, atol=1e-6), \
        f"{got.tolist()} instead of {want.tolist()}: JSD = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2"
    return "correct: JSD in nats"


# ---------------------------------------------------------------------------------------------- the state swap
def swap_reference(model, fsm, ctx_a, ctx_b, sites, positions="state+next", fill=-2, source="B"):
    """The state swap (steer.fsm_swap's, one site group): the next-state distribution (n, S + 1) of the contexts
    ctx_a (n, T) with the codes that ctx_b's run chose at `positions` patched into `sites`. The other arguments make
    the usual mistakes: positions "state" (A's digits only) or "last"; fill -1 (remove the codes elsewhere); source
    "A" (A's own codes)."""
    T, D = ctx_a.shape[1], fsm.digits
    pos = {"state+next": slice(T - D, T + D - 1), "state": slice(T - D, T), "last": slice(T - 1, T)}[positions]
    _, _, codes = steer.next_state_dist(model, fsm, ctx_b if source == "B" else ctx_a, return_codes=True)
    patch = {}
    for s in sites:
        patch[s] = torch.full_like(codes[s], fill)
        patch[s][:, pos] = codes[s][:, pos]
    return steer.next_state_dist(model, fsm, ctx_a, patch)[0]


def success(fsm, p, B):
    """Mean probability that the next state is a successor of B, over rows of p (n, S + 1) and states B (n,)."""
    return (p[:, : fsm.num_states] * fsm.adj[B]).sum(1).mean().item()


def check_swap(fn, model, fsm, pairs=40):
    """fn(model, fsm, ctx_a, ctx_b, sites) -> p (n, S + 1), the next-state distribution of A's contexts with B's codes
    patched in at `sites`, against swap_reference, on `pairs` pairs (A, B) of the paper's Fig. 4 protocol."""
    A, B, ctx_a, ctx_b = steer.swap_pairs(fsm, pairs, seed=1)
    names = [n for n, _ in model.codebooks()]
    for sites in (names[: len(names) // 2], names[-1:]):  # layer 0's codebooks; the last one alone
        got = _missing(fn, model, fsm, ctx_a, ctx_b, sites)
        want = swap_reference(model, fsm, ctx_a, ctx_b, sites)
        assert isinstance(got, torch.Tensor) and got.shape == want.shape, \
            f"returned {tuple(getattr(got, 'shape', ()))}: expected p (n, S + 1) = {tuple(want.shape)}"
        if torch.allclose(got, want, atol=1e-5):
            continue
        s, w = 100 * success(fsm, got, B), 100 * success(fsm, want, B)
        where = f"patching {', '.join(sites)}: success {s:.1f}% where it should be {w:.1f}%"
        mistakes = [
            (dict(positions="state"), "B's codes at A's digits only move the first digit: the next state's second "
             "digit is predicted at the positions after T - 1, whose codes must be B's too (T - D to T + D - 2)"),
            (dict(positions="last"), "B's codes at the last position only: patch every digit of A's state and of the "
             "next state (positions T - D to T + D - 2)"),
            (dict(fill=-1), "-1 removes a code (the site adds nothing there): fill with -2 (keep the model's own)"),
            (dict(source="A"), "no effect, as with A's own codes: take the codes that B's context chose"),
            (dict(sites=names), "you patched every codebook: patch only those in `sites`")]
        for kw, says in mistakes:
            alt = swap_reference(model, fsm, ctx_a, ctx_b, **{"sites": sites, **kw})
            if torch.allclose(got, alt, atol=1e-5):
                raise AssertionError(f"{where}: {says}")
        raise AssertionError(f"{where}: patch B's codes at positions T - D to T + D - 2 of the sites in `sites`, -2 "
                             "elsewhere, and read next_state_dist of A's contexts with that patch")
    return "correct: B's codes at A's state and the next state's digits, in the codebooks asked for"


def swap_table(swap, model, fsm, jsd_fn, pairs=200, seed=0, batch=100):
    """The learner's swap over every site group (steer.site_groups: all, mlp, attn, each layer, each codebook) on
    `pairs` pairs. Returns {group: (success, normalised JSD over next states)} with "none" (A) and "B" (ceiling)."""
    A, B, ctx_a, ctx_b = steer.swap_pairs(fsm, pairs, seed)
    groups = steer.site_groups(model)
    out = {name: [] for name in ["none", *groups, "B"]}
    for s in range(0, pairs, batch):
        a, b, B_ = ctx_a[s : s + batch], ctx_b[s : s + batch], B[s : s + batch]
        p_a, p_b = steer.next_state_dist(model, fsm, a)[0], steer.next_state_dist(model, fsm, b)[0]
        base = jsd_fn(p_a, p_b)
        for name in out:
            p = p_a if name == "none" else p_b if name == "B" else swap(model, fsm, a, b, groups[name])
            out[name].append(torch.stack([(p[:, : fsm.num_states] * fsm.adj[B_]).sum(1), jsd_fn(p, p_b) / base], 1))
    return {name: tuple(torch.cat(v).mean(0).tolist()) for name, v in out.items()}


def next_state_readout(fsm, out, A, B):
    """Where sampled continuations go: out (n, L) ends with the D digits of the next state after a prompt ending in
    A. Returns {"A", "B", "other": % of next states that are successors of A, of B, of neither; "digit A", "digit B",
    "digit both": % of first digits that begin successors of A only, of B only, of both}."""
    D = fsm.digits
    nxt = fsm.tokens_to_states(out[:, -D:]).squeeze(1)  # (n,) -1 when malformed
    first = lambda s: set(fsm.states_to_tokens(fsm.succ[s].unsqueeze(1))[:, 0].tolist())  # noqa: E731
    fa, fb = first(A), first(B)
    d = out[:, -D].tolist()
    pct = lambda xs: 100 * sum(xs) / len(xs)  # noqa: E731
    ok = nxt >= 0
    succ = lambda s: (ok & fsm.adj[s][nxt.clamp(min=0)]).tolist()  # noqa: E731
    return {"A": pct(succ(A)), "B": pct(succ(B)),
            "digit A": pct([x in fa - fb for x in d]), "digit B": pct([x in fb - fa for x in d]),
            "digit both": pct([x in fa & fb for x in d])}


# ---------------------------------------------------------------------------------------------- dictionaries
@torch.no_grad()
def dictionary_row(model, fsm, x, y):
    """A dictionary of features (codebooks, or SAEs spliced in as sae.py does) read like analyze.py reads codes, on
    eval sequences x, y (n, T): {"owning": states owning a feature of an MLP site (precision and recall >= 0.9),
    "of": states seen, "precision", "recall": means over the states of each state's best feature by F1, "fvu": {site:
    FVU} of the MLP sites, "loss": eval loss with the dictionary in place, "summary": fsm_analysis's summary}."""
    batches = list(zip(x.split(256), y.split(256)))
    with Recorder(model) as rec:
        loss, _ = mean_ce(model, batches)
    col = collect_codes(model, x.split(256))
    col["books"] = model.books()
    summary, _, _ = fsm_analysis(col, fsm)
    m = summary["mlp"]
    return {"owning": m["states_owning_code"], "of": m["of"], "precision": m["mean_precision"],
            "recall": m["mean_recall"], "fvu": {n: rec.fvu(n) for n, _ in rec.books if "mlp" in n}, "loss": loss,
            "summary": summary}


@torch.no_grad()
def neuron_row(model, fsm, x, y, recall=0.9):
    """The neurons of `model` (its dictionaries bypassed) as detectors of states: each state's best post-GELU MLP
    neuron thresholded at `recall`, on eval sequences x, y (n, T). Returns {"owning": states whose best neuron reaches
    precision 0.9, "of": states seen, "precision": mean precision, "loss": the model's own eval loss}."""
    rows, cols, labels = fsm_readouts(x, fsm)["state"]
    with bypassed(model):
        acts = mlp_neurons(model, x, rows, cols)  # (N, n_layer * 4 d)
        loss, _ = mean_ce(model, list(zip(x.split(256), y.split(256))))
    prec, _, _ = neuron_baseline(acts, labels, torch.full((fsm.num_states,), recall))
    seen = torch.bincount(labels, minlength=fsm.num_states) > 0
    return {"owning": int(((prec >= 0.9) & seen).sum()), "of": int(seen.sum()), "precision": prec[seen].mean().item(),
            "loss": loss}


# ---------------------------------------------------------------------------------------------- training, live
def train_live(runs, switch=None, floor=None, every=2.0):
    """Train the runs {label: train.py arguments} at the same time, each a subprocess with its share of the CPU
    threads (on 2 cores, two runs at 1 thread each took 271 s where one after the other at 2 threads took 385 s),
    redrawing as their logs grow: the training cross-entropy (the step `switch` where the codes go on and the entropy
    `floor` marked), the FVU of the codebooks and the valid transitions at each evaluation. Returns {label: log
    records}; raises RuntimeError with the end of train.py's stderr if a run fails."""
    import matplotlib.pyplot as plt
    from IPython.display import clear_output, display

    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // len(runs)))}
    procs, logs = {}, {label: [] for label in runs}
    for label, args in runs.items():
        out = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
        err = tempfile.TemporaryFile("w+")  # stderr in a file: a pipe that nobody reads could fill and block
        procs[label] = (subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                                         stdout=subprocess.DEVNULL, stderr=err), os.path.join(ROOT, out), err)
    while True:
        done = all(p.poll() is not None for p, _, _ in procs.values())
        for label, (_, out, _) in procs.items():
            logs[label] = read_log(os.path.join(out, "log.jsonl"))
        fig = plot_training(logs, switch, floor)
        clear_output(wait=True)
        display(fig)
        plt.close(fig)
        if done:
            break
        time.sleep(every)
    for label, (p, _, err) in procs.items():
        err.seek(0)
        said = err.read()
        err.close()
        if p.returncode != 0:
            raise RuntimeError(f"{label}: train.py failed: {said[-500:]}")
    return logs


def plot_training(logs, switch=None, floor=None):
    """Three panels from {label: log records}: training cross-entropy, eval FVU, eval valid transitions."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.2))
    for i, (name, recs) in enumerate(logs.items()):
        c = f"C{i}"
        tr = [r for r in recs if "ce" in r]
        ax1.plot([r["iter"] for r in tr], [r["ce"] for r in tr], color=c, label=name)
        ev = [r for r in recs if "eval" in r]
        fv = [r for r in ev if r["eval"].get("fvu") is not None and math.isfinite(r["eval"]["fvu"])]
        if fv:
            ax2.plot([r["iter"] for r in fv], [r["eval"]["fvu"] for r in fv], "o-", color=c, label=name)
        ax3.plot([r["iter"] for r in ev], [100 * r["eval"]["valid"] for r in ev], "o-", color=c, label=name)
    if switch is not None:
        for ax in (ax1, ax2, ax3):
            ax.axvline(switch, color="grey", ls=":", lw=1)
        ax1.text(switch, 0.98, " codes on", transform=ax1.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    if floor is not None:
        ax1.axhline(floor, color="k", ls="--", lw=0.8)
        ax1.text(0, floor, "entropy floor", va="bottom", fontsize=8)
    ax1.set(xlabel="step", ylabel="nats/token", title="cross-entropy (training batches)")
    ax2.set(xlabel="step", ylabel="FVU", title="reconstruction: variance unexplained", ylim=(0, None))
    ax3.set(xlabel="step", ylabel="%", title="valid transitions (sampled)", ylim=(0, 100))
    ax1.legend(fontsize=8)
    fig.tight_layout()
    return fig


def read_log(path):
    """The records of a log.jsonl so far ([] before it exists); a line being written is skipped."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# ---------------------------------------------------------------------------------------------- language models
TINYSTORIES_SHARED = os.path.join("..", "shared", "data", "tinystories", "tinystories_train_head.txt")


def tinystories_text(root=ROOT, timeout=3.0):
    """The TinyStories text for Section 7: (text, where it came from), or (None, the one line saying what to run).
    Looks for TinyStories' validation file in root/data/tinystories-raw (a download of an earlier run), then for the
    offline copy beside the repository (../shared/data/tinystories), then downloads the validation file (19 MB)
    with data/prepare.py's downloader when huggingface.co answers within `timeout` seconds (never under
    HF_HUB_OFFLINE=1)."""
    import socket

    from plumbing.configuration import ConfigError
    from data.prepare import TINYSTORIES_FILES, TINYSTORIES_REPO, hf_file

    raw = os.path.join(root, "data", "tinystories-raw")
    for path in (os.path.join(raw, TINYSTORIES_FILES["val"]), os.path.join(root, TINYSTORIES_SHARED)):
        if os.path.isfile(path):
            return open(path, encoding="utf-8").read(), path
    why = "HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else None  # the hub's own switch: no download
    if why is None:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
            path = hf_file(TINYSTORIES_REPO, TINYSTORIES_FILES["val"], "dataset", raw)
            return open(path, encoding="utf-8").read(), path
        except OSError:
            why = "huggingface.co did not answer"
        except ConfigError as e:
            why = str(e)
    return None, (f"no TinyStories text here and no download ({why}): on a machine with the network run this cell "
                  "again (it downloads TinyStories' validation file, 19 MB), or `python data/prepare.py tinystories` "
                  "to prepare the whole dataset for training")


# ---------------------------------------------------------------------------------------------- figures
def show_matrix(fsm, ax):
    """The FSM's transition matrix: row s, column t is dark when s -> t is an edge."""
    ax.imshow(fsm.adj.float(), cmap="Greys", interpolation="nearest")
    ax.set(xlabel="next state", ylabel="state", title=f"{fsm.num_states} states, {fsm.num_edges} successors each")


def show_swap(fsm, p_a, p_x, p_b, A, B, ax):
    """The next-state distributions of a context ending in A, of the same context with B's codes patched in, and
    of a context ending in B (the paper's Fig. 4), with A's and B's successors marked."""
    S = fsm.num_states
    for p, label, style in ((p_a, f"context ends in {A}", "C0"), (p_x, "A with B's codes", "C3"),
                            (p_b, f"context ends in {B}", "C2")):
        ax.plot(range(S), p[:S], color=style, label=label, lw=1.2)
    for s in fsm.succ[A].tolist():
        ax.axvline(s, color="C0", alpha=0.15)
    for s in fsm.succ[B].tolist():
        ax.axvline(s, color="C2", alpha=0.15)
    ax.set(xlabel="next state", ylabel="probability", title="next-state distribution")
    ax.legend()
