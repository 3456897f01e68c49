"""
Evaluation of a codebook model (Codebook Features, Sections 4 and 5), shared by train.py (every eval_interval),
steer.py (ablations) and analyze.py:

- TokFSM: loss, next-token accuracy, the exact probability mass on valid successors, and valid-transition and
  first-transition accuracy of sequences sampled at temperature 1 (fsm.py defines the metrics);
- language models: loss, next-token accuracy, perplexity, and dloss = the loss minus the loss of the same
  weights with every codebook bypassed (what the bottleneck costs);
- both, as dictionary-learning papers report them for sparse autoencoders (Gao et al. 2024, "Scaling and evaluating
  sparse autoencoders"): the % of dead codes (that no eval token selects), the fraction of variance unexplained
  FVU = sum |q - a|^2 / sum |a - mean(a)|^2 of each codebook's output q against its input a, in the space the codes
  live in (after the codebook's LayerNorm), and CE loss recovered = (L_zero - L) / (L_zero - L_bypass): L with the
  codes, L_zero with the codebook's output zeroed, L_bypass with the codebook bypassed (1 = the codes lose nothing,
  0 = no better than deleting the site). L0, the codes per token, is k per group.

A codebook model is trained with its codes, so L_bypass is a network it has not run since the switch (hence
recovered > 1), while for an SAE L_bypass is the original model. `recovered_vs_ref` = (L_zero - L) / (L_zero - L_ref)
puts both on one footing: L_ref is the loss of a reference model on the same data, the matching model trained without
codebooks (analyze.py's --ref_dir); for an SAE spliced into that model, L_ref = L_bypass and the two ratios agree.

The neuron baseline (paper Fig. 6a): the post-GELU activations of every MLP neuron (mlp_neurons), and for each
concept the single neuron with the highest precision at a given recall (neuron_baseline), against which codes and
SAE latents are read (analyze.py, sae.py).
"""

import contextlib
import functools
import math

import torch

from fsm import TokFSM
from model import load_run
from plumbing.configuration import ConfigError
from plumbing.tokens import lm_batches, load_tokens, token_windows


