"""
Train a GPT with codebook bottlenecks on TokFSM (Codebook Features, Section 4.1) or on a tokenized text
dataset (Section 5: TinyStories from scratch, Pythia finetuned on WikiText-103).

    python train.py                                   # the embedded default: a laptop FSM run (2 CPU cores)
    python train.py config/fsm.py                     # the paper's TokFSM run (a GPU)
    python train.py config/fsm.py --k=8 --max_iters=100 --device=cpu
    python train.py --init_from=resume --out_dir=out  # continue a run exactly where it stopped
    torchrun --standalone --nproc_per_node=4 train.py config/fsm.py   # DDP: nccl on GPU, gloo on CPU
    python data/prepare.py tinystories && python train.py config/tinystories.py      # language models
    python train.py config/wikitext.py --init_from=/path/to/pythia-410m              # finetune a local Pythia

Data: `dataset="fsm"` samples TokFSM walks; any other value is a directory written by data/prepare.py
(train.bin, val.bin: flat uint16 token ids; meta.json), read through np.memmap in random windows of
block_size + 1 tokens, as nanoGPT. Either way the batch of (rank, iteration, micro-step) comes from its own
seeded generator, so ranks read different data and a resumed run replays the same batches.
`init_from` is "scratch", "resume" or a local Pythia/GPT-NeoX directory (GPT.from_pythia), to which the
codebook settings and block_size of the config are applied.

Configuration: the dataclasses below (TrainConfig here, GPTConfig in model.py) hold the defaults; a preset
file in config/ holds a dict `config` of overrides; `--key=value` overrides both and is parsed against
the field's type. Unknown keys and bad values stop with a one-line error. `batch_size` is the global
batch of one optimizer step: it is split across ranks and gradient-accumulation micro-steps.

Output in out_dir: ckpt.pt (model, both configs, optimizer, RNG state, iteration; written atomically) and
log.jsonl (one JSON object per log line and per evaluation). A resumed run drops the log records past its
checkpoint (it logs them again) and the temporary file of a write that a crash cut short. A non-finite loss or
weight stops the run and keeps the last good checkpoint (checked at each log line and before each checkpoint,
so no per-step sync); nan_policy="skip" instead skips every step whose loss or gradients are not finite.
"""

import glob
import importlib.util
import json
import math
import os
import sys
import time
import typing
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from codebook import sync_counts
from fsm import TokFSM
from model import GPT, GPTConfig, pythia_config

# GPTConfig fields that init_from=<Pythia directory> takes from the config; the rest come from its config.json
PYTHIA_OVERRIDES = ("codebook_sites", "codebook_layers", "num_codes", "k", "codebook_groups", "codebook_layernorm",
                    "codebook_chunk", "recon_coef", "block_size")


class ConfigError(ValueError):
    """A bad configuration: the message names the problem and the fix."""


@dataclass
class TrainConfig:
    """Training. Defaults: the laptop TokFSM preset (~7 minutes on 2 CPU cores), calibrated in README."""

    out_dir: str = "out"
    init_from: str = "scratch"  # "scratch", "resume" (from out_dir/ckpt.pt) or a local Pythia/GPT-NeoX directory
    overwrite: bool = False  # allow a scratch run to replace a run already in out_dir
    seed: int = 1337
    dataset: str = "fsm"  # "fsm", or a directory from data/prepare.py holding train.bin, val.bin, meta.json
    # data: TokFSM
    num_states: int = 100
    num_edges: int = 10
    fsm_seed: int = 42  # the FSM's structure; the same on every machine
    # evaluation and logging
    eval_interval: int = 500
    eval_seqs: int = 2048  # size of the fixed eval set (sequences)
    eval_samples: int = 1000  # sequences sampled for valid-transition accuracy
    eval_iters: int = 20  # LM datasets: batches of fixed val windows per evaluation
    log_interval: int = 100
    # optimisation
    batch_size: int = 128  # sequences per optimizer step, over all ranks and micro-steps
    gradient_accumulation_steps: int = 1
    max_iters: int = 3000
    learning_rate: float = 3e-3
    codebook_lr: Optional[float] = 1e-2  # learning rate of the codes; None = learning_rate
    lr_schedule: str = "cosine"  # "cosine" or "constant", after a linear warmup
    warmup_iters: int = 100
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 = off
    nan_policy: str = "stop"  # a non-finite loss: "stop" (keeps the last good checkpoint) or "skip" the step
    # codebook training
    kmeans_init: bool = True  # initialise codes by cosine k-means on their first batch
    kmeans_iters: int = 10
    replace_after: int = 0  # replace codes unused for this many steps by noisy activations; 0 = off
    # train with the codebooks bypassed until this iteration, then switch them on. 150: just as the loss leaves
    # ln 10, so that the states are learned through the codes (README: later switches split states into codes)
    codebook_start: int = 150
    # system
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA, else fp32), "float32", "bfloat16"
    compile: bool = False  # torch.compile the model

    def __post_init__(self):
        for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "eval_iters",
                    "eval_seqs", "eval_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1: pass --{key}=N with N >= 1")
        for key, choices in (("lr_schedule", ("cosine", "constant")), ("nan_policy", ("stop", "skip")),
                             ("dtype", ("auto", "float32", "bfloat16"))):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key} must be {' or '.join(map(repr, choices))}, got {getattr(self, key)!r}")


