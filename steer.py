"""
Control a codebook model by writing its codes (Codebook Features, Sections 4.3 and 5.3): force codes on,
remove codes, and patch in the codes of another FSM state, through each codebook layer's `hook` (and its
`banned` mask for "remove, then take the next best").

    python steer.py --out_dir=out                                   # TokFSM state steering: the swap, per site group
    python steer.py --out_dir=out --task=ablate --ablate=h.1.mlp:12,h.1.mlp:40 --ablate_to=zero
    python steer.py --out_dir=out --task=generate --start=42 --force=h.1.mlp:123 --num_samples=4
    python steer.py --out_dir=out-tinystories --task=generate --start="Once upon a time" --force=h.0.attn_heads:3:517
    python steer.py --out_dir=out-tinystories --task=ablate --ablate=h.0.attn_heads:3:517

Codes are named BOOK:CODE (model.py's names: `h.1.mlp:12`, `h.0.attn_heads:2:517` for head 2), comma-separated.
Forcing and removal apply at every prompt and generated token. Forcing (mode): "one" puts each forced code in
place of the lowest-scoring active code (the last slot of the top-k; as the paper does) unless it is active
already; "all" makes the forced codes the only active ones. Removal (ablate_to): "next" bans the code before the
top-k, so the next best takes its place; "zero" drops it (its slot adds nothing).

The FSM swap (paper Fig. 4). Pick random pairs (A, B) of states with disjoint successor sets. Build a context that
ends in A (BOS and A's digits, as the authors' protocol) and one that ends in B, and read the next state from each:
the context followed by every prefix of the next state's digits. At the sites of a
site group and at the patched positions, the A run's codes are replaced by those the B run chose there:
    patch="last"        the last token of the context;
    patch="state"       the D tokens of the final state;
    patch="state+next"  those and the digits of the next state as they are written (the default; the codes B's
                        context chooses for the same digits). Why: the next state's later digits are predicted
                        at its own positions, whose first attention layer reads the raw tokens of A; a patch of
                        the context alone moves the first digit to B's but leaves the rest to A (measured, RESULTS.md).
From the logits, the exact next-state distribution p(s) = prod_j p(digit_j of s | context, digits < j) (plus one
bucket for malformed continuations) and the next-token distribution are read for the patched A run and the plain
A and B runs. Averaged over the pairs:
    success   = p_patched(successors of B), exact, not sampled (the sets being disjoint, none is A's);
    jsd       = JSD(p_patched, p_B) / JSD(p_A, p_B) over next states, JSD(p, q) = KL(p || m) / 2 + KL(q || m) / 2,
                m = (p + q) / 2, natural log: 1 = no effect (the unpatched A context), 0 = exactly B;
    jsd_token = the same over the next token: the paper's Fig. 4 metric (there with patch="state").
Site groups: all, mlp, attn and each layer alone; with --state_codes (analyze.py's fsm.json) also "code": B's own
state code alone, forced at the last position of the context, in its MLP codebook. (topics.py steers text.)
"""

from plumbing.entry import cli  # first: a Ctrl-C while torch loads is one line (plumbing/__init__)
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

import report
from analyze import state_codes
from evaluate import evaluate_fsm, evaluate_lm
from fsm import TokFSM
from model import load_run
from plumbing.configuration import ConfigError, is_device, is_digits, parse_config, spec, split_list, validate
from plumbing.files import atomic_write
from plumbing.memory import check_steering
from plumbing.progress import progress
from plumbing.rundir import is_out_file
from plumbing.tokens import load_tokenizer, load_tokens


