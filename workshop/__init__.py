"""
Checks and helpers for workshop/workshop.ipynb. Each `check_*` runs a learner's answer against this repository's
own code on known inputs and raises an AssertionError that names the likely mistake; the answers are in
workshop/solutions.py. The helpers train with a live plot (`train_live`), run the learner's state swap over every
codebook (`swap_table`), read out a dictionary of features (`dictionary_row`) and draw the figures.
"""

import functools
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
from sae import SAELayer, insert_saes
from steer import jsd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py, the runs


def exercise(stub):
    """Decorates an exercise's stub: calls go to the learner's function; while it still raises NotImplementedError,
    to the answer from workshop.solutions when the learner imported one above the `def` (in the same cell or an
    earlier one), which the `def` would otherwise replace. An import below the `def` replaces it directly."""
    before = stub.__globals__.get(stub.__name__)
    answer = before if getattr(before, "__module__", None) == "workshop.solutions" else None

    @functools.wraps(stub)
    def run(*args, **kwargs):
        try:
            return stub(*args, **kwargs)
        except NotImplementedError:
            if answer is None:
                raise
            return answer(*args, **kwargs)
    return run


def _missing(fn, *args, hints=()):
    """fn(*args); NotImplementedError says "not answered yet"; any other exception raised inside the learner's code
    becomes one line naming it, with the first hint whose key occurs in its message (hints: ((key, hint), ...)),
    the learner's traceback chained below."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise AssertionError("not answered yet: replace `raise NotImplementedError` by your code") from None
    except AssertionError:
        raise
    except Exception as e:
        said = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        hint = next((h for key, h in hints if key in said), None)
        raise AssertionError(f"your function raised {type(e).__name__}: {said}" + (f": {hint}" if hint else "")) from e


def _kind(x):
    """How a wrong answer's type reads in a message."""
    if x is None:
        return "None (does your function end with `return`?)"
    if type(x).__module__ == "numpy":
        return "a numpy array: compute in torch (numpy has no gradient); torch.from_numpy converts"
    if isinstance(x, (int, float)):
        return f"a Python {type(x).__name__}: return the tensor itself, without .item() or float() (a number has " \
            "no gradient)"
    return f"a {type(x).__name__}"


def _tensor(x, name, shape=None):
    """Asserts that the answer's part `name` is a tensor (of `shape`, a tuple, when given), naming what it is."""
    if not isinstance(x, torch.Tensor):
        raise AssertionError(f"{name} is {_kind(x)}; expected a torch tensor" + (f" of shape {shape}" if shape else ""))
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise AssertionError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    return x


def _parts(got, n, names):
    """The answer split into its n parts (a tuple such as (out, idx, recon)), or one line saying what came back."""
    if not isinstance(got, (tuple, list)) or len(got) != n:
        what = f"{len(got)} values" if isinstance(got, (tuple, list)) else _kind(got)
        raise AssertionError(f"returned {what}; expected the {n} values {names}")
    return got


# ---------------------------------------------------------------------------------------------- the codebook layer
def check_codebook(codebook_forward):
    """codebook_forward(a (N, d), codes (M, d), k) -> (out (N, d), idx (N, k), recon ()) against CodebookLayer
    (one group, no LayerNorm): chosen codes, output, reconstruction loss, and gradients to a and to the codes.
    recon may be the layer's MSE (the mean over N * d coordinates, F.mse_loss) or the authors' form (summed over the
    d dimensions, averaged over the N tokens): the same loss up to the factor d, i.e. recon_coef = lambda * d."""
    torch.manual_seed(0)
    authors = False
    for k in (1, 3):
        layer = CodebookLayer(8, num_codes=16, k=k, layernorm=False)
        with torch.no_grad():
            layer.codes.mul_(torch.rand(1, 16, 1) * 3)  # codes of different lengths: cosine is not a dot product
        a = torch.randn(10, 8, requires_grad=True)
        codes = layer.codes.detach()[0].clone().requires_grad_(True)
        out, idx, recon = _parts(_missing(codebook_forward, a, codes, k), 3, "(out, idx, recon)")
        _tensor(out, "out")
        _tensor(idx, "idx")
        _tensor(recon, "recon")
        want = layer(a)
        want_idx = layer.last_indices.view(10, k)
        assert idx.shape == (10, k), f"idx has shape {tuple(idx.shape)}, expected (N, k) = (10, {k})"
        if not torch.equal(idx.long().sort(-1).values, want_idx.sort(-1).values):
            dot = (a @ codes.T).topk(k).indices
            hint = " (those are the top dot products: normalise a and the codes first)" if torch.equal(
                idx.long().sort(-1).values, dot.sort(-1).values) else ""
            raise AssertionError(f"k={k}: chosen codes differ, e.g. row 0 {idx[0].tolist()} instead of "
                                 f"{want_idx[0].tolist()}: take the top-k cosine similarities{hint}")
        assert out.shape == a.shape, f"out has shape {tuple(out.shape)}, expected {tuple(a.shape)}"
        assert torch.allclose(out, want, atol=1e-5), f"k={k}: the output should be the sum of the chosen codes"
        assert recon.numel() == 1, f"recon has shape {tuple(recon.shape)}: expected one number, a scalar tensor"
        d = a.shape[1]
        if torch.allclose(recon, layer.recon_loss * d, atol=1e-5):
            authors, scale = True, d  # summed over d, averaged over tokens: the authors' form
        elif torch.allclose(recon, layer.recon_loss, atol=1e-6):
            scale = 1
        else:
            raise AssertionError(f"k={k}: recon is {recon.item():.4f}, expected MSE(q, a.detach()) = "
                                 f"{layer.recon_loss.item():.4f} (or, summed over the d dimensions, "
                                 f"{d * layer.recon_loss.item():.4f})")
        if not recon.requires_grad:
            raise AssertionError("recon has no gradient: compute it from q = the sum of the chosen codes (codes[idx]), "
                                 "not from detached values; it is what trains the codes")
        g = torch.randn_like(out)
        ga, gc = torch.autograd.grad((out * g).sum() + recon, [a, codes], allow_unused=True)
        pull = 2 * scale * (a - want).detach() / a.numel()  # the gradient MSE(q, a) would send to a
        if ga is not None and torch.allclose(ga - g, pull, atol=1e-6):
            raise AssertionError("recon = MSE(q, a.detach()): the reconstruction loss trains the codes, not a")
        if ga is not None and torch.allclose(ga - g, -pull, atol=1e-6):
            raise AssertionError("recon compares out with a: compare q, the sum of the codes (out = q + a - "
                                 "a.detach() carries a's gradient, so the loss would push a towards the codes)")
        assert ga is not None and torch.allclose(ga, g, atol=1e-6), \
            "the gradient to a should be the upstream gradient itself: straight-through, out = q + a - a.detach()"
        from_recon = scale * torch.autograd.grad(layer.recon_loss, layer.codes, retain_graph=True)[0][0]
        (want * g).sum().add(scale * layer.recon_loss).backward()
        if gc is not None and torch.allclose(gc, from_recon, atol=1e-6):
            raise AssertionError("the codes learn from recon only: that is VQ-VAE's form, a + (q - a).detach(); here "
                                 "out = q + a - a.detach() lets the task loss train the chosen codes through q too")
        assert gc is not None and torch.allclose(gc, layer.codes.grad[0], atol=1e-5), \
            "the codes' gradient differs: the codes learn from the output (through q) and from " \
            "recon = MSE(q, a.detach())"
    note = (" (your recon sums over the d dimensions and averages over tokens, as the authors' code does: d times "
            "the layer's F.mse_loss, the same loss with recon_coef = lambda * d)") if authors else ""
    return "correct: cosine top-k, sum of codes, straight-through, reconstruction loss" + note