def _parse_value(key, text, typ):
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        if text.lower() == "none":
            return None
        typ = [t for t in typing.get_args(typ) if t is not type(None)][0]
    if typ is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--{key}={text}: expected true or false")
    try:
        return typ(text)
    except ValueError:
        raise ConfigError(f"--{key}={text}: expected {typ.__name__}") from None


def _check_type(key, value, typ):
    if typing.get_origin(typ) is typing.Union:
        if value is None:
            return value
        typ = [t for t in typing.get_args(typ) if t is not type(None)][0]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def load_preset(path):
    """The `config` dict of a preset file such as config/fsm.py."""
    if not os.path.isfile(path):
        raise ConfigError(f"preset file {path!r} not found: see config/ for the presets")
    spec = importlib.util.spec_from_file_location("preset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, "config", None), dict):
        raise ConfigError(f"{path} must define a dict named `config`")
    return dict(module.config)


def parse_args(argv, classes=None):
    """argv -> (overrides from the preset file, overrides from --key=value), both typed dicts.

    The keys are the fields of the dataclasses `classes` (default TrainConfig and GPTConfig; sample.py
    passes its own). Raises ConfigError for unknown keys, malformed arguments and values of the wrong type."""
    classes = classes or (TrainConfig, GPTConfig)
    types = {k: t for c in classes for k, t in typing.get_type_hints(c).items()}
    names = " and ".join(c.__name__ for c in classes)
    preset, cli = {}, {}
    for arg in argv:
        if not arg.startswith("--"):
            preset.update(load_preset(arg))
            continue
        if "=" not in arg:
            raise ConfigError(f"{arg}: write overrides as --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in types:
            raise ConfigError(f"unknown config key {key!r}: see {names}")
        cli[key] = _parse_value(key, text, types[key])
    for key, value in preset.items():
        if key not in types:
            raise ConfigError(f"unknown config key {key!r} in the preset: see {names}")
        preset[key] = _check_type(key, value, types[key])
    return preset, cli


def split_config(d):
    """A flat dict -> (TrainConfig kwargs, GPTConfig kwargs)."""
    tk = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in d.items() if k in tk}, {k: v for k, v in d.items() if k not in tk}


def save_checkpoint(obj, path):
    """torch.save to a temporary file, fsync, then rename: a crash leaves the old file or the new one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CKPT_KEYS = {"model", "optimizer", "model_config", "train_config", "iter_num", "rng"}


def load_checkpoint(path):
    """Load a checkpoint written by train.py, with a clear error for a missing, corrupt or foreign file."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}: train first, or point out_dir at a run")
    try:  # weights_only: tensors and plain Python values, never code from the file
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path} cannot be read as a checkpoint ({type(e).__name__}), it is truncated or another "
                          "kind of file: resume from an intact ckpt.pt, or start again with --overwrite=true") from None
    if not isinstance(ckpt, dict) or not CKPT_KEYS <= set(ckpt):
        raise ConfigError(f"{path} is not a checkpoint written by train.py (it lacks the model, configs, optimizer "
                          "and iteration): point out_dir at a train.py run")
    for cls, key in ((TrainConfig, "train_config"), (GPTConfig, "model_config")):
        unknown = sorted(set(ckpt[key]) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{path}: {key} holds unknown keys {unknown}, so another version of train.py wrote it: "
                              "use that version, or start a new out_dir")
    return ckpt


