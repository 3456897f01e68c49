"""
What a configuration needs against what the machine has: each entry point estimates the memory of its
configuration before its first big allocation (`check_training`, `check_sampling`, ...) and refuses, in one line, a
size that cannot fit, instead of ending in the allocator's traceback or swallowing the machine (`check`).

The limit (`available`): CODEBOOK_MEMORY_LIMIT (bytes, e.g. 2e9) when set; else on CUDA the device's free memory
(torch.cuda.mem_get_info), elsewhere MemAvailable of /proc/meminfo (os.sysconf without it) shared by the node's
torchrun ranks.

The estimate is simple on purpose: the bytes of the big tensors, fp32 (a training run under bf16 autocast: its
layers' activations in bf16, 2 bytes; its logits, weights and optimizer in fp32), int64 token ids, nothing for
torch itself (its kernels' pages, about 0.1 GB on a CPU). A run needs what it keeps (weights, optimizer, eval
sets, collected codes) plus its largest phase (a training step, an evaluation, sampling), each a sum of terms.
With C = n_embd, H = the MLP's width, V = vocab_size, T = block_size, L = n_layer, and for each codebook G groups
of M codes:
- weights: P = V C (twice untied) + T C (learned positions) + L (4 C^2 + 2 C H + 9 C + H) + M C per codebook; 4 P
  bytes, 16 P to train (gradients and AdamW's two moments); each codebook adds 3 G M int64 counters;
- activations of a training forward over N tokens, kept for the backward: N (L (12 C + 2 H) + 3 C per codebook) x
  2 or 4 bytes (the autocast's dtype) + 3 N V x 4; without gradients the live ones of one layer,
  N (6 C + 2 H + 3 V) x 4; and the codes each codebook chose last, N G k x 8;
- codebook scores while a codebook scores N tokens (codebook.topk_codes): a normalised copy of its codes and one
  chunk of scores, (M C + G min(N, rows per chunk) M) x 4, for the largest codebook;
- sampling n sequences: the key/value cache n (L + 1) 2 T C x 4, the token array (twice while it grows), a one-token
  forward, and past block_size a full-window forward for each new token;
- what each tool collects: eval sets (16 bytes a token), chosen codes, concept tables, neuron activations, the swap's
  pairs and results; the function of each entry point below says which.
tests/test_memory.py checks the estimate against the measured peak (`peak`) of a few configurations, within a factor
of 2, and that every size option of every entry point is refused at an absurd value, before any allocation.
"""

import ctypes
import dataclasses
import math
import os

from plumbing.configuration import ConfigError, device_of, environment, split_list

F32, I64 = 4, 8
KMEANS_MAX_TOKENS = 65_536  # codebook.py's bound on the rows of k-means (tests/test_memory.py checks they agree)


# ---------------------------------------------------------------------------------------------- the limit, the check
def available(device="cpu"):
    """Bytes this process may still allocate on `device` (module docstring). Raises ConfigError for a
    CODEBOOK_MEMORY_LIMIT that is not a finite number of bytes > 0 (configuration.ENVIRONMENT)."""
    limit = environment("CODEBOOK_MEMORY_LIMIT")
    if limit is not None:
        return limit
    device = device_of(str(device))
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return float(free) / environment("LOCAL_WORLD_SIZE", 1)