# ---------------------------------------------------------------------------------------------- k-means
def kmeans_reference(a, init, k, iters, assign="cosine", empty="keep"):
    """k-means of a (N, d) from init (M, d): `iters` rounds of "assign each row to its best code, move each code to
    the mean of its rows (a code without rows stays)", then divided by k. assign: "cosine" (CodebookLayer's),
    "dot" or "distance" (the usual mistakes); empty: "keep" (CodebookLayer's) or "init" (a code that loses its rows
    goes back to its starting value, a mistake). Returns (M, d)."""
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
        codes = torch.where(n > 0, sums / n.clamp(min=1), codes if empty == "keep" else init)
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


def emptied_data(seed=23):
    """Rows whose k-means empties a code after the first round: (a (40, 4), init (16, 4)), random. From these
    starting codes code 9 wins rows in round 1 and none in rounds 2 and 3, so it must keep its value of round 1
    (tests/test_workshop.py checks that this seed does)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(40, 4, generator=g) * (0.2 + 3 * torch.rand(40, 1, generator=g))
    return a, torch.randn(16, 4, generator=g)


BINCOUNT = ("if you count members with torch.bincount(best): it has max(best) + 1 entries, fewer than M when the "
            "last codes win no row: pass minlength=M (the number of codes)")


def check_kmeans(fn):
    """fn(a (N, d), init (M, d), k, iters) -> codes (M, d), against CodebookLayer.kmeans_init started from the same
    codes: clustered rows (k = 1 and 2, a code that never wins a row among them), unclustered ones (1 and 2 rounds)
    and rows that empty a code after the first round."""
    a, init = kmeans_data()
    g = torch.Generator().manual_seed(1)
    b = torch.randn(200, 8, generator=g) * (0.2 + 3 * torch.rand(200, 1, generator=g))  # no clusters: slow to settle
    e, e_init = emptied_data()
    for x, start, k, iters in ((a, init, 1, 5), (a, init, 2, 5), (b, b[:16], 1, 1), (b, b[:16], 1, 2),
                               (e, e_init, 1, 3)):
        layer = CodebookLayer(x.shape[1], num_codes=len(start), k=k, layernorm=False)
        layer.kmeans_iters = iters
        with mock.patch.object(codebook, "_distinct_rows", lambda rows, m: start.clone()):
            layer.kmeans_init(x.unsqueeze(1))  # (N, 1, d): one group
        want = layer.codes.detach()[0]
        got = _missing(fn, x.clone(), start.clone(), k, iters, hints=(("must match the size", BINCOUNT),
                                                                    ("The size of tensor", BINCOUNT)))
        _tensor(got, "the codes", tuple(want.shape))
        if torch.allclose(got.float(), want, atol=1e-5):
            continue
        got = got.float()
        if x is a and not torch.isfinite(got[-1]).all():
            raise AssertionError("the last code wins no activation and became NaN (the mean of nothing): a code "
                                 "without members keeps its value")
        if x is a and got[-1].abs().max() == 0:
            raise AssertionError("the last code wins no activation and became 0: a code without members keeps "
                                 "its value")
        if x is e and torch.allclose(got, kmeans_reference(x, start, k, iters, empty="init"), atol=1e-5):
            raise AssertionError("a code that wins rows in round 1 and none in round 2 went back to its starting "
                                 "value: a code without members keeps its value of the round before (the current "
                                 "codes, not init)")
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
    return "correct: cosine assignment, codes at the means of their members (emptied ones kept), divided by k"


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
    P, R = _parts(_missing(fn, c, y, 3, 5), 2, "(precision, recall)")  # label 2 and codes 3, 4 never occur
    _tensor(P, "precision")
    _tensor(R, "recall")
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
        P, R = _parts(_missing(fn, codes, labels, L, M), 2, "(precision, recall)")
        _tensor(P, "precision on the model's codes", (L, M))
        _tensor(R, "recall on the model's codes", (L, M))
        assert torch.allclose(P.float(), P0.float(), atol=1e-6) and torch.allclose(R.float(), R0.float(), atol=1e-6), \
            "right on the small case, wrong on the model's codes: check codes that never fire and unseen labels"
    return "correct: precision and recall match analyze.py"


# ---------------------------------------------------------------------------------------------- your layer in the model
def _codebook_model(model, site=None):
    """model's codebooks {name: layer}, or ValueError naming what was passed instead (one line)."""
    books = dict(model.codebooks()) if hasattr(model, "codebooks") else None
    if books is None:
        raise ValueError(f"expected a model (model.GPT), got {type(model).__name__}")
    if not books or not all(isinstance(b, CodebookLayer) for b in books.values()):
        raise ValueError("this model has no codebooks (the run without codebooks, or one with SAEs): pass `model`, "
                         "the codebook model of Section 3 (load_run(\"out-workshop\", \"cpu\"))")
    if site is not None and site not in books:
        raise ValueError(f"no codebook {site!r} in this model: its codebooks are {', '.join(books)}")
    return books