def load_state(module, state, what):
    """module.load_state_dict(state) with a one-line ConfigError naming the first missing, extra or
    misshapen key: the weights are from another config than the one they are loaded into."""
    ours = module.state_dict()
    for key in sorted(ours.keys() | state.keys()):
        shapes = [tuple(d[key].shape) if key in d else "absent" for d in (state, ours)]
        if shapes[0] != shapes[1]:
            raise ConfigError(f"{what} do not match the model (another config?): {key} is {shapes[0]} there, "
                              f"{shapes[1]} in the model; use the checkpoint of the run itself")
    module.load_state_dict(state)


def model_from_checkpoint(ckpt):
    """Rebuild the GPT of a checkpoint (its config is stored in it); raises ConfigError on mismatch."""
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the checkpoint's model_config is invalid ({e})") from None
    load_state(model, ckpt["model"], "the checkpoint's weights")
    return model


def pretrained_error(path, e):
    """The one-line ConfigError for a Pythia directory that does not load (a missing shard, a foreign file)."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msg = msg.splitlines()[0] if msg.strip() else type(e).__name__
    return ConfigError(f"init_from={path}: {msg}: point init_from at a complete local Pythia/GPT-NeoX download")


def trim_log(path, iter_num):
    """Keep the records of log.jsonl up to iteration iter_num (the checkpoint's), rewritten atomically: a resumed
    run logs the later iterations again, and a killed run can leave a torn last line."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["iter"] <= iter_num:
                    keep.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):
                pass  # a torn line
    with open(f"{path}.tmp", "w") as f:
        f.writelines(keep)
    os.replace(f"{path}.tmp", path)