@dataclass
class SteerConfig:
    """Steering. Defaults: the TokFSM swap on out/ckpt.pt, 500 pairs."""

    out_dir: str = "out"  # the run whose ckpt.pt is steered
    task: str = spec("fsm", ("fsm", "generate", "ablate"))  # fsm: the swap
    force: str = ""  # codes to force on, BOOK:CODE,...
    ablate: str = ""  # codes to remove, BOOK:CODE,...
    mode: str = spec("one", ("one", "all"))  # forcing: replace the lowest-scoring active code, or all k
    ablate_to: str = spec("next", ("next", "zero"))  # removal: the next best code takes its place, or nothing
    start: str = ""  # generate: the prompt after BOS (TokFSM: digits, e.g. "42")
    num_samples: int = spec(4, ">= 1")  # generate: samples
    max_new_tokens: int = spec(200, ">= 1")  # generate: new tokens per sample (TokFSM: up to block_size)
    temperature: float = spec(1.0, ">= 0")  # 0 = greedy
    pairs: int = spec(500, ">= 1")  # fsm: random (A, B) state pairs
    patch: str = spec("state+next", ("last", "state", "state+next"))  # fsm: positions patched (module docstring)
    state_codes: str = ""  # fsm: analyze.py's fsm.json: also force B's own state code alone (the "code" row)
    dataset: Optional[str] = None  # LM: the data/prepare.py directory; None = the checkpoint's
    eval_seqs: int = spec(2048, ">= 1")  # ablate: eval sequences (TokFSM) or val windows (LM)
    seed: int = spec(1337, ">= 0")
    device: str = spec("auto", check=is_device)
    save: str = spec("", check=is_out_file)  # write the results as JSON to this file

    def __post_init__(self):
        validate(self)


# ---------------------------------------------------------------------------------------------- naming codes
def parse_codes(model, text):
    """"h.1.mlp:12,h.0.attn_heads:2:517" -> [(codebook, group, code)]; ConfigError naming what does not exist."""
    named, out = {book: (name, g, cb) for book, name, g, cb in model.books()}, []
    sites = dict(model.codebooks())
    listing = ", ".join(f"{s} ({cb.groups} heads, as {s}:0..{cb.groups - 1})" if cb.groups > 1 else s for s, cb in sites.items())
    for item in split_list(text):
        book, _, code = item.rpartition(":")
        if book not in named:
            what = f"site {book!r} has {sites[book].groups} heads: name one, e.g. {book}:0:{code}" if book in sites else \
                f"no codebook {book!r}"
            raise ConfigError(f"{what} (in {item!r}); this model has {listing or 'no codebooks'}")
        site, g, cb = named[book]
        if not is_digits(code) or not 0 <= int(code) < cb.num_codes:
            raise ConfigError(f"no code {code!r} at {book} (in {item!r}): it has codes 0-{cb.num_codes - 1}")
        out.append((site, g, int(code)))
    return out


# ---------------------------------------------------------------------------------------------- interventions
def force_codes(idx, forced, mode="one"):
    """Put the forced codes of each group into the top-k indices.

    Args:
        idx: (N, G, k) indices, best first; forced: {group: [codes]}; mode "one" or "all" (module docstring).
    Returns:
        (N, G, k): "one" writes each forced code not already active into the last slot not holding a forced
        code; "all" sets the slots to the forced codes, the rest to -1 (nothing).
    """
    idx = idx.clone()
    for g, codes in forced.items():
        x = idx[:, g]  # (N, k) a view
        if mode == "all":
            x.fill_(-1)
            x[:, : len(codes)] = torch.tensor(codes, device=idx.device)
            continue
        locked = torch.zeros_like(x, dtype=torch.bool)  # slots holding a forced code
        for c in codes:
            present = x == c
            locked |= present
            missing = ~present.any(1)  # (N,)
            free = (~locked).long() * torch.arange(1, x.shape[1] + 1, device=x.device)  # the last free slot wins
            slot = free.argmax(1)  # (N,)
            rows = missing.nonzero().flatten()
            x[rows, slot[rows]] = c
            locked[rows, slot[rows]] = True
    return idx


