"""
A TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), the field's standard
dictionary, as a baseline for codebooks on TokFSM. It is trained on the MLP outputs (or the attention heads'
outputs) of a TokFSM model *without* codebooks, with as many latents per site as the codebook model has codes,
then spliced into that model where a codebook would sit, and read out, measured and steered as codes are
(analyze.py, evaluate.py, steer.py). Codebooks change the model they explain; an SAE leaves it untouched.

    python train.py --codebook_sites= --out_dir=out-nocb    # the model without codebooks
    python sae.py --out_dir=out-nocb                        # k=1 SAEs on every MLP output -> out-nocb/sae-mlp-k1
    python sae.py --out_dir=out-nocb --k=4

Per site, on activations x (N, G, d) (G = n_head for the heads' outputs, else 1), with M latents per group:
    z_pre = (x - b_dec) W_enc^T + b_enc          # (N, G, M)
    z     = ReLU(TopK(z_pre, k))                 # the k largest pre-activations kept, negative ones zeroed
    x_hat = z W_dec + b_dec                      # W_dec's rows (the latents' directions) have unit norm
    loss  = MSE(x_hat, x) / var(x) + aux_coef * MSE(e_hat, r) / var(r),   r = x - x_hat
AuxK (Gao et al., Section A.2): e_hat = the same decoding of the top-k_aux pre-activations among the latents dead for
`dead_after` steps, which pushes dead latents towards what the live ones miss. As in their reference training code
(github.com/openai/sparse_autoencoder, train.py): var(x) is the variance of the data (per group, from the first
batch; the loss is then the FVU), var(r) that of the batch's residual, and the component of each decoder row's
gradient parallel to the row is removed before the Adam step, after which the rows are renormalised to unit norm.
Init as theirs: W_enc = W_dec, unit random directions, b_dec = the mean of the first batch (theirs: the geometric
median of a sample).
A latent "fires" at a token when it is among the top k with a positive value: its index then plays the part of a
code (analyze.py's readouts), and "dead" means it never fires on the eval set.

Outputs in save_dir (default <out_dir>/sae-<sites>-k<k>, written whole): sae.pt (the SAEs' weights and this config)
and results.json (states owning a latent, precision against the best neuron, FVU, CE loss recovered, dead latents,
training time, and the swap of state B's latents into state A's positions).
"""

from plumbing.entry import cli  # first: a Ctrl-C while torch loads is one line (plumbing/__init__)
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import steer
from analyze import collect_codes, fsm_analysis, fsm_readouts
from evaluate import bypassed, dictionary_metrics, mlp_neurons, neuron_baseline
from fsm import TokFSM
from model import load_run
from plumbing.configuration import ConfigError, is_device, is_out_dir, parse_config, spec, validate
from plumbing.memory import check_sae
from plumbing.progress import progress
from plumbing.rundir import claim, staged_dir