def size(n):
    """Bytes as text in decimal units: 512 B, 3.4 MB, 37.2 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.0f} EB"


def need(estimate, v):
    """(bytes, {term: bytes}) of estimate(v) = ({kept term: bytes}, [{phase term: bytes}, ...]): what is kept plus
    the largest phase, and the terms of that sum."""
    kept, phases = estimate(v)
    terms = dict(kept)
    for name, b in max(phases, key=lambda p: sum(p.values()), default={}).items():
        terms[name] = terms.get(name, 0) + b
    return sum(terms.values()), terms


def fit(estimate, v, key, bound, limit):
    """The value of option `key` nearest its current one, between it and `bound`, at which the estimate fits in
    `limit` bytes (assuming it grows with the option's distance from bound), or None if even `bound` does not."""
    at = lambda x: need(estimate, {**v, key: x})[0]  # noqa: E731
    if at(bound) > limit:
        return None
    good, bad = bound, v[key]
    while abs(good - bad) > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if at(mid) <= limit else (good, mid)
    return good


def check(estimate, v, options, device, usual=None, first=None):
    """Raise ConfigError when estimate(v) needs more than `available(device)`: one line with the estimate and its
    largest terms, the limit, the options that alone would make it fit, each with the value that would, and the
    CODEBOOK_MEMORY_LIMIT override. The options: those of `first` that can (each a change that keeps the recipe),
    then those set beyond their `usual` value (the default) if any of them can, else any; options to lower first,
    the smallest change first. Returns the estimated bytes.

    estimate: v -> ({kept term: bytes}, [{phase term: bytes}, ...]). v: the configuration, {name: value}.
    options: {option: bound}, the size options of the entry point, each with the value that needs the least memory
    (below the current one: "lower", above it: "raise"). usual: {option: default value}. first: {option: (why, the
    values it may take, in order)}, offered before any other."""
    limit = available(device)
    total, terms = need(estimate, v)
    if total <= limit:
        return total
    shown = ", ".join(f"{name} {size(b)}" for name, b in sorted(terms.items(), key=lambda t: -t[1])[:4]
                      if b >= total / 100)
    usual = usual or {}

    def beyond(key):  # set past its default, on the side that costs memory
        d = usual.get(key)
        return d is not None and (v[key] > d if options[key] < v[key] else v[key] < d)
    first, fixes, kept = first or {}, [], []
    for key, (why, values) in first.items():
        x = next((x for x in values if need(estimate, {**v, key: x})[0] <= limit), None)
        if x is not None and x != v.get(key):
            kept.append(f"{'raise' if x > v[key] else 'lower'} --{key} (to {x:,}, {why})")
    for key, bound in options.items():
        x = fit(estimate, v, key, bound, limit) if key not in first and v.get(key) not in (None, bound) else None
        if x is not None:
            verb = "lower" if bound < v[key] else "raise"
            to = f"to {x}" if x == bound else f"to about {x:,}"
            change = abs(math.log(max(x, 1) / max(v[key], 1)))
            fixes.append((not beyond(key), verb == "raise", change, f"{verb} --{key} ({to})"))
    fixes.sort()
    if fixes and not fixes[0][0]:  # options beyond their default can do it: name those only
        fixes = [f for f in fixes if not f[0]]
    culprits = [key for key in options if v.get(key) is not None and beyond(key)]
    fix = " or ".join(kept + [f[-1] for f in fixes[:3 - len(kept)]]) or "no single option makes it fit: " + \
        (f"lower --{' and --'.join(culprits)}, or " if culprits else "") + "use a device with more memory"
    if environment("CODEBOOK_MEMORY_LIMIT") is not None:
        where = f"CODEBOOK_MEMORY_LIMIT allows {size(limit)}"
    else:
        where = f"{device_of(str(device))} has {size(limit)} available"
    allow = f"{total:.2g}".replace("e+0", "e").replace("e+", "e")
    raise ConfigError(f"this configuration needs about {size(total)} ({shown}) but {where}: {fix} (where the "
                      f"estimate is too cautious, the environment variable CODEBOOK_MEMORY_LIMIT sets the limit in "
                      f"bytes: CODEBOOK_MEMORY_LIMIT={allow} lets this run start)")


def peak(fn, device="cpu"):
    """(fn(), peak bytes allocated while it ran above what was allocated before). On CUDA:
    torch.cuda.max_memory_allocated; elsewhere the peak resident set size (Linux: VmHWM, reset through
    /proc/self/clear_refs, after glibc has handed freed memory back), which a fresh process measures best: memory
    freed earlier is reused without growing it."""
    import torch

    if device_of(str(device)).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    def status(key):  # kB in /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    out = fn()
    return out, status("VmHWM:") - base


# ---------------------------------------------------------------------------------------------- the parts
def model_values(config):
    """A GPTConfig as the values the estimates read: its sizes, `cb_sites` (the codebook sites of a layer) and
    `cb_layers` (how many layers hold codebooks; None: every layer)."""
    v = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "n_inner", "block_size", "vocab_size",
                                          "tie_weights", "pos_emb", "num_codes", "k", "codebook_groups",
                                          "codebook_chunk")}
    layers = [x for x in config.codebook_layers.split(",") if x.strip()]
    return {**v, "cb_sites": config.sites, "cb_layers": len(layers) if layers else None}