LAYER_RAISED = "layer.codes is (1, M, d) for one group: pass layer.codes[0]; x is (B, T, d): flatten it to " \
    "(B * T, d) first"


def check_your_layer(fn, model, fsm, site="h.0.mlp", eval_seqs=512, samples=1000, seed=1337):
    """fn(layer, x) -> out: the forward of the trained CodebookLayer `layer` (one group) written by the learner, put
    in place of the model's `site` codebook. Compares the logits, the chosen codes and the reconstruction loss on one
    batch with the layer's own, then evaluates the model with it as train.py does (evaluate_fsm with train.py's eval
    set and seed); says the loss and the valid transitions. ValueError for a model without codebooks."""
    layer = _codebook_model(model, site)[site]
    x, y = fsm.eval_set(eval_seqs, model.config.block_size)
    model.eval()
    seen = {}
    hook = layer.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        want, _, _ = model(x[:64])
    hook.remove()
    want_idx, want_recon = layer.last_indices.clone(), layer.recon_loss.detach().clone()
    with torch.no_grad():  # the learner's forward alone, on the input the layer had
        layer.last_indices = layer.recon_loss = None
        out = _missing(fn, layer, seen["x"], hints=tuple((key, LAYER_RAISED) for key in ("shape", "size", "dimension")))
        _tensor(out, "the output", tuple(seen["x"].shape))
        idx, recon = layer.last_indices, layer.recon_loss
        with layer_replaced(model, site, fn):
            got, _, _ = model(x[:64])
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
    if recon is None:
        raise AssertionError("layer.recon_loss is not set: store your recon there (layer.recon_loss = recon); "
                             "train.py adds recon_coef times it to the loss, so without it the codes stop learning")
    _tensor(recon, "layer.recon_loss")
    if not (torch.allclose(recon, want_recon, atol=1e-5) or torch.allclose(recon, want_recon * layer.dim, atol=1e-4)):
        raise AssertionError(f"layer.recon_loss is {recon.item():.4g}, the layer's is {want_recon.item():.4g}: the "
                             "reconstruction loss of the codes against a = layer.ln(x), from your codebook_forward")
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
    got = _tensor(_missing(fn, p, q), "the divergence")
    want = jsd(p, q)
    assert got.shape == want.shape, f"shape {tuple(got.shape)}: one divergence per row, {tuple(want.shape)}"
    if not torch.isfinite(got).all():
        raise AssertionError("not finite: 0 * log 0 counts as 0 (mask the zeros); and each KL compares with the "
                             "mixture m = (p + q) / 2, never 0 where p or q is not, not with the other distribution")
    if torch.allclose(got, want / torch.log(torch.tensor(2.0))):
        raise AssertionError("in bits: use the natural log (nats), as the paper's Fig. 4")
    assert torch.allclose(got, want, atol=1e-6), \
        f"{got.tolist()} instead of {want.tolist()}: JSD = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2"
    return "correct: JSD in nats"


# ---------------------------------------------------------------------------------------------- the state swap
def swap_reference(model, fsm, ctx_a, ctx_b, sites, positions="state+next", fill=-2, source="B"):
    """The state swap (steer.fsm_swap's, one site group): the next-state distribution (n, S + 1) of the contexts
    ctx_a (n, T) with the codes that ctx_b's run chose at `positions` patched into `sites`. The other arguments make
    the usual mistakes: positions "state" (A's digits only), "last" or "all" (every position); fill -1 (remove the
    codes elsewhere); source
    "A" (A's own codes)."""
    T, D = ctx_a.shape[1], fsm.digits
    pos = {"state+next": slice(T - D, T + D - 1), "state": slice(T - D, T), "last": slice(T - 1, T),
           "all": slice(0, T + D - 1)}[positions]
    _, _, codes = steer.next_state_dist(model, fsm, ctx_b if source == "B" else ctx_a, return_codes=True)
    patch = {}
    for s in sites:
        patch[s] = torch.full_like(codes[s], fill)
        patch[s][:, pos] = codes[s][:, pos]
    return steer.next_state_dist(model, fsm, ctx_a, patch)[0]


def success(fsm, p, B):
    """Mean probability that the next state is a successor of B, over rows of p (n, S + 1) and states B (n,)."""
    return (p[:, : fsm.num_states] * fsm.adj[B]).sum(1).mean().item()


def swap_contexts(fsm, pairs, seed=1):
    """Pairs (A, B) as steer.swap_pairs draws them, with longer contexts that differ before A and B: BOS, a
    predecessor of A (of B), then A (B). Returns (A (n,), B (n,), ctx_a (n, 1 + 2 D), ctx_b (n, 1 + 2 D)); the two
    predecessors differ, so patching B's codes at every position differs from patching them at the right ones."""
    A, B, _, _ = steer.swap_pairs(fsm, pairs, seed)
    g = torch.Generator().manual_seed(seed)
    pred = fsm.adj.t().float()  # (S, S): row s marks the states that lead to s
    pa = torch.multinomial(pred[A], 1, generator=g).squeeze(1)  # (n,)
    weights = pred[B].clone()
    weights[torch.arange(pairs), pa] = 0  # B's predecessor is not A's
    pb = torch.multinomial(weights + 1e-9 * (weights.sum(1, keepdim=True) == 0), 1, generator=g).squeeze(1)
    bos = torch.full((pairs, 1), fsm.EOT, dtype=torch.long)
    ctx = [torch.cat([bos, fsm.states_to_tokens(torch.stack([p, X], 1))], 1) for p, X in ((pa, A), (pb, B))]
    return A, B, ctx[0], ctx[1]


