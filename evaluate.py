"""
Evaluation of a codebook model (Codebook Features, Sections 4 and 5), shared by train.py (every eval_interval),
steer.py (ablations) and analyze.py:

- TokFSM: loss, next-token accuracy, the exact probability mass on valid successors, and valid-transition and
  first-transition accuracy of sequences sampled at temperature 1 (fsm.py defines the metrics);
- language models: loss, next-token accuracy, perplexity, and dloss = the loss minus the loss of the same
  weights with every codebook bypassed (what the bottleneck costs);
- both: the % of dead codes, codes that no eval token selects.
"""

import contextlib
import math

import torch

from fsm import TokFSM
from utils import token_windows


class CodeUsage:
    """Which codes the codebooks that are on choose over several forwards: call `update` after each."""

    def __init__(self, model):
        self.used = [(cb, torch.zeros(cb.groups, cb.num_codes, dtype=torch.bool, device=cb.codes.device))
                     for _, cb in model.codebooks() if not cb.bypass]

    def update(self):
        for cb, u in self.used:
            u.view(-1)[cb.flat_indices(cb.last_indices.view(-1, cb.groups, cb.k)).flatten()] = True

    def dead_pct(self):
        """% of the codes that no forward selected; 0 without codebooks."""
        return 100 * (1 - torch.cat([u.flatten() for _, u in self.used]).float().mean().item()) if self.used else 0.0


@contextlib.contextmanager
def bypassed(model):
    """Within the block every codebook of `model` is bypassed: the same weights without the bottleneck."""
    cbs = [cb for _, cb in model.codebooks()]
    was = [cb.bypass for cb in cbs]
    try:
        for cb in cbs:
            cb.bypass = True
        yield model
    finally:
        for cb, b in zip(cbs, was):
            cb.bypass = b


@torch.no_grad()
def evaluate_fsm(model, fsm, eval_x, eval_y, samples=1000, seed=1337, autocast=None, batch=256):
    """TokFSM metrics on the fixed eval set eval_x, eval_y (n, T), and of `samples` sequences sampled from BOS.

    Returns {"loss" (nats/token), "acc", "valid_mass", "valid", "first" (fractions), "dead_pct" (%)}; valid and first
    are NaN when the loss is not finite (sampling needs finite logits)."""
    model.eval()
    device, autocast = next(model.parameters()).device, autocast or contextlib.nullcontext()
    usage = CodeUsage(model)
    ce = correct = mass = n = 0.0
    for s in range(0, eval_x.size(0), batch):
        x, y = eval_x[s : s + batch].to(device), eval_y[s : s + batch].to(device)
        with autocast:
            logits, _, terms = model(x, y)
        ce += terms["ce"].item() * x.size(0)
        correct += (logits.argmax(-1) == y).float().mean().item() * x.size(0)
        mass += fsm.valid_mass(logits.cpu(), y.cpu()) * x.size(0)
        n += x.size(0)
        usage.update()
    valid = first = math.nan
    if math.isfinite(ce):
        bos = torch.full((samples, 1), TokFSM.EOT, dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(seed)
        with autocast:
            out = model.generate(bos, model.config.block_size - 1, temperature=1.0, generator=gen)
        valid, first = fsm.transition_accuracy(out.cpu())
    model.train()
    return {"loss": ce / n, "acc": correct / n, "valid_mass": mass / n, "valid": valid, "first": first,
            "dead_pct": usage.dead_pct()}


@torch.no_grad()
def evaluate_lm(model, val, eval_ix, batch, autocast=None):
    """Language-model metrics on the fixed val windows at offsets eval_ix of the token array `val`.

    Returns {"loss", "acc", "ppl", "loss_nocb", "dloss", "dead_pct"}: dloss = loss - loss_nocb, the loss with
    every codebook bypassed (0 while they all are, e.g. before codebook_start)."""
    model.eval()
    device, autocast = next(model.parameters()).device, autocast or contextlib.nullcontext()
    usage = CodeUsage(model)

    def run(track):
        ce = correct = 0.0
        for s in range(0, len(eval_ix), batch):
            x, y = token_windows(val, eval_ix[s : s + batch], model.config.block_size)
            x, y = x.to(device), y.to(device)
            with autocast:
                logits, _, terms = model(x, y)
            ce += terms["ce"].item() * x.size(0)
            correct += (logits.argmax(-1) == y).float().mean().item() * x.size(0)
            if track:
                usage.update()
        return ce / len(eval_ix), correct / len(eval_ix)

    loss, acc = run(track=True)
    loss_nocb = loss
    if usage.used:
        with bypassed(model):
            loss_nocb, _ = run(track=False)
    model.train()
    ppl = math.exp(min(loss, 709.0))  # exp overflows a float past 709.78
    return {"loss": loss, "acc": acc, "ppl": ppl, "loss_nocb": loss_nocb, "dloss": loss - loss_nocb,
            "dead_pct": usage.dead_pct()}