def books(v):
    """(codebooks, books (their groups summed), the largest G) of the model in v: per-head codebooks have n_head
    groups, the others codebook_groups."""
    groups = [v["n_head"] if s == "attn_heads" else v["codebook_groups"] for s in v["cb_sites"]]
    n = v["n_layer"] if v["cb_layers"] is None else v["cb_layers"]
    return n * len(groups), n * sum(groups), max(groups, default=0)


def _H(v):
    return v["n_inner"] or 4 * v["n_embd"]


def weights(v):
    """(parameters, bytes of the codebooks' int64 counters) of the model."""
    C, H, V, T, L = v["n_embd"], _H(v), v["vocab_size"], v["block_size"], v["n_layer"]
    codebooks, groups, _ = books(v)
    p = V * C * (1 if v["tie_weights"] else 2) + (T * C if v["pos_emb"] == "learned" else 0)
    p += L * (4 * C * C + 2 * C * H + 9 * C + H) + 2 * C + codebooks * v["num_codes"] * C
    return p, 3 * groups * v["num_codes"] * I64


def forward(v, n, grad=False, logits=None):
    """Activation bytes of a forward over n tokens: those kept for the backward (grad), or the live ones of one
    layer; `logits` rows of V logits (default n)."""
    C, H, V, L = v["n_embd"], _H(v), v["vocab_size"], v["n_layer"]
    body = L * (12 * C + 2 * H) + 3 * C * books(v)[0] if grad else 6 * C + 2 * H
    indices = n * books(v)[1] * v["k"] * I64  # each codebook keeps its last (N, G, k) choices
    return n * body * v.get("act_bytes", F32) + 3 * (n if logits is None else logits) * V * F32 + indices