def get_lr(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def data_generator(seed, rank, it, micro):
    """A generator seeded from (seed, rank, iteration, micro-step): resuming at `it` replays the stream."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + it) * 64 + micro)


def load_tokens(data_dir, block_size, vocab_size):
    """(train, val): the token files data_dir/{train,val}.bin as 1-D uint16 np.memmaps, checked for the model.

    Raises ConfigError for a missing directory or file, a tokenizer (meta.json) larger than vocab_size, a
    file shorter than block_size + 1 tokens, or a token id >= vocab_size (the max is read once, here)."""
    if not os.path.isdir(data_dir):
        raise ConfigError(f"dataset={data_dir!r} is not a directory: run data/prepare.py to create it, "
                          "or use dataset=fsm")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{meta_path} is missing: run data/prepare.py to prepare {data_dir}")
    try:
        with open(meta_path) as f:
            n_vocab = int(json.load(f)["vocab_size"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{meta_path} has no vocab_size (not written by data/prepare.py?): "
                          "re-run data/prepare.py") from None
    if n_vocab > vocab_size:
        raise ConfigError(f"{meta_path}: the tokenizer has {n_vocab} tokens but vocab_size={vocab_size}: "
                          f"raise vocab_size (e.g. --vocab_size={-(-n_vocab // 64) * 64})")
    splits = []
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is missing: run data/prepare.py to prepare {data_dir}")
        n = os.path.getsize(path) // 2
        if n < block_size + 1:
            raise ConfigError(f"{path} has {n} tokens, but block_size={block_size} needs at least {block_size + 1}: "
                              "lower block_size or prepare more text")
        data = np.memmap(path, dtype=np.uint16, mode="r")
        top = int(data.max())
        if top >= vocab_size:
            raise ConfigError(f"{path} holds token id {top} >= vocab_size={vocab_size}: "
                              "raise vocab_size or re-run data/prepare.py")
        splits.append(data)
    return splits


def token_windows(data, ix, block_size):
    """Windows of block_size + 1 tokens at offsets ix (B,) of a 1-D token array: x, y (B, block_size) int64,
    y = x shifted by one. One vectorised read, no loop over rows."""
    w = data[ix.numpy()[:, None] + np.arange(block_size + 1)]  # (B, block_size + 1) uint16
    w = torch.from_numpy(w.astype(np.int64))
    return w[:, :-1], w[:, 1:]


def get_batch(data, block_size, batch, generator):
    """nanoGPT's get_batch: `batch` windows at random offsets of data (a uint16 np.memmap), drawn with
    `generator` (from data_generator: one per rank, iteration and micro-step). Returns x, y (batch, block_size)."""
    ix = torch.randint(len(data) - block_size, (batch,), generator=generator)
    return token_windows(data, ix, block_size)


def code_usage(model, device):
    """[(codebook, (G, M) bool)] for the codebooks that are on; mark_used fills it after each forward."""
    return [(cb, torch.zeros(cb.groups, cb.num_codes, dtype=torch.bool, device=device))
            for _, cb in model.codebooks() if not cb.bypass]


def mark_used(usage):
    for cb, u in usage:
        u.view(-1)[cb.flat_indices(cb.last_indices.view(-1, cb.groups, cb.k)).flatten()] = True


def dead_pct(usage):
    """% of the codes (of the codebooks that are on) that no eval token selected; 0 without codebooks."""
    return 100 * (1 - torch.cat([u.flatten() for _, u in usage]).float().mean().item()) if usage else 0.0


@torch.no_grad()
def evaluate_fsm(model, fsm, eval_x, eval_y, cfg, device, autocast):
    """Loss, next-token accuracy, valid-successor mass and dead-code % on the fixed eval set, plus
    valid-transition and first-transition accuracy of `eval_samples` sequences sampled at temperature 1."""
    model.eval()
    usage = code_usage(model, device)
    ce = correct = mass = n = 0.0
    for s in range(0, eval_x.size(0), 256):
        x, y = eval_x[s : s + 256].to(device), eval_y[s : s + 256].to(device)
        with autocast:
            logits, _, terms = model(x, y)
        ce += terms["ce"].item() * x.size(0)
        correct += (logits.argmax(-1) == y).float().mean().item() * x.size(0)
        mass += fsm.valid_mass(logits.cpu(), y.cpu()) * x.size(0)
        n += x.size(0)
        mark_used(usage)
    valid = first = math.nan
    if math.isfinite(ce):  # sampling needs finite logits (train.py stops a run whose eval loss is not finite)
        bos = torch.full((cfg.eval_samples, 1), TokFSM.EOT, dtype=torch.long, device=device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        with autocast:
            samples = model.generate(bos, model.config.block_size - 1, temperature=1.0, generator=gen)
        valid, first = fsm.transition_accuracy(samples.cpu())
    model.train()
    return {"loss": ce / n, "acc": correct / n, "valid_mass": mass / n, "valid": valid, "first": first,
            "dead_pct": dead_pct(usage)}


@torch.no_grad()
def evaluate_lm(model, val, eval_ix, batch, device, autocast):
    """Loss (CE), next-token accuracy, perplexity and dead-code % on the fixed val windows at offsets eval_ix,
    then the loss with every codebook bypassed: dloss = loss - loss_nocb is what the bottleneck costs
    (0 while all codebooks are bypassed, e.g. before codebook_start)."""
    model.eval()
    usage = code_usage(model, device)
    block_size = model.config.block_size

    def run(track):
        ce = correct = 0.0
        for s in range(0, len(eval_ix), batch):
            x, y = token_windows(val, eval_ix[s : s + batch], block_size)
            x, y = x.to(device), y.to(device)
            with autocast:
                logits, _, terms = model(x, y)
            ce += terms["ce"].item() * x.size(0)
            correct += (logits.argmax(-1) == y).float().mean().item() * x.size(0)
            if track:
                mark_used(usage)
        return ce / len(eval_ix), correct / len(eval_ix)

    loss, acc = run(track=True)
    loss_nocb = loss
    if usage:
        cbs = [cb for _, cb in model.codebooks()]
        was = [cb.bypass for cb in cbs]
        for cb in cbs:
            cb.bypass = True
        loss_nocb, _ = run(track=False)
        for cb, b in zip(cbs, was):
            cb.bypass = b
    model.train()
    ppl = math.exp(min(loss, 709.0))  # exp overflows a float past 709.78
    return {"loss": loss, "acc": acc, "ppl": ppl, "loss_nocb": loss_nocb, "dloss": loss - loss_nocb,
            "dead_pct": dead_pct(usage)}


def main(argv):
    preset, cli = parse_args(argv)
    # DDP, as nanoGPT: one process per device, rank 0 logs and saves
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0

    tcfg, mcfg = split_config({**preset, **cli})
    resume = {**tcfg}.get("init_from", TrainConfig.init_from) == "resume"
    ckpt = None
    if resume:
        ckpt_path = os.path.join(tcfg.get("out_dir", TrainConfig.out_dir), "ckpt.pt")
        ckpt = load_checkpoint(ckpt_path)
        cli_train, cli_model = split_config(cli)
        tcfg = {**ckpt["train_config"], **cli_train, "init_from": "resume"}
        clash = {k: v for k, v in cli_model.items() if ckpt["model_config"].get(k) != v}
        if clash:
            raise ConfigError(f"cannot change model settings {sorted(clash)} when resuming: start a new out_dir")
        mcfg = ckpt["model_config"]
    try:
        cfg = TrainConfig(**tcfg)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    pretrained = cfg.init_from not in ("scratch", "resume")  # a Pythia directory
    if pretrained:
        if not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
            raise ConfigError(f"init_from={cfg.init_from!r} is not 'scratch', 'resume' or a local Pythia/GPT-NeoX "
                              "directory (config.json + weights): pass --init_from=DIR, e.g. a download of "
                              "EleutherAI/pythia-410m")
        fixed = sorted(set(mcfg) - set(PYTHIA_OVERRIDES))
        if fixed:
            raise ConfigError(f"{fixed} come from {os.path.join(cfg.init_from, 'config.json')}: "
                              f"with a pretrained init_from set only {', '.join(PYTHIA_OVERRIDES)}")
    if resume and cfg.codebook_start != ckpt["train_config"].get("codebook_start", cfg.codebook_start):
        n, c0 = ckpt["iter_num"], ckpt["train_config"]["codebook_start"]
        if n >= c0 or n > cfg.codebook_start:  # the switch (and its k-means) must still lie ahead
            raise ConfigError(f"--codebook_start={cfg.codebook_start}: the checkpoint (iteration {n}, codebook_start="
                              f"{c0}) {'has its codebooks on already' if n >= c0 else f'can switch them on at >= {n}'}"
                              ": drop --codebook_start or start a new out_dir")
    try:
        gcfg = pythia_config(cfg.init_from, **mcfg) if pretrained else GPTConfig(**mcfg)
    except (ValueError, TypeError) as e:  # a bad value, or a config.json of another architecture
        bad_json = isinstance(e, json.JSONDecodeError)
        raise (pretrained_error(cfg.init_from, e) if bad_json else ConfigError(str(e))) from None
    except (KeyError, OSError) as e:  # a config.json without a needed field, or unreadable
        raise pretrained_error(cfg.init_from, e) from None

    lm = cfg.dataset != "fsm"
    if lm:  # token files, checked against the model (missing, too short, ids out of range)
        train_data, val_data = load_tokens(cfg.dataset, gcfg.block_size, gcfg.vocab_size)
    else:
        fsm = TokFSM(cfg.num_states, cfg.num_edges, cfg.fsm_seed)
        if gcfg.vocab_size < fsm.vocab_size:
            raise ConfigError(f"vocab_size={gcfg.vocab_size} < the FSM's {fsm.vocab_size} tokens: raise vocab_size")
        if gcfg.block_size < 2 * fsm.digits + 1:
            raise ConfigError(f"block_size={gcfg.block_size} holds fewer than two FSM states: use >= {2 * fsm.digits + 1}")
    micro, rem = divmod(cfg.batch_size, world * cfg.gradient_accumulation_steps)
    if rem or micro == 0:
        raise ConfigError(
            f"batch_size={cfg.batch_size} does not split into {world} rank(s) x "
            f"{cfg.gradient_accumulation_steps} micro-step(s): make it a multiple of {world * cfg.gradient_accumulation_steps}"
        )
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not resume and os.path.exists(ckpt_path) and not cfg.overwrite:
        raise ConfigError(f"{cfg.out_dir} already holds a run: pass --init_from=resume, --overwrite=true or another --out_dir")

    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp and cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(cfg.device)
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device_type == "cuda" else "float32")
    autocast = (
        torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        if dtype == "bfloat16"
        else torch.autocast(device_type=device_type, enabled=False)
    )
    torch.manual_seed(cfg.seed + rank)

    # everything that can fail on bad files happens before the process group exists, so that each rank
    # stops with its one-line error instead of leaving the others waiting in a collective
    if pretrained:
        try:
            model = GPT.from_pythia(cfg.init_from, **mcfg)  # gcfg, with the pretrained weights
        except Exception as e:  # a missing shard, a truncated or foreign weights file: all end the same way
            raise pretrained_error(cfg.init_from, e) from None
        if master and gcfg.sites and gcfg.codebook_layernorm:
            print("note: codebook_layernorm=true adds a fresh LayerNorm before each codebook, which changes the "
                  "pretrained model's function even with its codebooks bypassed (--codebook_layernorm=false keeps it)")
    else:
        model = GPT(gcfg)
    if ckpt is not None:
        load_state(model, ckpt["model"], f"the weights in {ckpt_path}")
    model.to(cfg.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), cfg.codebook_lr)
    iter_num = 0
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"the optimizer state in {ckpt_path} does not match the model ({str(e).splitlines()[0]})"
                              ": use the checkpoint of the run itself") from None
        iter_num = ckpt["iter_num"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    if ddp:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    for _, cb in model.codebooks():
        cb.bypass = iter_num < cfg.codebook_start
        if cfg.kmeans_init and iter_num == cfg.codebook_start:
            cb.request_kmeans_init(cfg.kmeans_iters)  # runs on the first forward with codebooks on
    raw_model = model
    codebooks = [cb for _, cb in raw_model.codebooks()]
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        # buffers (code counts) are kept equal by sync_counts, not by DDP's per-forward broadcast; while the
        # codebooks are bypassed (before codebook_start) their codes get no gradient, which DDP must be told
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device_type == "cuda" else None,
                    broadcast_buffers=False, find_unused_parameters=bool(codebooks) and iter_num < cfg.codebook_start)

    if lm:  # a fixed set of val windows (fixed seed, as fsm.eval_set), so evaluations compare across iterations
        eval_ix = torch.randint(len(val_data) - gcfg.block_size, (cfg.eval_iters * micro,),
                                generator=torch.Generator().manual_seed(1234))
    else:
        eval_x, eval_y = fsm.eval_set(cfg.eval_seqs, gcfg.block_size)
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        n_cb = sum(cb.codes.numel() for cb in codebooks)
        print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters ({n_cb / 1e6:.2f}M in {len(codebooks)} codebooks); "
              f"{world} rank(s) x {micro} sequences x {cfg.gradient_accumulation_steps} micro-steps; device {cfg.device}")
        if lm:
            print(f"data {cfg.dataset}: {len(train_data):,} train and {len(val_data):,} val tokens")
        for tmp in glob.glob(f"{ckpt_path}.tmp.*"):  # left by a run killed while saving
            os.remove(tmp)
        log_path = os.path.join(cfg.out_dir, "log.jsonl")
        if resume:
            trim_log(log_path, iter_num)
        logf = open(log_path, "a" if resume else "w")

    def log(record):
        if master:
            logf.write(json.dumps(record) + "\n")
            logf.flush()

    def run_eval():
        if lm:
            m = evaluate_lm(raw_model, val_data, eval_ix, micro, cfg.device, autocast)
            print(f"eval {iter_num}: loss {m['loss']:.4f}, acc {m['acc']:.4f}, ppl {m['ppl']:.2f}, "
                  f"dloss {m['dloss']:+.4f} (without codebooks {m['loss_nocb']:.4f}), dead codes {m['dead_pct']:.1f}%")
        else:
            m = evaluate_fsm(raw_model, fsm, eval_x, eval_y, cfg, cfg.device, autocast)
            print(f"eval {iter_num}: loss {m['loss']:.4f}, acc {m['acc']:.4f}, valid-transition {m['valid']:.4f}, "
                  f"first {m['first']:.4f}, valid mass {m['valid_mass']:.4f}, dead codes {m['dead_pct']:.1f}%")
        log({"iter": iter_num, "eval": m, "elapsed_s": train_time})
        return m

    def checkpoint():
        save_checkpoint({
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": asdict(gcfg), "train_config": asdict(cfg), "iter_num": iter_num,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None},
        }, ckpt_path)

    # this looks odd because a temporary tensor handed to gloo can hang the exit: gloo's thread then needs the
    # GIL to free it while the main thread, holding the GIL, waits for that thread in the process group's teardown
    flag = torch.ones((), device=cfg.device)

    def finite(*tensors):
        """Whether every value of the tensors is finite on every rank: one host sync."""
        flag.copy_(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        if ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    train_time, t0, tokens, window, skipped, failure = 0.0, time.time(), 0, 0, 0, None
    saved = ckpt["iter_num"] if ckpt is not None else None  # the iteration of the checkpoint on disk
    loss_acc = torch.zeros(3, device=cfg.device)  # sums over the log window: loss, ce, recon
    while iter_num < cfg.max_iters:
        if iter_num == cfg.codebook_start and cfg.codebook_start > 0:  # warm-up over: codebooks on
            for cb in codebooks:
                cb.bypass = False
                if cfg.kmeans_init:
                    cb.request_kmeans_init(cfg.kmeans_iters)  # from this step's activations
        lr = get_lr(iter_num, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        step_loss = torch.zeros(3, device=cfg.device)  # this step's loss, ce, recon
        for micro_step in range(cfg.gradient_accumulation_steps):
            gen = data_generator(cfg.seed, rank, iter_num, micro_step)
            if lm:
                x, y = get_batch(train_data, gcfg.block_size, micro, gen)
            else:
                x, y = fsm.batch(micro, gcfg.block_size, gen)
            x, y = x.to(cfg.device, non_blocking=True), y.to(cfg.device, non_blocking=True)
            if ddp:  # sync gradients on the last micro-step only
                model.require_backward_grad_sync = micro_step == cfg.gradient_accumulation_steps - 1
            with autocast:
                _, loss, terms = model(x, y)
            (loss / cfg.gradient_accumulation_steps).backward()
            step_loss += torch.stack([loss.detach(), terms["ce"], terms["recon"]]) / cfg.gradient_accumulation_steps
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        skip = False
        if cfg.nan_policy == "skip":  # a host sync every step, so only on this path
            if norm is None:
                norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            skip = not finite(step_loss, norm)
        if skip:  # no update, and this step's code usage is not counted
            for cb in codebooks:
                cb.pending.zero_()
            skipped += 1
        else:
            optimizer.step()
            sync_counts(codebooks)
            loss_acc += step_loss
            window += 1
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens += cfg.batch_size * gcfg.block_size
        if skip:
            if master:
                print(f"iter {iter_num}: the loss or the gradients are not finite, step skipped (nan_policy=skip)")
            log({"iter": iter_num, "skipped": True})
        elif cfg.replace_after and iter_num % cfg.replace_after == 0 and iter_num > cfg.codebook_start:
            for cb in codebooks:
                cb.replace_dead_codes()

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            if window == 0:
                failure = f"every step of iterations {iter_num - skipped + 1}-{iter_num} was skipped"
                break
            if ddp:
                dist.all_reduce(loss_acc)  # the logged loss is the mean over ranks
                loss_acc /= world
            lo, ce, rc = (loss_acc / window).tolist()
            dt = time.time() - t0
            train_time += dt
            if master:
                print(f"iter {iter_num}: loss {lo:.4f} (ce {ce:.4f}, recon {rc:.4f}), lr {lr:.2e}, "
                      f"{tokens / dt:,.0f} tok/s" + (f", {skipped} step(s) skipped" if skipped else ""))
                log({"iter": iter_num, "loss": lo, "ce": ce, "recon": rc, "lr": lr, "tok_per_s": tokens / dt})
            if not math.isfinite(lo):
                failure = f"the loss became {lo} by iteration {iter_num}"
                break
            loss_acc.zero_()
            t0, tokens, window, skipped = time.time(), 0, 0, 0
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            eval_loss = run_eval()["loss"] if master else 0.0
            # a checkpoint is never written from non-finite weights, training or eval losses
            if not finite(loss_acc, torch.tensor(eval_loss, device=cfg.device), *raw_model.parameters()):
                failure = f"the loss or the weights are not finite at iteration {iter_num}"
                break
            if master:
                checkpoint()
            saved = iter_num
            t0 = time.time()
    if master and failure is None and iter_num == cfg.max_iters and ckpt is not None and ckpt["iter_num"] == iter_num:
        run_eval()  # resuming a finished run just reports it
    if master:
        logf.close()
    if ddp:
        dist.barrier()  # every rank waits here: without it gloo can abort at exit
        dist.destroy_process_group()
    if failure:  # the same on every rank: the checks above are all-reduced
        kept = f"the checkpoint of iteration {saved} in {cfg.out_dir} is kept" if saved else "no checkpoint was written"
        fix = "lower learning_rate or grad_clip" + (", or pass --nan_policy=skip" if cfg.nan_policy == "stop" else "")
        raise FloatingPointError(f"{failure}; {kept}: {fix}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, FloatingPointError) as e:
        # under torchrun every rank fails alike: the first rank of each node says why, the others just exit
        sys.exit(f"error: {e}" if int(os.environ.get("LOCAL_RANK", 0)) == 0 else 1)
