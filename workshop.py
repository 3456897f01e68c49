"""
Checks and helpers for workshop.ipynb: each `check_*` runs a learner's answer against this repository's own code
on known inputs and raises an AssertionError that says what is wrong; `train_live` trains with a live plot.
The answers themselves are in workshop_solutions.py.
"""

import json
import os
import subprocess
import sys
import time

import torch

from analyze import precision_recall
from codebook import CodebookLayer
from steer import jsd

HERE = os.path.dirname(os.path.abspath(__file__))


def _missing(fn, *args):
    try:
        return fn(*args)
    except NotImplementedError:
        raise AssertionError("not answered yet: replace `raise NotImplementedError` by your code") from None


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
        assert torch.allclose(recon, layer.recon_loss, atol=1e-6), \
            f"k={k}: recon is {recon.item():.4f}, expected MSE(q, a.detach()) = {layer.recon_loss.item():.4f}"
        g = torch.randn_like(out)
        ga, gc = torch.autograd.grad((out * g).sum() + recon, [a, codes], allow_unused=True)
        if ga is not None and torch.allclose(ga - g, 2 * (a - want).detach() / a.numel(), atol=1e-6):
            raise AssertionError("recon = MSE(q, a.detach()): the reconstruction loss trains the codes, not a")
        assert ga is not None and torch.allclose(ga, g, atol=1e-6), \
            "the gradient to a should be the upstream gradient itself: straight-through, out = q + a - a.detach()"
        (want * g).sum().add(layer.recon_loss).backward()
        assert gc is not None and torch.allclose(gc, layer.codes.grad[0], atol=1e-5), \
            "the codes' gradient differs: the codes learn from the output (through q) and from recon = MSE(q, a.detach())"
    return "correct: cosine top-k, sum of codes, straight-through, reconstruction loss"


def check_precision_recall(fn, codes=None, labels=None):
    """fn(codes (N,), labels (N,), num_labels, num_codes) -> (precision (L, M), recall (L, M)) against
    analyze.precision_recall, on a hand-made case and, when given, on a real model's codes and labels."""
    c = torch.tensor([0, 0, 1, 2, 2, 2])
    y = torch.tensor([0, 0, 0, 1, 1, 0])
    P, R = _missing(fn, c, y, 2, 3)
    assert P.shape == R.shape == (2, 3), f"shapes {tuple(P.shape)}, {tuple(R.shape)}: expected (labels, codes)"
    if not torch.allclose(P.float(), torch.tensor([[1.0, 1.0, 1 / 3], [0.0, 0.0, 2 / 3]])):
        raise AssertionError(f"precision {P.tolist()}: P[l, c] is the share of code c's firings that carry label l "
                             "(divide by how often the code fires)")
    if not torch.allclose(R.float(), torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])):
        raise AssertionError(f"recall {R.tolist()}: R[l, c] is the share of label l's positions where code c fires "
                             "(divide by how often the label occurs)")
    if codes is not None:
        L, M = int(labels.max()) + 1, int(codes.max()) + 1
        _, P0, R0 = precision_recall(codes.view(-1, 1), labels, L, M)
        P, R = fn(codes, labels, L, M)
        assert torch.allclose(P.float(), P0.float(), atol=1e-6) and torch.allclose(R.float(), R0.float(), atol=1e-6), \
            "right on the small case, wrong on the model's codes: check codes that never fire and unseen labels"
    return "correct: precision and recall match analyze.py"


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


def train_live(runs, every=2.0):
    """Train the runs {label: train.py arguments} one after another in subprocesses, redrawing the training loss
    and the valid-transition accuracy of every run so far as their logs grow. Returns {label: log records}."""
    import matplotlib.pyplot as plt
    from IPython.display import clear_output, display

    logs = {}
    for label, args in runs.items():
        out = next(a.split("=", 1)[1] for a in args if a.startswith("--out_dir="))
        proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=HERE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        while True:
            done = proc.poll() is not None
            logs[label] = read_log(os.path.join(HERE, out, "log.jsonl"))
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
            for name, recs in logs.items():
                ax1.plot([r["iter"] for r in recs if "ce" in r], [r["ce"] for r in recs if "ce" in r], label=name)
                ev = [r for r in recs if "eval" in r]
                ax2.plot([r["iter"] for r in ev], [100 * r["eval"]["valid"] for r in ev], "o-", label=name)
            ax1.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="training loss")
            ax2.set(xlabel="step", ylabel="%", title="valid transitions (sampled)", ylim=(0, 100))
            ax1.legend(), ax2.legend()
            clear_output(wait=True)
            display(fig)
            plt.close(fig)
            if done:
                break
            time.sleep(every)
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: train.py failed: {proc.stderr.read()[-500:]}")
    return logs


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