def check_swap(fn, model, fsm, pairs=40):
    """fn(model, fsm, ctx_a, ctx_b, sites) -> p (n, S + 1), the next-state distribution of A's contexts with B's codes
    patched in at `sites`, against swap_reference, on `pairs` pairs (A, B) of the paper's Fig. 4 protocol whose
    contexts differ before A and B (a predecessor state each), so that the positions patched matter."""
    names = list(_codebook_model(model))
    if pairs < 1:
        raise ValueError(f"pairs={pairs}: the check needs at least one pair (A, B)")
    A, B, ctx_a, ctx_b = swap_contexts(fsm, pairs)
    for sites in (names[: len(names) // 2], names[-1:]):  # layer 0's codebooks; the last one alone
        got = _missing(fn, model, fsm, ctx_a, ctx_b, sites)
        want = swap_reference(model, fsm, ctx_a, ctx_b, sites)
        _tensor(got, "p", tuple(want.shape))
        if torch.allclose(got, want, atol=1e-5):
            continue
        s, w = 100 * success(fsm, got, B), 100 * success(fsm, want, B)
        where = f"patching {', '.join(sites)}: " + (
            f"success {s:.1f}% where it should be {w:.1f}%" if abs(s - w) >= 0.05 else
            f"success {w:.1f}% as it should be, but the distribution differs by up to "
            f"{(got - want).abs().max().item():.3g}")
        mistakes = [
            (dict(positions="state"), "B's codes at A's digits only move the first digit: the next state's second "
             "digit is predicted at the positions after T - 1, whose codes must be B's too (T - D to T + D - 2)"),
            (dict(positions="last"), "B's codes at the last position only: patch every digit of A's state and of the "
             "next state (positions T - D to T + D - 2)"),
            (dict(positions="all"), "B's codes at every position, B's context before its state included: patch only "
             "A's state and the next state's digits (positions T - D to T + D - 2), the model's own codes before"),
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
    _codebook_model(model)
    if pairs < 1:
        raise ValueError(f"pairs={pairs}: the table needs at least one pair (A, B)")
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


# ---------------------------------------------------------------------------------------------- the TopK SAE
def sae_reference(x, W_enc, b_enc, W_dec, b_dec, k, var, pre_bias=True, relu=True, by="value", dec_bias=True,
                  decoder="W_dec", loss="fvu", values="pre"):
    """A TopK SAE's forward (sae.py's, Gao et al. 2024) on x (N, d), with M latents: W_enc, W_dec (M, d), b_enc (M,),
    b_dec (d,), var () the data's variance per coordinate. Returns (x_hat (N, d), z (N, M), loss ()). The other
    arguments make the usual mistakes: pre_bias=False (x not centred by b_dec before encoding), relu=False,
    by="abs" (top-k of |z_pre|), dec_bias=False, decoder="W_enc", loss "mse" (not divided by var), "sum" (summed
    over d), "token" (divided by each token's |x|^2 instead), values "one" (z = 1 where kept)."""
    z_pre = (x - b_dec if pre_bias else x) @ W_enc.T + b_enc  # (N, M)
    idx = (z_pre.abs() if by == "abs" else z_pre).topk(k, dim=-1).indices  # (N, k)
    kept = z_pre.gather(1, idx)
    kept = torch.ones_like(kept) if values == "one" else F.relu(kept) if relu else kept
    z = torch.zeros_like(z_pre).scatter(1, idx, kept)  # (N, M), at most k non-zero per row
    x_hat = z @ (W_dec if decoder == "W_dec" else W_enc) + (b_dec if dec_bias else 0)
    err = (x_hat - x).square()  # (N, d)
    out = {"fvu": err.mean() / var, "mse": err.mean(), "sum": err.sum(-1).mean() / var,
           "token": (err.sum(-1) / x.square().sum(-1)).mean()}[loss]
    return x_hat, z, out


def sae_case(seed=0, N=64, d=8, M=24, k=2):
    """Weights and activations for the SAE check: (x (N, d), W_enc, b_enc, W_dec, b_dec, var), W_dec's rows unit,
    biases non-zero (so that forgetting one shows), W_enc not W_dec (so that decoding with it shows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g) * 2 + torch.randn(d, generator=g)
    W_dec = F.normalize(torch.randn(M, d, generator=g), dim=-1)
    W_enc = W_dec + 0.3 * torch.randn(M, d, generator=g)
    b_enc = 0.5 * torch.randn(M, generator=g) - 2  # some rows keep negative pre-activations among their top k
    b_dec = x.mean(0) + 0.2 * torch.randn(d, generator=g)
    return x, W_enc, b_enc, W_dec, b_dec, (x - x.mean(0)).square().mean()


def sae_layer_reference(x, W_enc, b_enc, W_dec, b_dec, k, var):
    """sae.py's SAELayer (one group) with these weights: (x_hat (N, d), z (N, M), loss ()), its training loss."""
    M, d = W_dec.shape
    layer = SAELayer(d, M, k)
    with torch.no_grad():
        layer.codes.copy_(W_dec[None])
        layer.W_enc.copy_(W_enc[None])
        layer.b_enc.copy_(b_enc[None])
        layer.b_dec.copy_(b_dec[None])
        layer.var.fill_(float(var))
    a = x.unsqueeze(1)  # (N, 1, d)
    idx, values, _ = layer.encode(a)
    x_hat = layer.decode(idx, values)[:, 0]
    z = torch.zeros(len(x), M).scatter(1, idx[:, 0], values[:, 0])
    loss, _ = layer.loss(a)
    return x_hat, z, loss, layer


SAE_MISTAKES = [
    (dict(pre_bias=False), "encode x - b_dec, not x: the decoder's bias is subtracted before encoding (Gao et al.'s "
     "pre-encoder bias), so that b_dec is the activations' centre"),
    (dict(relu=False), "a kept pre-activation below 0 must become 0: ReLU of the top k (a latent fires with a "
     "positive value or not at all)"),
    (dict(by="abs"), "top-k of |z_pre| keeps large negative pre-activations: take the k largest values themselves"),
    (dict(values="one"), "a kept latent's value is its pre-activation (after ReLU), not 1: the SAE decodes "
     "amounts, a codebook codes"),
    (dict(dec_bias=False), "x_hat = z W_dec + b_dec: add the decoder's bias back"),
    (dict(decoder="W_enc"), "decode with W_dec (the unit-norm directions), not W_enc"),
    (dict(loss="mse"), "the loss is the MSE divided by var, the data's variance (the FVU, comparable across sites; "
     "Gao et al.'s normalised MSE)"),
    (dict(loss="sum"), "your loss sums the squared error over the d dimensions: average over them, as var does (the "
     "FVU: 1 means no better than the mean)"),
    (dict(loss="token"), "divide by var, the variance of the data over all tokens, not by each token's |x|^2"),
]


def check_sae(fn, saes=None, fsm=None, model=None):
    """fn(x (N, d), W_enc (M, d), b_enc (M,), W_dec (M, d), b_dec (d,), k, var ()) -> (x_hat (N, d), z (N, M),
    loss ()) against sae.py's SAELayer: x_hat, the latents, the loss and the gradients to the four weights, for k = 1
    and 2. With trained `saes` (one group each) and the `model` they sit in, also on its activations of 16 TokFSM
    sequences: your SAE reconstructs them as sae.py's does."""
    for k in (1, 2):
        x, W_enc, b_enc, W_dec, b_dec, var = sae_case(k)
        params = [t.clone().requires_grad_(True) for t in (W_enc, b_enc, W_dec, b_dec)]
        got = _parts(_missing(fn, x, *params, k, var), 3, "(x_hat, z, loss)")
        x_hat, z, loss = (_tensor(t, name, shape) for t, name, shape in zip(
            got, ("x_hat", "z", "loss"), (tuple(x.shape), (len(x), len(W_dec)), None)))
        want_hat, want_z, want_loss, layer = sae_layer_reference(x, W_enc, b_enc, W_dec, b_dec, k, var)
        if not (torch.allclose(x_hat, want_hat, atol=1e-5) and torch.allclose(z, want_z, atol=1e-5)
                and torch.allclose(loss, want_loss, atol=1e-6)):
            for kw, says in SAE_MISTAKES:
                alt = sae_reference(x, W_enc, b_enc, W_dec, b_dec, k, var, **kw)
                same = [torch.allclose(u, v, atol=1e-5) for u, v in zip((x_hat, z, loss), alt)]
                if all(same):
                    raise AssertionError(f"k={k}: {says}")
            if (z != 0).sum(1).max() > k:
                raise AssertionError(f"k={k}: z has up to {int((z != 0).sum(1).max())} non-zero latents in a row: keep "
                                     "the k largest pre-activations, zero the rest")
            what = [n for n, u, v in (("x_hat", x_hat, want_hat), ("z", z, want_z), ("loss", loss, want_loss))
                    if not torch.allclose(u, v, atol=1e-5)]
            raise AssertionError(f"k={k}: {', '.join(what)} differ from sae.py's: z_pre = (x - b_dec) W_enc^T + b_enc, "
                                 "keep the top k (ReLU), x_hat = z W_dec + b_dec, loss = MSE(x_hat, x) / var")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        want_loss.backward()
        for name, gp, ref in zip(("W_enc", "b_enc", "W_dec", "b_dec"), grads,
                                 (layer.W_enc, layer.b_enc, layer.codes, layer.b_dec)):
            if gp is None or not torch.allclose(gp, ref.grad[0], atol=1e-5):
                raise AssertionError(f"k={k}: the gradient to {name} differs from sae.py's (is part of the forward "
                                     "detached? the kept values must come from z_pre itself so that the encoder "
                                     "learns)")
    if saes is not None:
        if model is None or fsm is None:
            raise ValueError("check_sae(fn, saes, fsm, model): the trained SAEs need the model they sit in and its FSM")
        x, _ = fsm.eval_set(16, model.config.block_size)
        with torch.no_grad(), sae_bypassed(saes):
            model(x)  # each SAE records its input
            for s in saes:
                a = s.last_input[:, 0]  # (N, d)
                want = s.decode(*s.encode(s.last_input)[:2])[:, 0]
                got = fn(a, s.W_enc[0], s.b_enc[0], s.codes[0], s.b_dec[0], s.k, s.var[0])[0]
                if not torch.allclose(got, want, atol=1e-4):
                    raise AssertionError("right on the check's weights, wrong on the trained SAE's: largest "
                                         f"difference {(got - want).abs().max().item():.3g}")
    return "correct: pre-encoder bias, top-k with ReLU, unit-norm decoder, the FVU as loss; gradients as sae.py's"


class sae_bypassed:
    """Within the block the SAEs pass their inputs (and record them); afterwards each is as before."""

    def __init__(self, saes):
        self.saes, self.before = saes, [s.bypass for s in saes]

    def __enter__(self):
        for s in self.saes:
            s.bypass = True

    def __exit__(self, *exc):
        for s, b in zip(self.saes, self.before):
            s.bypass = b


def load_saes(model, save_dir):
    """The SAEs that `python sae.py` trained and saved in save_dir (sae.pt, results.json), spliced into `model` (the
    run without codebooks they were trained on) where its codebooks would sit. Returns (saes, results)."""
    path = os.path.join(save_dir, "sae.pt")
    if not os.path.isfile(path):
        raise ValueError(f"no {path}: run Section 3's training cell (it trains the SAE when the run without "
                         "codebooks is done)")
    saved = torch.load(path, map_location="cpu")
    cfg = saved["config"]
    saes = insert_saes(model, [s.strip() for s in cfg["sites"].split(",")], cfg["k"], cfg["num_latents"])
    for name, cb in model.codebooks():
        cb.load_state_dict(saved["saes"][name])
        cb.bypass = False
    with open(os.path.join(save_dir, "results.json")) as f:
        return saes, json.load(f)


# ---------------------------------------------------------------------------------------------- dictionaries
@torch.no_grad()
def dictionary_row(model, fsm, x, y):
    """A dictionary of features (codebooks, or SAEs spliced in as sae.py does) read like analyze.py reads codes, on
    eval sequences x, y (n, T): {"owning": states owning a feature of an MLP site (precision and recall >= 0.9),
    "of": states seen, "precision", "recall": means over the states of each state's best feature by F1, "fvu": {site:
    FVU} of the MLP sites, "loss": eval loss with the dictionary in place, "summary": fsm_analysis's summary}."""
    if not model.codebooks():
        raise ValueError("this model has no dictionary: splice SAEs into the run without codebooks (load_saes) or "
                         "pass the codebook model")
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
PINNED = ["--device=cpu", "--dtype=float32"]  # where the notebook's numbers were measured (not CUDA, not bf16)


def train_live(runs, switch=None, floor=None, every=2.0, then=None):
    """Train the runs {label: train.py arguments} at the same time, each a subprocess with its share of the CPU
    threads (on 2 cores, two runs at 1 thread each took 271 s where one after the other at 2 threads took 385 s), on
    the CPU in fp32 (PINNED, where the notebook's numbers were measured), redrawing as their logs grow: the training
    cross-entropy (the step `switch` where the codes go on and the entropy `floor` marked), the FVU of the codebooks
    and the valid transitions at each evaluation. then: {label: (run label, [script, arguments])}, scripts started
    with that run's threads as soon as it has finished (sae.py on the run without codebooks). Returns {label: log
    records} (for a `then` script, the lines it printed); raises RuntimeError with the end of the script's stderr if
    one fails, ValueError (one line) for runs without --out_dir."""
    import matplotlib.pyplot as plt
    from IPython.display import clear_output, display

    then = dict(then or {})
    if not runs:
        raise ValueError("no runs: pass {label: [train.py arguments]}")
    for label, args in runs.items():
        if not isinstance(args, (list, tuple)) or not any(str(a).startswith("--out_dir=") for a in args):
            raise ValueError(f"{label}: each run needs --out_dir=... among its train.py arguments (where its log is "
                             "read and its checkpoint written)")
    for label, (after, _) in then.items():
        if after not in runs:
            raise ValueError(f"{label}: waits for {after!r}, which is not among the runs ({', '.join(runs)})")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // len(runs)))}
    procs, outs, logs, waiting = {}, {}, {label: [] for label in runs}, dict(then)

    def start(label, cmd):
        err = tempfile.TemporaryFile("w+")  # stderr in a file: a pipe that nobody reads could fill and block
        out = tempfile.TemporaryFile("w+") if label in then else subprocess.DEVNULL  # a script's printed lines
        outs[label] = out
        procs[label] = (subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=out, stderr=err), err)

    for label, args in runs.items():
        start(label, ["train.py", *PINNED, *args])
    while True:
        for label, (after, cmd) in list(waiting.items()):
            if procs[after][0].poll() == 0:
                start(label, cmd)
                del waiting[label]
        done = not waiting and all(p.poll() is not None for p, _ in procs.values())
        for label, args in runs.items():
            out = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
            logs[label] = read_log(os.path.join(ROOT, out, "log.jsonl"))
        fig = plot_training(logs, switch, floor)
        if then:
            state = {lb: "waiting" if lb in waiting else "running" if procs[lb][0].poll() is None else "done"
                     for lb in then}
            fig.suptitle("; ".join(f"{lb}: {st}" for lb, st in state.items()), fontsize=9, y=1.02)
        clear_output(wait=True)
        display(fig)
        plt.close(fig)
        if done or any(p.poll() not in (None, 0) for p, _ in procs.values()) and all(
                p.poll() is not None for p, _ in procs.values()):
            break
        time.sleep(every)
    for label in then:
        if label in outs:
            outs[label].seek(0)
            logs[label] = outs[label].read().splitlines()
            outs[label].close()
    for label, (p, err) in procs.items():
        err.seek(0)
        said = err.read()
        err.close()
        if p.returncode != 0:
            script = (runs.get(label) and "train.py") or then[label][1][0]
            raise RuntimeError(f"{label}: {script} failed: {said[-500:]}")
    return logs


def plot_training(logs, switch=None, floor=None):
    """Three panels from {label: log records}: training cross-entropy, eval FVU, eval valid transitions (TokFSM) or
    next-token accuracy (a language model)."""
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
        key = "valid" if all("valid" in r["eval"] for r in ev) else "acc"  # a language model: next-token accuracy
        ax3.plot([r["iter"] for r in ev], [100 * r["eval"].get(key, math.nan) for r in ev], "o-", color=c, label=name)
    if switch is not None:
        for ax in (ax1, ax2, ax3):
            ax.axvline(switch, color="grey", ls=":", lw=1)
        ax1.text(switch, 0.98, " codes on", transform=ax1.get_xaxis_transform(), va="top", fontsize=8, color="grey")
    if floor is not None:
        ax1.axhline(floor, color="k", ls="--", lw=0.8)
        ax1.text(0, floor, "entropy floor", va="bottom", fontsize=8)
    ax1.set(xlabel="step", ylabel="nats/token", title="cross-entropy (training batches)")
    ax2.set(xlabel="step", ylabel="FVU", title="reconstruction: variance unexplained", ylim=(0, None))
    lm = any("eval" in r and "valid" not in r["eval"] for recs in logs.values() for r in recs)
    ax3.set(xlabel="step", ylabel="%", title="next-token accuracy" if lm else "valid transitions (sampled)", ylim=(0, 100))
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


# ---------------------------------------------------------------------------------------------- the story language
STORIES_DIR = os.path.join("data", "stories")  # data/prepare.py stories writes it (train.bin, val.bin, val_truth.npz)


def story_data(root=ROOT, data_dir=STORIES_DIR):
    """The story language's dataset for Section 7: runs `python data/prepare.py stories` (seconds) unless
    root/data_dir already holds val_truth.npz; returns data_dir. Raises RuntimeError with the end of its stderr if
    prepare.py fails."""
    if os.path.isfile(os.path.join(root, data_dir, "val_truth.npz")):
        return data_dir
    r = subprocess.run([sys.executable, "data/prepare.py", "stories"], cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"data/prepare.py stories failed: {r.stderr[-500:]}")
    print(r.stdout.strip())
    return data_dir


def show_story(lang, s, i=0):
    """Story i of a stories.Stories stream as text, each word that a topic slot wrote in [brackets] and each word a
    mood slot wrote in {braces}, after its two labels."""
    import numpy as np

    import stories

    idx = np.flatnonzero(s.story == i)
    words = []
    for j in idx:
        w = lang.decode([s.tokens[j]]).strip()
        prev_topic = j > 0 and s.topic_next[j - 1] and s.story[j - 1] == i  # the previous token says this one is a slot's
        prev_mood = j > 0 and s.mood_next[j - 1] and s.story[j - 1] == i
        words.append(f"[{w}]" if prev_topic else "{" + w + "}" if prev_mood else w)
    return (f"topic {stories.TOPIC_NAMES[s.topic[idx[0]]]}, mood {stories.MOOD_NAMES[s.mood[idx[0]]]}: "
            + " ".join(words))


def story_codes(model, data_dir=STORIES_DIR, max_tokens=65_536, batch_size=64):
    """The codes a story-language model chooses on consecutive windows of val.bin (as analyze.py and topics.py read
    them), flattened, with the truth at each token (stories.window_truth).

    Returns {"codes": {book: (N,) long, e.g. "h.0.attn_heads:3"}, "num_codes": {book: M}, "topic", "mood": (N,) long labels,
    "topic_where", "mood_where": (N,) bool, the tokens where that latent decides the next word (the next word is a
    slot's of that latent and the latent has been written in the window), "N": N}. Raises ValueError (one line) for
    a model without codebooks or with k > 1 codes per token, ConfigError for a dataset without the truth."""
    import stories
    from plumbing.configuration import ConfigError
    from plumbing.tokens import lm_batches, load_tokens

    books = model.books()
    if not books:
        raise ValueError("this model has no codebooks: train the story model of Section 7 (config/stories.py)")
    if any(cb.k != 1 for *_, cb in books):
        raise ValueError("story_codes reads one code per token (k=1); this model sums k > 1")
    truth = stories.load_truth(data_dir)
    if truth is None:
        raise ConfigError(f"{data_dir} has no val_truth.npz: it is not the story language (run story_data())")
    T = model.config.block_size
    val = load_tokens(data_dir, T, model.config.vocab_size)[1]
    col = collect_codes(model, [x for x, _ in lm_batches(val, T, max_tokens, batch_size)],
                        next(model.parameters()).device)
    wt = stories.window_truth(truth, col["tokens"].long(), val)
    out = {"codes": {book: col["codes"][site][:, :, g, 0].reshape(-1).long() for book, site, g, _ in books},
           "num_codes": {book: cb.num_codes for book, _, _, cb in books}}
    for latent in stories.LATENTS:
        out[latent] = wt[latent].reshape(-1)
        out[f"{latent}_where"] = (wt[f"{latent}_next"] * wt[f"{latent}_known"]).reshape(-1).bool()
    out["N"] = len(out["topic"])
    return out


def best_code_reference(codes, labels, where, value, num_values, num_codes, count="where", rank="f1"):
    """Exercise 7.1's answer, and the mistakes its check names: the code with the highest F1 for `value` at the
    tokens `where`, as (code, precision, recall). count="all" counts every token; rank="precision" or "recall" ranks
    by that alone."""
    sel = where if count == "where" else torch.ones_like(where)
    _, P, R = precision_recall(codes[sel].view(-1, 1), labels[sel], num_values, num_codes)
    P, R = P[value], R[value]  # (M,)
    score = {"f1": torch.where(P + R > 0, 2 * P * R / (P + R), torch.zeros_like(P)), "precision": P, "recall": R}[rank]
    c = int(score.argmax())
    return c, P[c].item(), R[c].item()


BEST_CODE_MISTAKES = [
    ({"count": "all"}, "counted over every token: count only where `where` is True, where the topic decides the next "
                       "word (elsewhere a topic code has no reason to fire, and other codes do the work)"),
    ({"rank": "precision"}, "ranked by precision alone: a code that fires once, on the topic, is precise by luck; "
                            "rank by F1 = 2PR / (P + R), which needs both"),
    ({"rank": "recall"}, "ranked by recall alone: a code that fires nearly everywhere finds every topic token; rank "
                         "by F1 = 2PR / (P + R), which needs both"),
]


def best_code_case():
    """A hand-made case for Exercise 7.1: (codes, labels, where, value=1, num_values=3, num_codes=6), where the right
    answer (code 0: P 5/6, R 5/12) differs from each mistake of BEST_CODE_MISTAKES."""
    rows = []  # (code, label, where, times)
    rows += [(0, 1, True, 5), (0, 0, True, 1)]  # the topic's code at the tokens that need the topic
    rows += [(1, 1, True, 1)]  # fires once, on the topic: precision 1, recall 1/12
    rows += [(2, 1, True, 6), (2, 0, True, 15), (2, 2, True, 15)]  # fires everywhere: recall 1/2, precision 1/6
    rows += [(4, 1, False, 40), (0, 0, False, 20), (3, 2, False, 10)]  # elsewhere: code 4 says the topic's words
    codes = torch.tensor([c for c, _, _, n in rows for _ in range(n)])
    labels = torch.tensor([v for _, v, _, n in rows for _ in range(n)])
    where = torch.tensor([w for _, _, w, n in rows for _ in range(n)])
    perm = torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))
    return codes[perm], labels[perm], where[perm], 1, 3, 6