def drop_codes(idx, banned):
    """(N, G, k) indices with every code marked in banned (G, M) bool replaced by -1 (contributes nothing)."""
    g = torch.arange(idx.shape[1], device=idx.device).view(1, -1, 1)
    hit = banned[g.expand_as(idx), idx.clamp(min=0)] & (idx >= 0)
    return idx.masked_fill(hit, -1)


@contextmanager
def intervene(model, force=(), ablate=(), mode="one", ablate_to="next"):
    """Within the block, every forward of `model` forces and removes codes at every token.

    force, ablate: [(codebook, group, code)] as from parse_codes; mode "one" or "all", ablate_to "next" or "zero"
    (module docstring). Restores the codebooks' hooks and masks on exit. Raises ConfigError when more codes are
    forced into one group than it has slots (k)."""
    sites = dict(model.codebooks())
    saved = {s: (cb.hook, cb.banned) for s, cb in sites.items()}
    try:
        for site, cb in sites.items():
            forced = {}
            for s, g, c in force:
                if s == site:
                    forced.setdefault(g, []).append(c)
            if any(len(c) > cb.k for c in forced.values()):
                raise ConfigError(f"{site}: {max(map(len, forced.values()))} codes forced into one group, but k={cb.k}")
            banned = torch.zeros(cb.groups, cb.num_codes, dtype=torch.bool, device=cb.codes.device)
            for s, g, c in ablate:
                if s == site:
                    banned[g, c] = True
            if banned.any() and ablate_to == "next":
                cb.banned = banned
            drop = banned if banned.any() and ablate_to == "zero" else None
            if forced or drop is not None:
                cb.hook = lambda idx, f=forced, d=drop: force_codes(drop_codes(idx, d) if d is not None else idx, f, mode)
        yield model
    finally:
        for s, cb in sites.items():
            cb.hook, cb.banned = saved[s]


@contextmanager
def patched(model, new):
    """Within the block, replace chosen codes: new = {site: (N, G, k) long}, N = B * T of the next forwards,
    with -2 where the model's own choice stays. The patch holds for forwards of exactly that (B, T)."""
    sites = dict(model.codebooks())
    saved = {s: sites[s].hook for s in new}
    try:
        for s, n in new.items():
            sites[s].hook = lambda idx, n=n: torch.where(n >= -1, n, idx)
        yield model
    finally:
        for s in new:
            sites[s].hook = saved[s]


# ---------------------------------------------------------------------------------------------- TokFSM swap
def site_groups(model):
    """{group name: [codebooks]}: all, mlp, attn, layer0, layer1, ..., and each codebook alone (the paper's groups,
    e.g. h.0.attn_heads = "L0 attention"), those that hold codebooks."""
    sites = [s for s, _ in model.codebooks()]
    groups = {"all": sites, "mlp": [s for s in sites if "mlp" in s], "attn": [s for s in sites if "attn" in s]}
    for layer in range(model.config.n_layer):
        groups[f"layer{layer}"] = [s for s in sites if s.startswith(f"h.{layer}.")]
    return {**{name: s for name, s in groups.items() if s}, **{s: [s] for s in sites}}