class Recorder:
    """Within the block, what the codebooks that are on do over several forwards: which codes they choose (dead %)
    and how well their outputs reconstruct their inputs (FVU), per codebook."""

    def __init__(self, model):
        self.books = [(name, cb) for name, cb in model.codebooks() if not cb.bypass]
        self.used = {n: torch.zeros(cb.groups, cb.num_codes, dtype=torch.bool, device=cb.codes.device)
                     for n, cb in self.books}
        self.sums = {n: torch.zeros(3, cb.dim, dtype=torch.float64, device=cb.codes.device) for n, cb in self.books}
        self.count = {n: 0 for n, _ in self.books}

    def __enter__(self):
        self.hooks = [cb.register_forward_hook(lambda m, i, o, n=n: self.record(n, m, i[0], o)) for n, cb in self.books]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    @torch.no_grad()
    def record(self, name, cb, x, out):
        a = x.reshape(-1, cb.groups, cb.dim // cb.groups)  # (N, G, d): the input, as the codes see it
        a = (cb.ln(a) if cb.ln is not None else a).reshape(-1, cb.dim).double()
        q = out.reshape(-1, cb.dim).double()  # the forward value of q + a - a.detach() is q
        s = self.sums[name]  # per dimension: sum (q - a)^2, sum a, sum a^2
        s += torch.stack([(q - a).square().sum(0), a.sum(0), a.square().sum(0)])
        self.count[name] += a.shape[0]
        idx = cb.last_indices.view(-1, cb.groups, cb.k)
        self.used[name].view(-1)[cb.flat_indices(idx)[idx >= 0]] = True

    def fvu(self, name=None):
        """FVU of one codebook, or of all of them together (their errors and variances summed)."""
        names = [name] if name else list(self.sums)
        sse = sum(self.sums[n][0].sum().item() for n in names)
        sst = sum((self.sums[n][2] - self.sums[n][1].square() / max(self.count[n], 1)).sum().item() for n in names)
        return sse / sst if sst > 0 else math.nan

    def dead_pct(self, name=None):
        """% of the codes (of one codebook, or of all) that no forward selected; 0 without codebooks."""
        used = [self.used[name]] if name else list(self.used.values())
        return 100 * (1 - torch.cat([u.flatten() for u in used]).float().mean().item()) if used else 0.0


@contextlib.contextmanager
def bypassed(model, names=None):
    """Within the block the codebooks `names` (default all) of `model` are bypassed: the weights without them."""
    cbs = [cb for n, cb in model.codebooks() if names is None or n in names]
    was = [cb.bypass for cb in cbs]
    try:
        for cb in cbs:
            cb.bypass = True
        yield model
    finally:
        for cb, b in zip(cbs, was):
            cb.bypass = b


@contextlib.contextmanager
def zeroed(model, names=None):
    """Within the block the outputs of the codebooks `names` (default all) are zero (the site is deleted)."""
    hooks = [cb.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
             for n, cb in model.codebooks() if names is None or n in names]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def mean_ce(model, batches, autocast=None, each=None):
    """(mean cross-entropy in nats/token, next-token accuracy) of `model` over a list of (x, y) batches (B, T);
    each(logits, y), when given, sees every batch's logits."""
    device, autocast = next(model.parameters()).device, autocast or contextlib.nullcontext()
    ce = correct = n = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, _, terms = model(x, y)
        ce += terms["ce"].item() * x.size(0)
        correct += (logits.argmax(-1) == y).float().mean().item() * x.size(0)
        n += x.size(0)
        if each is not None:
            each(logits, y)
    return ce / n, correct / n


def recovered(loss, loss_bypass, loss_zero):
    """CE loss recovered (module docstring); NaN when zeroing costs nothing. Pass a reference model's loss as
    loss_bypass for recovered_vs_ref."""
    return (loss_zero - loss) / (loss_zero - loss_bypass) if loss_zero != loss_bypass else math.nan


@torch.no_grad()
def dictionary_metrics(model, batches, autocast=None, per_codebook=True, loss_ref=None):
    """L0, FVU, dead and alive % and CE loss recovered (module docstring) of every codebook that is on, alone (the
    others kept), and of all of them together ("total"). batches: a list of (x, y). loss_ref: the loss (nats/token)
    of a reference model on the same batches; "total" then has loss_ref and recovered_vs_ref. Costs
    1 + 2 * (codebooks + 1) passes over the batches."""
    with Recorder(model) as rec:
        loss, _ = mean_ce(model, batches, autocast)
    names = [n for n, _ in rec.books] if per_codebook else []
    out = {}
    for name in [*names, None]:
        with bypassed(model, name and [name]):
            lb, _ = mean_ce(model, batches, autocast)
        with zeroed(model, name and [name]):
            lz, _ = mean_ce(model, batches, autocast)
        dead = rec.dead_pct(name)
        out[name or "total"] = {"L0": dict(rec.books)[name].k if name else None, "fvu": rec.fvu(name),
                                "dead_pct": dead, "alive_pct": 100 - dead, "loss": loss, "loss_bypass": lb,
                                "loss_zero": lz, "recovered": recovered(loss, lb, lz)}
    if loss_ref is not None:
        out["total"].update(loss_ref=loss_ref, recovered_vs_ref=recovered(loss, loss_ref, out["total"]["loss_zero"]))
    return out


def in_eval_mode(fn):
    """fn(model, ...) run with the model in eval mode (no usage counts, no k-means, no dropout), which is then given
    back in the mode, train or eval, it came in, also when fn raises."""
    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return run


@in_eval_mode
@torch.no_grad()
def evaluate_fsm(model, fsm, eval_x, eval_y, samples=1000, seed=1337, autocast=None, batch=256):
    """TokFSM metrics on the fixed eval set eval_x, eval_y (n, T), and of `samples` sequences sampled from BOS.

    Returns {"loss" (nats/token), "acc", "valid_mass", "valid", "first" (fractions), "dead_pct" (%), "fvu",
    "recovered"}; valid and first are NaN when the loss is not finite (sampling needs finite logits), fvu and
    recovered when no codebook is on. Runs in eval mode; the model is left in the mode it came in."""
    batches = list(zip(eval_x.split(batch), eval_y.split(batch)))
    mass = []
    with Recorder(model) as rec:
        loss, acc = mean_ce(model, batches, autocast, lambda logits, y: mass.append(
            fsm.valid_mass(logits.cpu(), y.cpu()) * y.size(0)))
    m = {"loss": loss, "acc": acc, "valid_mass": sum(mass) / eval_x.size(0), "valid": math.nan, "first": math.nan,
         "dead_pct": rec.dead_pct(), "fvu": rec.fvu(), "recovered": math.nan}
    if rec.books and math.isfinite(loss):
        with bypassed(model):
            lb, _ = mean_ce(model, batches, autocast)
        with zeroed(model):
            m["recovered"] = recovered(loss, lb, mean_ce(model, batches, autocast)[0])
    if math.isfinite(loss):
        device = next(model.parameters()).device
        bos = torch.full((samples, 1), TokFSM.EOT, dtype=torch.long, device=device)
        with autocast or contextlib.nullcontext():
            out = model.generate(bos, model.config.block_size - 1, temperature=1.0,
                                 generator=torch.Generator(device=device).manual_seed(seed))
        m["valid"], m["first"] = fsm.transition_accuracy(out.cpu())
    return m


@in_eval_mode
@torch.no_grad()
def evaluate_lm(model, val, eval_ix, batch, autocast=None):
    """Language-model metrics on the fixed val windows at offsets eval_ix of the token array `val`.

    Returns {"loss", "acc", "ppl", "loss_nocb", "dloss", "dead_pct", "fvu", "recovered"}: dloss = loss - loss_nocb,
    the loss with every codebook bypassed (0 while they all are, e.g. before codebook_start). Runs in eval mode; the
    model is left in the mode it came in."""
    batches = [token_windows(val, eval_ix[s : s + batch], model.config.block_size)
               for s in range(0, len(eval_ix), batch)]
    with Recorder(model) as rec:
        loss, acc = mean_ce(model, batches, autocast)
    loss_nocb, rec_ = loss, math.nan
    if rec.books:
        with bypassed(model):
            loss_nocb, _ = mean_ce(model, batches, autocast)
        with zeroed(model):
            rec_ = recovered(loss, loss_nocb, mean_ce(model, batches, autocast)[0])
    ppl = math.exp(min(loss, 709.0))  # exp overflows a float past 709.78
    return {"loss": loss, "acc": acc, "ppl": ppl, "loss_nocb": loss_nocb, "dloss": loss - loss_nocb,
            "dead_pct": rec.dead_pct(), "fvu": rec.fvu(), "recovered": rec_}


def reference_loss(ref_dir, train_config, model, batches, device):
    """The loss (nats/token) on `batches` of the run in ref_dir, which must be a run without codebooks on the data of
    `model` and its train_config (the analysed run's)."""
    ckpt, ref = load_run(ref_dir, device)
    tc = ckpt["train_config"]
    same = all(tc.get(k) == train_config.get(k) for k in ("dataset", "num_states", "num_edges", "fsm_seed"))
    if ref.codebooks() or not same or (ref.config.block_size, ref.config.vocab_size) != (model.config.block_size,
                                                                                         model.config.vocab_size):
        raise ConfigError(f"--ref_dir={ref_dir} must be a run without codebooks on the analysed run's data")
    return mean_ce(ref, batches)[0]


# ---------------------------------------------------------------------------------------------- codes as detectors
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


def f1(p, r):
    return torch.where(p + r > 0, 2 * p * r / (p + r), torch.zeros_like(p))


# ---------------------------------------------------------------------------------------------- single neurons
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


# ---------------------------------------------------------------------------------------------- analyze.py's data
def eval_batches(cfg, ckpt, model, fsm):
    """The data analyze.py reads as (x, y) batches: train.py's fixed TokFSM eval set (cfg.num_seqs sequences in
    batches of cfg.batch_size), or consecutive val windows (cfg.max_tokens tokens of cfg.dataset or the run's)."""
    T = model.config.block_size
    if fsm is not None:
        return list(zip(*(t.split(cfg.batch_size) for t in fsm.eval_set(cfg.num_seqs, T))))
    rows = max(1, min(cfg.batch_size, 2**26 // (T * model.config.vocab_size)))  # logits <= 256 MiB
    val = load_tokens(cfg.dataset or ckpt["train_config"]["dataset"], T, model.config.vocab_size)[1]
    return lm_batches(val, T, cfg.max_tokens, rows)