def _number(x, name):
    """A Python number from an int, float or one-element tensor, or one line saying what came back."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return x
    raise AssertionError(f"{name} is {_kind(x) if not isinstance(x, torch.Tensor) else f'a tensor of shape {tuple(x.shape)}'}"
                         "; expected one number")


def _check_best(fn, case, where_said=""):
    codes, labels, where, value, L, M = case
    got = _missing(fn, codes, labels, where, value, L, M)
    if isinstance(got, (int, float, torch.Tensor)):
        raise AssertionError(f"returned one {'tensor' if isinstance(got, torch.Tensor) else 'number'}; expected the 3 "
                             "values (code, precision, recall)")
    got = _parts(got, 3, "(code, precision, recall)")
    c, p, r = _number(got[0], "the code"), _number(got[1], "the precision"), _number(got[2], "the recall")
    if not isinstance(c, int) or not 0 <= c < M:
        raise AssertionError(f"code {c!r}{where_said} is not a code: the codes are 0 to {M - 1}")
    want = best_code_reference(*case)
    if c != want[0]:
        for kw, said in BEST_CODE_MISTAKES:
            if best_code_reference(*case, **kw)[0] == c:
                raise AssertionError(f"code {c}{where_said}: {said}")
        _, P, R = precision_recall(codes[where].view(-1, 1), labels[where], L, M)
        f = lambda i: 2 * P[value, i] * R[value, i] / (P[value, i] + R[value, i]) if P[value, i] + R[value, i] else 0  # noqa: E731
        if f(c) < f(want[0]) - 1e-9:
            raise AssertionError(f"code {c}{where_said} has F1 {float(f(c)):.3f} for value {value}; code {want[0]} has "
                                 f"{float(f(want[0])):.3f}: return the code of highest F1")
        want = (c, P[value, c].item(), R[value, c].item())  # a tie: the learner's code is as good
    if abs(p - want[1]) > 1e-6 or abs(r - want[2]) > 1e-6:
        swapped = abs(p - want[2]) < 1e-6 and abs(r - want[1]) < 1e-6
        raise AssertionError(f"the right code {c}{where_said}, but precision {p:.4f} and recall {r:.4f} where they are "
                             f"{want[1]:.4f} and {want[2]:.4f}" + (": in the order (code, precision, recall)" if swapped
                                                                    else ", at the tokens `where`"))


def check_best_code(fn, story=None, value=0):
    """fn(codes (N,), labels (N,), where (N,) bool, value, num_values, num_codes) -> (code, precision, recall), the
    code with the highest F1 for the value at the tokens `where`, against best_code_reference: on best_code_case
    (where each mistake of BEST_CODE_MISTAKES gives another code) and, with story (story_codes), on every book of
    the story model for topic `value`."""
    _check_best(fn, best_code_case())
    if story is None:
        return "correct: the code of highest F1 at the tokens where the value decides the next word"
    import stories

    L = len(stories.TOPIC_NAMES)
    for book, codes in story["codes"].items():
        _check_best(fn, (codes, story["topic"], story["topic_where"], value, L, story["num_codes"][book]), f" of {book}")
    return f"correct: the best code of every head for topic {stories.TOPIC_NAMES[value]}, as the reference finds it"


def best_codes(fn, story, latent="topic"):
    """Every value's best code over all books by the learner's best_code: [(value name, book, code, P, R)]."""
    import stories

    names = stories.LATENTS[latent]
    out = []
    for v, name in enumerate(names):
        cands = []
        for book, codes in story["codes"].items():
            c, p, r = fn(codes, story[latent], story[f"{latent}_where"], v, len(names), story["num_codes"][book])
            c, p, r = int(c), float(p), float(r)
            cands.append((2 * p * r / (p + r) if p + r else 0.0, book, c, p, r))
        _, book, c, p, r = max(cands)
        out.append((name, book, c, p, r))
    return out


def check_code_meaning(answer, story, book, code):
    """Exercise 7.2: `answer` (a string such as "pirate" or "topic pirate") names the topic or mood that code
    `code` of `book` detects, by F1 where that latent decides the next word (what the explorer page's concept line
    shows for it)."""
    import stories

    if not isinstance(answer, str) or not answer.strip():
        raise AssertionError("not answered yet: set answer to the topic or mood the code detects, e.g. \"pirate\"")
    best = []  # (F1, latent, value name)
    for latent, names in stories.LATENTS.items():
        codes = story["codes"][book]
        w = story[f"{latent}_where"]
        _, P, R = precision_recall(codes[w].view(-1, 1), story[latent][w], len(names), story["num_codes"][book])
        F = torch.where(P + R > 0, 2 * P * R / (P + R), torch.zeros_like(P))[:, code]  # (L,)
        v = int(F.argmax())
        best.append((F[v].item(), latent, names[v], P[v, code].item(), R[v, code].item()))
    f, latent, name, p, r = max(best)
    said = answer.strip().lower().split()[-1]
    if said == name:
        return f"correct: {book}:{code} is {latent} {name} (precision {p:.2f}, recall {r:.2f} where it decides the next word)"
    known = {n for names in stories.LATENTS.values() for n in names}
    if said not in known:
        raise AssertionError(f"{answer!r} is not a topic or mood of the story language: one of {', '.join(sorted(known))}")
    raise AssertionError(f"{answer!r} is not what {book}:{code} detects: look it up again in the page (its concept "
                         "line, and the words around its top contexts)")


def steer_table(res):
    """steer_latents' results as lines: target, regex and truth rates without -> with forcing, other latent kept."""
    lines = [f"{'target':16s} {'regex':>17s} {'truth':>17s}  mood kept"]
    for name, r in res.items():
        lines.append(f"{name:16s} {100 * r['regex'][0]:6.1f}% -> {100 * r['regex'][1]:5.1f}% "
                     f"{100 * r['truth'][0]:6.1f}% -> {100 * r['truth'][1]:5.1f}%  {100 * r['other_kept']:5.1f}%")
    return "\n".join(lines)


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