@torch.no_grad()
def next_state_dist(model, fsm, ctx, new=None, return_codes=False):
    """Exact next-state distribution after each context, (n, S + 1) with the last column the malformed rest, and
    the next-token distribution (n, V), the paper's readout.

    The contexts (n, T), ending at a state's last digit, are run once per distinct prefix of the next state's
    first D - 1 digits, as rows (n * P, T + D - 1); their logits give every p(digit_j | context, digits < j).
    new: None, or {site: (n * P, T + D - 1, G, k)} codes to patch into those rows (-2 = keep the model's).
    return_codes: also return the codes chosen, {site: (n * P, T + D - 1, G, k)}, in the same layout.
    Returns (p_state, p_token) or (p_state, p_token, codes).
    """
    n, T = ctx.shape
    S, D = fsm.num_states, fsm.digits
    digits = fsm.states_to_tokens(torch.arange(S).unsqueeze(1))  # (S, D)
    if D > 1:
        prefixes, which = torch.unique(digits[:, : D - 1], dim=0, return_inverse=True)  # (P, D - 1), (S,)
    else:
        prefixes, which = digits[:1, :0], torch.zeros(S, dtype=torch.long)
    P = len(prefixes)
    dev = next(model.parameters()).device
    x = torch.cat([ctx.repeat_interleave(P, 0), prefixes.repeat(n, 1)], 1).to(dev)  # (n * P, T + D - 1)
    with patched(model, {s: c.flatten(0, 1).to(dev) for s, c in new.items()}) if new else nullcontext():
        logits, _, _ = model(x)
    logp = logits[:, T - 1 :].float().log_softmax(-1).cpu().view(n, P, D, -1)  # (n, P, D, V)
    lp = logp[:, which.unsqueeze(1), torch.arange(D).unsqueeze(0), digits]  # (n, S, D)
    p = lp.sum(-1).exp()  # (n, S)
    p = torch.cat([p, (1 - p.sum(1, keepdim=True)).clamp(min=0)], 1)
    token = logp[:, 0, 0].exp()  # (n, V): position T - 1 precedes every prefix, so any row of the context will do
    if return_codes:
        return p, token, {s: cb.last_indices.cpu().long() for s, cb in model.codebooks()}
    return p, token


def jsd(p, q):
    """Jensen-Shannon divergence (nats) between the rows of p and q, (n, K) -> (n,)."""
    m = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (a.clamp(min=1e-30).log() - b.clamp(min=1e-30).log()), torch.zeros_like(a)).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2


def swap_pairs(fsm, pairs, seed=0):
    """Random pairs (A, B) of states with disjoint successor sets and their contexts: (A (n,), B (n,), ctx_a (n, T),
    ctx_b (n, T)), each context BOS and the digits of A (or B)."""
    disjoint = ~(fsm.adj.float() @ fsm.adj.float().t()).bool()  # (S, S) successor sets share no state
    ok = disjoint.nonzero()  # candidate (A, B)
    if len(ok) == 0:
        raise ConfigError("no pair of states has disjoint successor sets in this FSM")
    A, B = ok[torch.randint(len(ok), (pairs,), generator=torch.Generator().manual_seed(seed))].t()
    bos = torch.full((pairs, 1), TokFSM.EOT, dtype=torch.long)
    return A, B, *(torch.cat([bos, fsm.states_to_tokens(X.unsqueeze(1))], 1) for X in (A, B))


def swap_scores(fsm, A, B, dists):
    """Per pair and run, the metrics of fsm_swap from {run: (p_state, p_token)} holding "none" (A) and "B":
    {run: (n, 5) success, stay, jsd (normalised, states), jsd_token (normalised, tokens), first_digit}."""
    S = fsm.num_states
    first = fsm.states_to_tokens(torch.arange(S).unsqueeze(1))[:, 0]  # (S,) first digit of each state
    pad = lambda m: torch.cat([m, torch.zeros(len(m), 1, dtype=torch.bool)], 1)  # noqa: E731 (+ malformed bucket)
    succ_a, succ_b = pad(fsm.adj[A]), pad(fsm.adj[B])  # (n, S + 1)
    starts_b = pad((first.view(1, S, 1) == first[fsm.succ[B]].unsqueeze(1)).any(-1))  # first digit as B's
    (p_a, t_a), (p_b, t_b) = dists["none"], dists["B"]
    base, base_t = jsd(p_a, p_b), jsd(t_a, t_b)
    return {name: torch.stack([(p * succ_b).sum(1), (p * succ_a).sum(1), jsd(p, p_b) / base, jsd(t, t_b) / base_t,
                               (p * starts_b).sum(1)], 1) for name, (p, t) in dists.items()}


SWAP_KEYS = ("success", "stay", "jsd", "jsd_token", "first_digit")