def scores(v, n):
    """Bytes of the largest codebook's scoring of n tokens: a normalised copy of its codes and one chunk of scores
    (codebook.topk_codes: codebook_chunk rows, or 32 MiB (CPU) / 256 MiB (GPU) of scores). An SAE (v["sae"])
    instead holds the (n, G, M) pre-activations of all its latents, and their top-k."""
    M, C, G = v["num_codes"], v["n_embd"], books(v)[2]
    if not books(v)[0]:
        return 0
    if v.get("sae"):
        return 2 * n * G * M * F32
    rows = v["codebook_chunk"] or (2**23 if v["device"] == "cpu" else 2**26) // M
    return (M * C + G * min(n, max(1, rows // G)) * M) * F32


def generation(v, n, prompt, new):
    """Bytes of sampling n sequences of `new` tokens after a `prompt`-token prompt (model.generate): the cache, the
    token array, the logits, and the largest forward (the prompt, one token, or past block_size a full window)."""
    T, L, C, V = v["block_size"], v["n_layer"], v["n_embd"], v["vocab_size"]
    p = min(T, prompt)
    fwd = max(forward(v, n * p, logits=n) + scores(v, n * p), forward(v, n) + scores(v, n),
              forward(v, n * T, logits=n) + scores(v, n * T) if prompt + new > T else 0)
    return n * 2 * (L + 1) * min(T, prompt + new) * C * F32 + 2 * n * (prompt + new) * I64 + 3 * n * V * F32 + fwd


def collected(v, seqs, T, batch):
    """({term: bytes} kept, {term: bytes} of one forward) of collecting the codes chosen on `seqs` sequences of T
    tokens in batches of `batch` (analyze.collect_codes): the sequences, their codes (int16 ids, int32 past 32,767
    codes; twice while they are concatenated)."""
    width = 2 if v["num_codes"] <= 32767 else 4
    kept = {"eval data": seqs * (T + 1) * 2 * I64, "collected codes": 2 * seqs * T * (4 + books(v)[1] * v["k"] * width)}
    return kept, {"forward": forward(v, min(batch, seqs) * T), "codebook scores": scores(v, min(batch, seqs) * T)}


def digits(num_states):
    return len(str(num_states - 1))


def fsm_readout(v, seqs, num_states):
    """{term: bytes} of analyze.fsm_analysis on `seqs` TokFSM sequences: the concept tables (up to 10 S labels x M
    codes) of each book, kept for all of them, and the MLP neurons at every readout, held, transposed and sorted."""
    R = seqs * ((v["block_size"] - 1) // digits(num_states))  # readout positions of a concept
    return {"concept tables": 11 * num_states * v["num_codes"] * (8 * books(v)[1] + 28),
            "neurons": R * (v["n_layer"] * _H(v) * 24 + 100)}


def swap(v, pairs, groups):
    """({term: bytes} kept, {term: bytes} of one batch) of steer.fsm_swap over `pairs` pairs and `groups` site
    groups: each pair's states and contexts and its results (5 floats a group, per batch, then concatenated); a
    batch runs 100 pairs x the prefixes of the next state's digits (2 D tokens each) and keeps their codes."""
    S = v["num_states"]
    D = digits(S)
    rows = min(100, pairs) * ((S - 1) // 10 + 1 if D > 1 else 1) * 2 * D  # tokens of one batch
    codes = 3 * rows * books(v)[1] * v["k"] * I64
    return {"swap pairs and results": pairs * (8 * (4 + 6 * D) + 44 * groups)}, \
        {"forward": forward(v, rows) + codes, "codebook scores": scores(v, rows)}


def fsm_tables(num_states):
    """Bytes of TokFSM's tables: a random (S, S) matrix, its argsort and the adjacency."""
    return 16 * num_states**2


def defaults(*configs):
    """{field: default} of the dataclass instances `configs` (the usual values of `check`)."""
    return {f.name: f.default for c in configs for f in dataclasses.fields(c)}


def _device(v, device):
    """v with "device": the kind ("cpu", "cuda", "mps") of a device name, "auto" resolved."""
    return {**v, "device": device_of(str(device)).split(":")[0]}


def _tokens(dataset, split="val"):
    """Tokens in dataset/{split}.bin (2 bytes each), or None without the file (load_tokens then says why)."""
    path = os.path.join(dataset or "", f"{split}.bin")
    return os.path.getsize(path) // 2 if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------- train.py
TRAIN_OPTIONS = {"batch_size": 1, "block_size": 1, "n_layer": 1, "n_embd": 1, "n_inner": 1, "vocab_size": 1,
                 "num_codes": 1, "k": 1, "codebook_groups": 1, "codebook_chunk": 1, "eval_seqs": 1, "eval_samples": 1,
                 "eval_iters": 1, "num_states": 2}


def training(v):
    """train.py: weights, AdamW and counters kept, and the TokFSM eval set and tables; the phases: one micro-step
    (activations and codebook scores), the k-means switch, an evaluation, TokFSM sampling."""
    T, fsm = v["block_size"], v["dataset"] == "fsm"
    micro = max(1, v["batch_size"] // (v["world"] * v["gradient_accumulation_steps"]))
    kept = {"weights and optimizer": 16 * weights(v)[0] + weights(v)[1]}
    if fsm:
        kept.update({"eval set": v["eval_seqs"] * (T + 1) * I64, "FSM tables": fsm_tables(v["num_states"])})
    phases = [{"activations": forward(v, micro * T, grad=True), "codebook scores": scores(v, micro * T)}]
    if v["kmeans_init"] and books(v)[0]:
        n = min(v["gradient_accumulation_steps"], max(1, KMEANS_MAX_TOKENS // (micro * T * v["world"]))) * micro * T
        phases.append({"k-means": forward(v, n, logits=micro) + 4 * min(n, KMEANS_MAX_TOKENS) * v["n_embd"] * F32,
                       "codebook scores": scores(v, n)})
    rows = min(256, v["eval_seqs"]) * T if fsm else micro * T
    phases.append({"evaluation": forward(v, rows) + (0 if fsm else v["eval_iters"] * micro * (T + 1) * I64),
                   "codebook scores": scores(v, rows)})
    if fsm:
        phases.append({"sampling": generation(v, v["eval_samples"], 1, T - 1) + 4 * v["eval_samples"] * T * I64})
    return kept, phases


def divisors(n):
    """The divisors of n >= 1, ascending."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def check_training(cfg, gcfg, world, device):
    """train.py's check, before its data and model exist: TrainConfig, GPTConfig, ranks, the device."""
    v = _device({**vars(cfg), **model_values(gcfg), "world": world}, device)
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and v["device"] == "cuda")  # configuration.autocast_for
    v["act_bytes"] = 2 if bf16 else F32
    per_rank = cfg.batch_size // world  # accumulation keeps the global batch, so the recipe: offered first
    steps = [n for n in divisors(per_rank) if n > cfg.gradient_accumulation_steps]
    first = {"gradient_accumulation_steps": ("the same batch size and recipe, in more micro-steps", steps)}
    return check(training, v, TRAIN_OPTIONS, device, defaults(cfg, gcfg), first)


# ---------------------------------------------------------------------------------------------- tools that read a run
# Their model is loaded when they check: its weights are spent already, and only what is still to come is estimated.
def sampling(v):
    """sample.py: the buffers of `generation`."""
    return {}, [{"sampling": generation(v, v["num_samples"], v["prompt"], v["max_new_tokens"])}]


def check_sampling(cfg, config, prompt, device):
    """sample.py's check: SampleConfig, the model's config, the prompt's length in tokens."""
    v = _device({**model_values(config), **vars(cfg), "prompt": prompt}, device)
    return check(sampling, v, {"num_samples": 1, "max_new_tokens": 1}, device, defaults(cfg))


def analysis(v):
    """analyze.py: the eval set (TokFSM) or val windows (LM) and the codes chosen on them, the forward in batches;
    for TokFSM also the concept tables and the neurons."""
    T = v["block_size"]
    if v["fsm"]:
        kept, fwd = collected(v, v["num_seqs"], T, v["batch_size"])
        return kept, [fwd, fsm_readout(v, v["num_seqs"], v["num_states"])]
    seqs = max(1, min(v["max_tokens"], v["val_tokens"] or v["max_tokens"]) // T)
    kept, fwd = collected(v, seqs, T, max(1, min(v["batch_size"], 2**26 // (T * v["vocab_size"]))))
    return kept, [fwd]


def check_analysis(cfg, config, train_config, device):
    """analyze.py's check: AnalyzeConfig, the model's config, the run's train_config (a dict)."""
    fsm = train_config.get("dataset", "fsm") == "fsm"
    v = _device({**model_values(config), **vars(cfg), "fsm": fsm, "num_states": train_config.get("num_states", 100),
                 "val_tokens": None if fsm else _tokens(cfg.dataset or train_config.get("dataset"))}, device)
    return check(analysis, v, {"num_seqs" if fsm else "max_tokens": 1, "batch_size": 1}, device, defaults(cfg))


def steering(v):
    """steer.py: the swap's pairs and results (--task=fsm), the sampling buffers (generate), the eval set and an
    evaluation (ablate)."""
    T = v["block_size"]
    if v["task"] == "fsm":
        kept, batch = swap(v, v["pairs"], 6 + books(v)[0] + (v["cb_layers"] or v["n_layer"]))
        return kept, [batch]
    if v["task"] == "generate":
        new = max(1, min(v["max_new_tokens"], T - v["prompt"])) if v["fsm"] else v["max_new_tokens"]
        return {}, [{"sampling": generation(v, v["num_samples"], v["prompt"], new)}]
    seqs = v["eval_seqs"] if v["fsm"] else min(v["eval_seqs"], max(1, (v["val_tokens"] or T * v["eval_seqs"]) // T))
    rows = min(seqs, 256 if v["fsm"] else 64) * T
    samples = {"sampling": generation(v, 1000, 1, T - 1)} if v["fsm"] else {}
    return {"eval set": seqs * (T + 1) * 2 * I64}, [{"forward": forward(v, rows), "codebook scores": scores(v, rows)},
                                                    samples]


def check_steering(cfg, config, train_config, device):
    """steer.py's check: SteerConfig, the model's config, the run's train_config (a dict)."""
    fsm = train_config.get("dataset", "fsm") == "fsm"
    v = _device({**model_values(config), **vars(cfg), "fsm": fsm, "num_states": train_config.get("num_states", 100),
                 "prompt": 1 + len(cfg.start),  # at most a token a character, after BOS
                 "val_tokens": None if fsm else _tokens(cfg.dataset or train_config.get("dataset"))}, device)
    options = {"fsm": {"pairs": 1}, "generate": {"num_samples": 1, "max_new_tokens": 1}, "ablate": {"eval_seqs": 1}}
    return check(steering, v, options[cfg.task], device, defaults(cfg))


def topic_search(v):
    """topics.py: the val windows and the codes chosen on them, the forward in batches and each book's (windows, M)
    counts of dense codes (unless --topic_codes); the training text decoded for --frequent (about 100 bytes a token);
    the steering's sampling buffers (prompts of at most 8 tokens)."""
    T = v["block_size"]
    seqs = max(1, min(v["max_tokens"], v["val_tokens"] or v["max_tokens"]) // T)
    kept, fwd = collected(v, seqs, T, max(1, min(v["batch_size"], 2**26 // (T * v["vocab_size"]))))
    search = not v["topic_codes"]
    dense = {"dense-code counts": seqs * (v["num_codes"] + 1) * 10} if search else {}
    text = {"training text": 100 * (v["train_tokens"] or 0)} if v["frequent"] else {}
    sample = {"sampling": generation(v, v["samples_per_prompt"], 8, v["max_new_tokens"])} if v["steer"] else {}
    return kept if search else {}, [fwd if search else {}, dense, text, sample]


def check_topics(cfg, config, dataset, device):
    """topics.py's check: TopicsConfig, the model's config, the dataset directory."""
    v = _device({**model_values(config), **vars(cfg), "val_tokens": _tokens(dataset),
                 "train_tokens": _tokens(dataset, "train")}, device)
    options = {"max_tokens": 1, "batch_size": 1, "frequent": 0, "samples_per_prompt": 1, "max_new_tokens": 1}
    return check(topic_search, v, options, device, defaults(cfg))


def sae_training(v):
    """sae.py: the SAEs (at each site of every layer, per group M latents: encoder, decoder, biases) and Adam's
    state, the steps since each latent fired; a step (the model's forward, each SAE's (N, G, M) pre-activations, their
    gradient and AuxK's copy); then the readouts of analyze.py and the swap of steer.py (at two patches), with the
    latents as codes."""
    C, M, T, L = v["n_embd"], v["num_latents"], v["block_size"], v["n_layer"]
    lat = {**v, "num_codes": M, "cb_sites": split_list(v["sites"]), "codebook_groups": 1, "cb_layers": None,
           "sae": True}
    _, groups, G = books(lat)
    N = v["batch_size"] * T
    kept = {"SAEs and Adam": 16 * M * (2 * C * books(lat)[0] + groups) + 8 * groups * M}
    step = {"activations": forward(v, N) + N * C * F32 * books(lat)[0], "pre-activations": 4 * N * G * M * F32}
    read, fwd = collected(lat, v["num_seqs"], T, 256)
    pairs, batch = swap(lat, v["pairs"], 4 + L)
    return {**kept, **read, **{k: 2 * b for k, b in pairs.items()}}, \
        [step, fwd, fsm_readout(lat, v["num_seqs"], v["num_states"]), batch]


def check_sae(cfg, config, train_config, device):
    """sae.py's check: SAEConfig, the model's config (a model without codebooks), the run's train_config (a dict)."""
    v = _device({**model_values(config), **vars(cfg), "num_states": train_config.get("num_states", 100)}, device)
    options = {"num_latents": 1, "batch_size": 1, "num_seqs": 1, "pairs": 1}
    return check(sae_training, v, options, device, defaults(cfg))