class SAELayer(nn.Module):
    """A (grouped) TopK sparse autoencoder that stands where a codebook would (module docstring), with the
    codebook's interface where analyze.py, evaluate.py and steer.py read it: groups, num_codes (latents per group),
    k, dim, ln (None), bypass (the site's own activations pass), last_indices (..., G, k) of the latents that fired
    (-1 for none), flat_indices, and `codes` (G, M, d), the decoder directions.

    Args:
        dim: activation size d. num_latents: M per group. k: latents kept per token and group. groups: G.
    Attributes:
        latent_hook: None or a callable (idx (N, G, k), values (N, G, k)) -> (idx, values) applied before decoding.
        recon_loss: always None (an SAE is trained by train_saes, never through the model's loss).
    """

    def __init__(self, dim, num_latents, k=1, groups=1):
        super().__init__()
        if dim % groups or not 1 <= k <= num_latents:
            raise ConfigError(f"an SAE needs groups dividing dim ({groups}, {dim}) and 1 <= k={k} <= {num_latents}")
        self.dim, self.num_codes, self.k, self.groups = dim, num_latents, k, groups
        d = dim // groups
        self.codes = nn.Parameter(F.normalize(torch.randn(groups, num_latents, d), dim=-1))  # W_dec: (G, M, d)
        self.W_enc = nn.Parameter(self.codes.detach().clone())  # (G, M, d)
        self.b_enc = nn.Parameter(torch.zeros(groups, num_latents))
        self.b_dec = nn.Parameter(torch.zeros(groups, d))
        self.register_buffer("var", torch.ones(groups))  # (G,) the data's variance per group, set by train_saes
        self.ln, self.bypass, self.latent_hook, self.recon_loss = None, True, None, None
        self.last_indices = self.last_input = self.last_latents = None

    def flat_indices(self, idx):
        """(N, G, k) latent ids -> rows of codes.view(G * M, d); -1 maps to its group's row 0."""
        return idx.clamp(min=0) + torch.arange(self.groups, device=idx.device).view(1, -1, 1) * self.num_codes

    def encode(self, a):
        """a (N, G, d) -> (idx (N, G, k), values (N, G, k), z_pre (N, G, M))."""
        z_pre = torch.einsum("ngd,gmd->ngm", a - self.b_dec, self.W_enc) + self.b_enc
        top = z_pre.topk(self.k, dim=-1)
        return top.indices, F.relu(top.values), z_pre

    def decode(self, idx, values):
        """(N, G, k) ids and values -> x_hat (N, G, d): the values times the latents' directions, summed, as
        codebook.lookup sums codes (embedding_bag: the backward adds into k rows, nothing (N, k, d) is held)."""
        N, G, k = idx.shape
        x = F.embedding_bag(self.flat_indices(idx).view(N * G, k), self.codes.view(G * self.num_codes, -1),
                            mode="sum", per_sample_weights=values.reshape(N * G, k))
        return x.view(N, G, -1) + self.b_dec

    def forward(self, x):
        a = x.reshape(-1, self.groups, self.dim // self.groups)  # (N, G, d)
        self.last_input = a.detach()
        if self.bypass:
            return x
        idx, values, _ = self.encode(a)
        if self.latent_hook is not None:
            idx, values = self.latent_hook(idx, values)
        self.last_latents = (idx, values)
        self.last_indices = torch.where(values > 0, idx, -1).view(*x.shape[:-1], self.groups, self.k)
        return self.decode(idx, values).view(x.shape)

    def loss(self, a, dead=None, aux_coef=1 / 32, k_aux=32):
        """The training loss on activations a (N, G, d), averaged over the groups: MSE of the reconstruction over
        self.var, plus AuxK (its MSE over the residual's variance in this batch) when `dead` (G, M) bool marks dead
        latents (module docstring). Returns (loss, latents that fired (N, G, k) ids)."""
        idx, values, z_pre = self.encode(a)
        x_hat = self.decode(idx, values)
        loss = ((x_hat - a).square().mean((0, 2)) / self.var).mean()
        if dead is not None and dead.any() and aux_coef > 0:
            top = z_pre.masked_fill(~dead.unsqueeze(0), float("-inf")).topk(min(k_aux, int(dead.sum(1).max())), -1)
            e_hat = self.decode(top.indices, F.relu(top.values).nan_to_num(0.0)) - self.b_dec
            r = (a - x_hat).detach()  # (N, G, d) what the live latents miss
            aux = (e_hat - r).square().mean((0, 2)) / (r - r.mean(0)).square().mean((0, 2))  # (G,)
            loss = loss + aux_coef * aux.nan_to_num(0.0).mean()
        return loss, torch.where(values > 0, idx, -1)

    @torch.no_grad()
    def project_decoder_grad_(self):
        """Remove from each decoder row's gradient its component along the (unit) row: to first order a step then
        turns the direction and leaves its norm, which normalize_ keeps at 1."""
        u = F.normalize(self.codes, dim=-1)  # (G, M, d)
        self.codes.grad -= (self.codes.grad * u).sum(-1, keepdim=True) * u

    @torch.no_grad()
    def normalize_(self):
        self.codes.div_(self.codes.norm(dim=-1, keepdim=True).clamp(min=1e-8))


@dataclass
class SAEConfig:
    """TopK SAEs on a TokFSM model without codebooks. Defaults: k=1, 1,000 latents per MLP output (the codes of
    the default codebook model), 3,000 steps of 128 sequences."""

    out_dir: str = "out-nocb"  # the run (without codebooks) whose activations are encoded
    save_dir: Optional[str] = spec(None, check=is_out_dir)  # None = <out_dir>/sae-<sites>-k<k>
    sites: str = spec("mlp", each=("mlp", "attn_heads"))  # where, in every layer
    k: int = spec(1, ">= 1")
    num_latents: int = spec(1000, ">= 1")  # per site and group, as num_codes
    steps: int = spec(3000, ">= 1")
    batch_size: int = spec(128, ">= 1")  # sequences per step
    lr: float = spec(1e-3, "> 0")
    aux_coef: float = spec(1 / 32, ">= 0")  # AuxK
    dead_after: int = spec(200, ">= 1")  # steps without firing that make a latent dead for AuxK
    num_seqs: int = spec(4096, ">= 1")  # eval sequences for the readouts
    pairs: int = spec(500, ">= 1")  # the swap
    seed: int = spec(1337, ">= 0")
    device: str = spec("auto", check=is_device)

    def __post_init__(self):
        validate(self)
        self.save_dir = self.save_dir or os.path.join(self.out_dir, f"sae-{'-'.join(self.sites.split(','))}-k{self.k}")
        claim(self.save_dir, "sae", "save_dir")  # before any work: no other kind, no user's folder


def insert_saes(model, sites, k, num_latents):
    """Put an SAE (bypassed) at each site of every layer of `model`, in the codebooks' place. Returns them."""
    c = model.config
    for block in model.transformer.h:
        for site in sites:
            block.codebooks[site] = SAELayer(c.n_embd, num_latents, k, c.n_head if site == "attn_heads" else 1)
    return [cb for _, cb in model.codebooks()]


def train_saes(model, fsm, saes, cfg, log_every=500):
    """Train the SAEs on the activations of fresh TokFSM batches (the model is frozen and its outputs unchanged)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam([p for s in saes for p in s.parameters()], lr=cfg.lr)
    since = [torch.zeros(s.groups, s.num_codes, dtype=torch.long) for s in saes]  # steps since each latent fired
    for step in progress(range(cfg.steps), desc="training SAEs"):
        x, _ = fsm.batch(cfg.batch_size, model.config.block_size, gen)
        with torch.no_grad():
            model(x.to(next(model.parameters()).device))  # the bypassed SAEs record their inputs
        total = 0.0
        for s, idle in zip(saes, since):
            if step == 0:  # the first batch sets b_dec and the variance that normalises the loss
                s.b_dec.data.copy_(s.last_input.mean(0))
                s.var.copy_((s.last_input - s.last_input.mean(0)).square().mean((0, 2)).clamp(min=1e-12))
            loss, fired = s.loss(s.last_input, idle.to(s.codes.device) >= cfg.dead_after, cfg.aux_coef)
            loss.backward()
            s.project_decoder_grad_()
            hit = torch.zeros_like(idle, dtype=torch.bool).view(-1)
            hit[s.flat_indices(fired)[fired >= 0].cpu()] = True
            idle.add_(1).masked_fill_(hit.view_as(idle), 0)
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for s in saes:
            s.normalize_()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            print(f"step {step + 1}: loss {total / len(saes):.5f}, latents dead for {cfg.dead_after} steps "
                  f"{100 * torch.cat([(i >= cfg.dead_after).flatten() for i in since]).float().mean():.1f}%")


@contextmanager
def patched_latents(saes, kept, pos):
    """Within the block, at the positions `pos` of rows (N, T) laid out as `kept`, each SAE decodes the latents of
    kept[sae] = (idx, values) (N, T, G, k) instead of its own."""
    def hook(kept_idx, kept_val):
        def fn(idx, values):
            N, T = kept_idx.shape[:2]
            at = torch.zeros(N, T, 1, 1, dtype=torch.bool, device=idx.device)
            at[:, pos] = True
            idx, values = idx.view_as(kept_idx), values.view_as(kept_val)
            return (torch.where(at, kept_idx, idx).flatten(0, 1), torch.where(at, kept_val, values).flatten(0, 1))
        return fn
    try:
        for s in saes:
            s.latent_hook = hook(*kept[s])
        yield
    finally:
        for s in saes:
            s.latent_hook = None


@torch.no_grad()
def sae_swap(model, fsm, saes, pairs=500, seed=0, patch="state", batch=100):
    """steer.fsm_swap for SAEs: state B's latents (ids and values) patched into state A's `patch` positions at
    every SAE site ("all") and layer by layer. Returns {run: {success, stay, jsd, jsd_token, first_digit}}."""
    A, B, ctx_a, ctx_b = steer.swap_pairs(fsm, pairs, seed)
    T, D = ctx_a.shape[1], fsm.digits
    pos = {"state": list(range(T - D, T)), "state+next": list(range(T - D, T + D - 1))}[patch]
    layers = {f"layer{i}": [s for s in saes if s in list(b.codebooks.values())] for i, b in enumerate(model.transformer.h)}
    groups = {"all": saes, **{n: s for n, s in layers.items() if s}}
    res = []
    for s in range(0, pairs, batch):
        a, b = ctx_a[s : s + batch], ctx_b[s : s + batch]
        dists = {"B": steer.next_state_dist(model, fsm, b)}
        kept = {x: tuple(t.view(-1, T + D - 1, *t.shape[1:]) for t in x.last_latents) for x in saes}  # (rows, T, G, k)
        dists["none"] = steer.next_state_dist(model, fsm, a)
        for name, group in groups.items():
            with patched_latents(group, kept, pos):
                dists[name] = steer.next_state_dist(model, fsm, a)
        res.append(steer.swap_scores(fsm, A[s : s + batch], B[s : s + batch], dists))
    return {name: dict(zip(steer.SWAP_KEYS, torch.cat([r[name] for r in res]).mean(0).tolist())) for name in res[0]}


def readouts(model, fsm, saes, cfg):
    """What analyze.py, evaluate.py and steer.py report for codes, for the SAEs' latents."""
    x, y = fsm.eval_set(cfg.num_seqs, model.config.block_size)
    dev = next(model.parameters()).device
    col = collect_codes(model, x.split(256), dev)
    col["books"] = model.books()
    with bypassed(model):  # the latents were read above; the neurons are those of the model itself, SAEs out
        summary, _, _ = fsm_analysis(col, fsm, model, dev)
    dictionary = dictionary_metrics(model, list(zip(x.split(256), y.split(256))))
    swap = {p: sae_swap(model, fsm, saes, cfg.pairs, cfg.seed, p) for p in ("state", "state+next")}
    with bypassed(model):  # the neurons as a dictionary of their own: each state's best neuron at recall 0.9
        rows, cols, labels = fsm_readouts(col["tokens"], fsm)["state"]
        prec, _, _ = neuron_baseline(mlp_neurons(model, col["tokens"], rows, cols, 256, dev), labels,
                                     torch.full((fsm.num_states,), 0.9))
    seen = torch.bincount(labels, minlength=fsm.num_states) > 0
    neurons = {"states_owning": int(((prec >= 0.9) & seen).sum()), "of": int(seen.sum()),
               "mean_precision": prec[seen].mean().item()}
    return {"states": summary, "dictionary": dictionary, "swap": swap, "neurons_at_recall_0.9": neurons}


def main(argv):
    cfg = parse_config(argv, SAEConfig)
    ckpt, model = load_run(cfg.out_dir, cfg.device)
    tc = ckpt["train_config"]
    if tc.get("dataset", "fsm") != "fsm" or model.codebooks():
        raise ConfigError(f"{cfg.out_dir} must be a TokFSM run without codebooks (train one with --codebook_sites=)")
    for p in model.parameters():
        p.requires_grad_(False)
    check_sae(cfg, model.config, tc, cfg.device)  # sizes that cannot fit stop here
    fsm = TokFSM(tc["num_states"], tc["num_edges"], tc["fsm_seed"])
    torch.manual_seed(cfg.seed)
    saes = insert_saes(model, [s.strip() for s in cfg.sites.split(",")], cfg.k, cfg.num_latents)
    model.to(next(model.parameters()).device)
    t0 = time.time()
    train_saes(model, fsm, saes, cfg)
    train_s = time.time() - t0
    for s in saes:
        s.bypass = False
    res = {"config": asdict(cfg), "train_s": train_s, **readouts(model, fsm, saes, cfg)}
    m, d = res["states"].get("mlp"), res["dictionary"]["total"]
    if m:  # state latents are read on the MLP sites, as state codes
        print(f"states owning a latent: {m['states_owning_code']} of {m['of']} at every state, "
              f"{m['states_owning_code_first']} of {m['of_first']} at the first state; mean precision "
              f"{100 * m['mean_precision']:.1f}% (best neuron {100 * res['states']['neurons']['mean_precision']:.1f}%)")
    print(f"FVU {d['fvu']:.3f}, CE loss recovered {d['recovered']:.3f}, dead latents {d['dead_pct']:.1f}%, "
          f"trained in {train_s:.0f} s")
    n = res["neurons_at_recall_0.9"]
    print(f"single MLP neurons of the model, each state's best at recall 0.9: {n['states_owning']} of {n['of']} states "
          f"reach precision 0.9, mean precision {100 * n['mean_precision']:.1f}%")
    for p, r in res["swap"].items():
        print(f"swap at the {p} positions: " + ", ".join(f"{n} {100 * v['success']:.1f}% (JSD state {v['jsd']:.3f}, "
                                                       f"token {v['jsd_token']:.3f})" for n, v in r.items()))
    with staged_dir(cfg.save_dir, "sae") as out:
        torch.save({"saes": {n: s.state_dict() for n, s in model.codebooks()}, "config": asdict(cfg)},
                   os.path.join(out, "sae.pt"))
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(f"wrote {cfg.save_dir}: sae.pt, results.json")


if __name__ == "__main__":
    cli(main)