@torch.no_grad()
def fsm_swap(model, fsm, pairs=500, patch="state+next", groups=None, seed=0, batch=100, state_codes=None):
    """The swap of the module docstring, for each site group (default site_groups(model)).

    Returns {group: {"success", "stay": p(successors of A), "jsd": normalised over next states, "jsd_token":
    normalised over next tokens (the paper's Fig. 4), "first_digit": p(the next state's first digit begins a
    successor of B)}}, plus "none" (the plain A run: JSD 1) and "B" (the plain B run: the ceiling of success).
    patch: "last", "state" or "state+next". state_codes: {state: (codebook, group, code)}, each state's own code
    (analyze.py's); when given, group "code" forces B's code alone at the last position in place of the model's."""
    A, B, ctx_a, ctx_b = swap_pairs(fsm, pairs, seed)
    T, D = ctx_a.shape[1], fsm.digits
    pos = {"last": [T - 1], "state": list(range(T - D, T)), "state+next": list(range(T - D, T + D - 1))}[patch]
    groups = groups or site_groups(model)
    res = []
    for s in progress(range(0, pairs, batch), desc=f"swap ({patch})"):
        a, b, B_ = ctx_a[s : s + batch], ctx_b[s : s + batch], B[s : s + batch]
        p_b, t_b, codes_b = next_state_dist(model, fsm, b, return_codes=True)  # B's codes at every position
        dists = {"none": next_state_dist(model, fsm, a), "B": (p_b, t_b)}
        for name, sites in groups.items():
            new = {}
            for site in sites:
                new[site] = torch.full_like(codes_b[site], -2)
                new[site][:, pos] = codes_b[site][:, pos]
            dists[name] = next_state_dist(model, fsm, a, new)
        if state_codes:
            dists["code"] = next_state_dist(model, fsm, a, own_code(model, B_, state_codes, codes_b, T))
        res.append(swap_scores(fsm, A[s : s + batch], B_, dists))
    return {name: dict(zip(SWAP_KEYS, torch.cat([r[name] for r in res]).mean(0).tolist())) for name in res[0]}


def own_code(model, states, state_codes, like, T):
    """Patches (next_state_dist's `new`) that force each row's state's own code at position T - 1 (the state's last
    digit), in its codebook and group, into the last slot of the top-k (steer.py's "one" mode)."""
    new = {site: torch.full_like(c, -2) for site, c in like.items()}
    P = like[next(iter(like))].shape[0] // len(states)  # rows per context
    for i, st in enumerate(states.tolist()):
        if st in state_codes:
            site, g, code = state_codes[st]
            new[site][i * P : (i + 1) * P, T - 1, g, -1] = code
    return new


# ---------------------------------------------------------------------------------------------- generation, ablation
def encode_prompt(codec, start, fsm_run):
    """BOS/EOT followed by the prompt: digits for TokFSM, text for an LM."""
    if fsm_run:
        if not is_digits(start) and start:
            raise ConfigError(f"--start={start!r}: a TokFSM prompt is digits, e.g. --start=42")
        return [TokFSM.EOT] + [int(c) for c in start]
    return [codec.eot] + (codec.encode([start])[0] if start else [])


@torch.no_grad()
def generate(model, prompt, n, max_new_tokens, temperature=1.0, seed=0, **intervention):
    """n samples (n, len(prompt) + max_new_tokens) after a prompt (list of ids), under `intervene(**intervention)`."""
    dev = next(model.parameters()).device
    idx = torch.tensor([prompt] * n, dtype=torch.long, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with intervene(model, **intervention):
        return model.generate(idx, max_new_tokens, temperature=temperature, generator=gen).cpu()


def ablation(model, evaluate, **intervention):
    """evaluate(model) -> {metric: value}, without and under `intervene(**intervention)`, and the differences."""
    base = evaluate(model)
    with intervene(model, **intervention):
        abl = evaluate(model)
    return {k: {"base": base[k], "ablated": abl[k], "delta": abl[k] - base[k]} for k in base if k != "dead_pct"}


# ---------------------------------------------------------------------------------------------- main
def task_fsm(cfg, model, fsm):
    codes = state_codes(model, cfg.state_codes) if cfg.state_codes else None
    res = fsm_swap(model, fsm, cfg.pairs, cfg.patch, seed=cfg.seed, state_codes=codes)
    report.print_swap(res, cfg.pairs, cfg.patch)
    return res


def task_generate(cfg, model, fsm, codec):
    prompt = encode_prompt(codec, cfg.start, fsm is not None)
    new = min(cfg.max_new_tokens, model.config.block_size - len(prompt)) if fsm else cfg.max_new_tokens
    if new < 1:
        raise ConfigError(f"--start={cfg.start!r} leaves no room in block_size={model.config.block_size}: shorten it")
    out = generate(model, prompt, cfg.num_samples, new, cfg.temperature, cfg.seed, force=parse_codes(model, cfg.force),
                   ablate=parse_codes(model, cfg.ablate), mode=cfg.mode, ablate_to=cfg.ablate_to)
    res = {"samples": []}
    for row in out.tolist():
        text = " ".join(map(str, fsm.tokens_to_states(torch.tensor(row[1:])).tolist())) if fsm else codec.decode(row[1:])
        res["samples"].append(text)
        print(text)
        print("---------------")
    if fsm and out.shape[1] >= 2 * fsm.digits + 1:
        res["valid"] = fsm.transition_accuracy(out)[0]
        print(f"valid transitions: {100 * res['valid']:.1f}%")
    return res


def task_ablate(cfg, model, fsm, tc):
    ablate = parse_codes(model, cfg.ablate)
    if not ablate:
        raise ConfigError("--task=ablate needs --ablate=BOOK:CODE,...")
    T = model.config.block_size
    if fsm:
        x, y = fsm.eval_set(cfg.eval_seqs, T)
        evaluate = lambda m: evaluate_fsm(m, fsm, x, y, 1000, cfg.seed)  # noqa: E731
    else:
        _, val = load_tokens(cfg.dataset or tc["dataset"], T, model.config.vocab_size)
        ix = torch.arange(min(cfg.eval_seqs, (len(val) - 1) // T)) * T
        evaluate = lambda m: evaluate_lm(m, val, ix, 64)  # noqa: E731
    res = ablation(model, evaluate, ablate=ablate, ablate_to=cfg.ablate_to)
    model.eval()
    for k, r in res.items():
        print(f"  {k:10s} {r['base']:.4f} -> {r['ablated']:.4f}  (delta {r['delta']:+.4f})")
    return res


def main(argv):
    cfg = parse_config(argv, SteerConfig)
    ckpt, model = load_run(cfg.out_dir, cfg.device)
    if not model.codebooks():
        raise ConfigError(f"{cfg.out_dir} has no codebooks: nothing to steer; train with codebooks")
    tc = ckpt["train_config"]
    fsm = TokFSM(tc["num_states"], tc["num_edges"], tc["fsm_seed"]) if tc.get("dataset", "fsm") == "fsm" else None
    parse_codes(model, cfg.force), parse_codes(model, cfg.ablate)  # name errors first
    if fsm is None and cfg.task == "fsm":
        raise ConfigError(f"{cfg.out_dir} is a language model: --task=fsm needs a TokFSM run")
    check_steering(cfg, model.config, tc, cfg.device)  # sizes that cannot fit stop here
    codec = None if fsm else load_tokenizer(cfg.dataset or tc["dataset"])[0]
    torch.manual_seed(cfg.seed)
    res = {"fsm": lambda: task_fsm(cfg, model, fsm), "generate": lambda: task_generate(cfg, model, fsm, codec),
           "ablate": lambda: task_ablate(cfg, model, fsm, tc)}[cfg.task]()
    if cfg.save:
        with atomic_write(cfg.save) as f:
            json.dump({"config": cfg.__dict__, "results": res}, f, indent=1)


if __name__ == "__main__":
    cli(main)
