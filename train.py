"""
Train a GPT with codebook bottlenecks on TokFSM (Codebook Features, Section 4.1) or on a tokenized text
dataset (Section 5: TinyStories from scratch, Pythia finetuned on WikiText-103).

    python train.py                                   # the default: the quick FSM recipe (~2 min on 2 CPU cores)
    python train.py config/laptop.py                  # the slower laptop recipe, 98 % (~8 min on 2 CPU cores)
    python train.py config/fsm.py                     # the paper's TokFSM run (a GPU)
    python train.py --init_from=resume --out_dir=out --max_iters=4000   # continue a run exactly where it stopped
    torchrun --standalone --nproc_per_node=4 train.py config/fsm.py   # DDP: nccl on GPU, gloo on CPU
    python train.py config/wikitext.py --init_from=/path/to/pythia-410m              # finetune a local Pythia

The recipe (codebook.py lists where it departs from the paper, each with the measurement behind it):
1. warm start: until `codebook_start` every codebook is bypassed and the network trains alone;
2. the switch: each codebook's codes are set by cosine k-means on that step's activations (`kmeans_init`);
3. then network and codes train jointly on CE + recon_coef * reconstruction MSE (model.py), AdamW with warmup and
   cosine decay, the codes at their own learning rate `codebook_lr`; `replace_after` optionally re-seeds dead codes.

Data: TokFSM walks (`dataset="fsm"`) or a data/prepare.py directory read in random windows, as nanoGPT; the batch
of (rank, iteration, micro-step) and its dropout come from seeds of that tuple (step_seeds), so DDP ranks read
different data and draw different masks, and a resumed run replays the same batches and masks. `init_from`:
"scratch", "resume" or a local Pythia directory (pythia.py).
Configuration: TrainConfig below and GPTConfig (model.py), each field with its valid values; presets in config/;
--key=value overrides both. `batch_size` is the global batch of one optimizer step. A resumed run continues in the
out_dir it was read from and may change only the options in RESUMABLE.
Output in out_dir, owned by one process: ckpt.pt and log.jsonl (plumbing/rundir.py). A non-finite loss or weight,
Ctrl-C, SIGTERM, a lost DDP rank or a full disk stops the run in one line, keeping the last good checkpoint
(nan_policy="skip" skips non-finite steps instead).
"""

from plumbing.entry import cli, uninterrupted  # first: a Ctrl-C while torch loads is one line (plumbing/__init__)
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import pythia
from codebook import KMEANS_MAX_TOKENS, sync_counts
from evaluate import codebook_summary, evaluate_fsm, evaluate_lm
from fsm import TokFSM
from model import GPT, GPTConfig
from plumbing.configuration import (ConfigError, autocast_for, build, is_device, is_out_dir, parse_args,
                                    resume_config, spec, split_config, torchrun_ranks, validate)
from plumbing.ddp import AllFinite, every_parameter_used, join_process_group, rank_device
from plumbing.memory import check_training
from plumbing.progress import eta
from plumbing.rundir import (DirLock, EarlyStop, RunLog, claim, close_run, load_checkpoint, load_state,
                             remove_leftovers, save_checkpoint)
from plumbing.tokens import load_tokens, token_windows


@dataclass
class TrainConfig:
    """Training. Defaults: the quick TokFSM recipe (README); config/laptop.py holds the slower 98 % one."""

    out_dir: str = spec("out", check=is_out_dir)
    init_from: str = "scratch"  # "scratch", "resume" (from out_dir/ckpt.pt) or a local Pythia/GPT-NeoX directory
    overwrite: bool = False  # let a scratch run replace the run in out_dir (once it has its own first checkpoint)
    seed: int = spec(1337, "[0, 2147483647]")
    dataset: str = "fsm"  # "fsm", or a directory from data/prepare.py holding train.bin, val.bin, meta.json
    # data: TokFSM
    num_states: int = spec(100, ">= 2")
    num_edges: int = spec(10, ">= 1")
    fsm_seed: int = spec(42, "[0, 2147483647]")  # the FSM's structure; the same on every machine
    # evaluation and logging
    eval_interval: int = spec(1700, ">= 1")  # 1700 = max_iters: one evaluation, at the end
    eval_seqs: int = spec(512, ">= 1")  # size of the fixed eval set (sequences)
    eval_samples: int = spec(1000, ">= 1")  # sequences sampled for valid-transition accuracy
    eval_iters: int = spec(20, ">= 1")  # LM datasets: batches of fixed val windows per evaluation
    log_interval: int = spec(100, ">= 1")
    # optimisation
    batch_size: int = spec(128, ">= 1")  # sequences per optimizer step, over all ranks and micro-steps
    gradient_accumulation_steps: int = spec(1, ">= 1")
    max_iters: int = spec(1700, ">= 1")
    learning_rate: float = spec(5e-3, "> 0")
    codebook_lr: Optional[float] = spec(0.3, "> 0")  # the codes' lr (60x: they chase activations); None = lr
    lr_schedule: str = spec("cosine", ("cosine", "constant"))  # after a linear warmup
    warmup_iters: int = spec(100, ">= 0")
    min_lr: float = spec(3e-4, ">= 0")
    weight_decay: float = spec(0.1, ">= 0")
    beta1: float = spec(0.9, "[0, 1)")
    beta2: float = spec(0.99, "[0, 1)")
    grad_clip: float = spec(1.0, ">= 0")  # 0 = off
    nan_policy: str = spec("stop", ("stop", "skip"))  # a non-finite loss: stop (keep the last good checkpoint) or skip
    # codebook training
    kmeans_init: bool = True  # initialise the codes by cosine k-means at the switch
    kmeans_iters: int = spec(10, ">= 0")
    replace_after: int = spec(0, ">= 0")  # replace codes unused for this many steps by noisy activations; 0 = off
    # train with the codebooks bypassed until this iteration, then switch them on. 200: as the loss leaves ln 10,
    # so that the states are learned through the codes (RESULTS.md: later switches split states into codes)
    codebook_start: int = spec(200, ">= 0")
    # system
    device: str = spec("auto", check=is_device)  # "auto", "cpu", "cuda", "cuda:1", ...
    dtype: str = spec("auto", ("auto", "float32", "bfloat16"))  # auto: bf16 autocast on CUDA, else fp32
    compile: bool = False  # torch.compile the model

    def __post_init__(self):
        validate(self)
        if self.num_edges > self.num_states:
            raise ConfigError(f"num_edges={self.num_edges} > num_states={self.num_states}: a state has at most "
                              "num_states distinct successors")


# what --init_from=resume may change; everything else (data, model, optimizer settings, place) must match
RESUMABLE = ("max_iters", "learning_rate", "min_lr", "warmup_iters", "lr_schedule", "grad_clip", "nan_policy",
             "codebook_start", "kmeans_init", "kmeans_iters", "replace_after", "eval_interval", "eval_seqs",
             "eval_samples", "eval_iters", "log_interval", "device", "dtype", "compile")


def get_lr(it, cfg):
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def step_seeds(seed, rank, it, micro):
    """Two 64-bit seeds of (seed, rank, iteration, micro-step): the batch's and the global RNG's (dropout, k-means).
    numpy's SeedSequence hashes the whole tuple, so every seed in range works, no two tuples share a stream, and a
    resumed run (or another rank) recomputes them from the tuple alone."""
    return [int(s) for s in np.random.SeedSequence([seed, rank, it, micro]).generate_state(2, np.uint64)]


def data_generator(seed, rank, it, micro):
    """The batch generator of (seed, rank, iteration, micro-step): resuming at `it` replays the stream."""
    return torch.Generator().manual_seed(step_seeds(seed, rank, it, micro)[0])


def micro_batch(run, it, micro):
    """Micro-batch `micro` of iteration `it` on this rank, on the device, with the global RNG (dropout) seeded for
    it: the same after a resume, different on every rank. Returns x, y (run.micro, block_size)."""
    data_seed, rng_seed = step_seeds(run.cfg.seed, run.rank, it, micro)
    torch.manual_seed(rng_seed)
    gen = torch.Generator().manual_seed(data_seed)
    if run.fsm is not None:
        x, y = run.fsm.batch(run.micro, run.block_size, gen)
    else:
        x, y = get_batch(run.train_data, run.block_size, run.micro, gen)
    return x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)


def get_batch(data, block_size, batch, generator):
    """nanoGPT's get_batch: `batch` windows at random offsets of data (a uint16 np.memmap), drawn with
    `generator` (from data_generator: one per rank, iteration and micro-step). Returns x, y (batch, block_size)."""
    ix = torch.randint(len(data) - block_size, (batch,), generator=generator)
    return token_windows(data, ix, block_size)


def switch_codebooks_on(run, it):
    """The end of the warm start: quantize from now on. With kmeans_init, one no-grad forward over this step's
    micro-batches (up to KMEANS_MAX_TOKENS over all ranks) sets each codebook's codes by k-means on its input,
    layer by layer, each codebook initialised before it quantizes for the next; every rank's activations count."""
    run.model = every_parameter_used(run.model) if run.ddp else run.model  # DDP: no more unused parameters
    for cb in run.codebooks:
        cb.bypass = False
        if run.cfg.kmeans_init:
            cb.request_kmeans_init(run.cfg.kmeans_iters)  # runs on the next training forward
    if not (run.cfg.kmeans_init and run.codebooks):
        return
    per_micro = run.micro * run.block_size * run.world  # tokens of one micro-step over all ranks
    n = min(run.cfg.gradient_accumulation_steps, max(1, KMEANS_MAX_TOKENS // per_micro))
    x = torch.cat([micro_batch(run, it, m)[0] for m in range(n)])  # (n * micro, block_size)
    with torch.no_grad(), run.autocast:
        run.raw_model(x, last_only=True)
    for cb in run.codebooks:
        cb.pending.zero_()  # that forward was not a training step: its code usage is not counted


# ---------------------------------------------------------------------------------------------- one step
def train_step(run, it):
    """One optimizer step of iteration `it`: micro-batches, backward, clipping, AdamW, code usage counts.
    Returns (loss, ce, recon) of the step as a (3,) tensor on the device (no host sync), whether it was skipped, and
    the learning rate."""
    cfg, model = run.cfg, run.model
    lr = get_lr(it, cfg)
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    step_loss = torch.zeros(3, device=run.device)
    for micro_step in range(cfg.gradient_accumulation_steps):
        x, y = micro_batch(run, it, micro_step)
        if run.ddp:  # sync gradients on the last micro-step only
            model.require_backward_grad_sync = micro_step == cfg.gradient_accumulation_steps - 1
        with run.autocast:
            _, loss, terms = model(x, y)
        (loss / cfg.gradient_accumulation_steps).backward()
        step_loss += torch.stack([loss.detach(), terms["ce"], terms["recon"]]) / cfg.gradient_accumulation_steps
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
    skip = False
    if cfg.nan_policy == "skip":  # a host sync every step, so only on this path
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        skip = not run.finite(step_loss, norm)
    if skip:  # no update, and this step's code usage is not counted
        for cb in run.codebooks:
            cb.pending.zero_()
    else:
        run.optimizer.step()
        sync_counts(run.codebooks)
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, skip, lr


# ---------------------------------------------------------------------------------------------- evaluation, checkpoints
def evaluate(run, it):
    """Evaluate the unwrapped model, print and log the metrics (rank 0 only)."""
    if run.fsm is not None:
        m = evaluate_fsm(run.raw_model, run.fsm, run.eval_x, run.eval_y, run.cfg.eval_samples, run.cfg.seed,
                         run.autocast)
        print(f"eval {it}: loss {m['loss']:.4f}, acc {m['acc']:.4f}, valid-transition {m['valid']:.4f}, "
              f"first {m['first']:.4f}, valid mass {m['valid_mass']:.4f}, "
              f"{codebook_summary(m, run.codebooks, run.cfg.codebook_start)}")
    else:
        m = evaluate_lm(run.raw_model, run.val_data, run.eval_ix, run.micro, run.autocast)
        print(f"eval {it}: loss {m['loss']:.4f}, acc {m['acc']:.4f}, ppl {m['ppl']:.2f}, dloss {m['dloss']:+.4f} "
              f"(without codebooks {m['loss_nocb']:.4f}), "
              f"{codebook_summary(m, run.codebooks, run.cfg.codebook_start)}")
    run.log.write({"iter": it, "eval": m, "elapsed_s": run.train_time})
    return m


def checkpoint(run, it):
    """ckpt.pt, written atomically, then the log committed to it; the first one of a run that replaces another also
    replaces the old log."""
    save_checkpoint({"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "model_config": asdict(run.raw_model.config), "train_config": asdict(run.cfg), "iter_num": it,
                     "run": run.log.run_id}, run.ckpt_path, run.log)


# ---------------------------------------------------------------------------------------------- the loop
def main(argv):
    run, ok = setup(argv), False
    try:
        with run.stop:  # an interrupt, a lost DDP peer or a full disk: one line naming the checkpoint kept
            train(run)
        ok = True
    finally:
        close_run(run, failed=not ok)


def train(run):
    cfg, master, it = run.cfg, run.rank == 0, run.iter_num
    t0, tokens, window, skipped, failure, start = time.time(), 0, 0, 0, None, (time.time(), it)  # start: the ETA's
    loss_acc = torch.zeros(3, device=run.device)  # sums over the log window: loss, ce, recon
    while it < cfg.max_iters:
        if it == cfg.codebook_start:
            switch_codebooks_on(run, it)
        step_loss, skip, lr = train_step(run, it)
        it = run.stop.it = it + 1
        tokens += cfg.batch_size * run.block_size
        if skip:
            skipped += 1
            if master:
                print(f"iter {it}: the loss or the gradients are not finite, step skipped (nan_policy=skip)")
                run.log.write({"iter": it, "skipped": True})
        else:
            loss_acc += step_loss
            window += 1
            if cfg.replace_after and it % cfg.replace_after == 0 and it > cfg.codebook_start:
                for cb in run.codebooks:
                    cb.replace_dead_codes()
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            if window == 0:
                failure = f"every step of iterations {it - skipped + 1}-{it} was skipped"
                break
            if run.ddp:
                dist.all_reduce(loss_acc)  # the logged loss is the mean over ranks
                loss_acc /= run.world
            lo, ce, rc = (loss_acc / window).tolist()
            dt = time.time() - t0
            run.train_time += dt
            if master:
                print(f"iter {it}: loss {lo:.4f} (ce {ce:.4f}, recon {rc:.4f}), lr {lr:.2e}, {tokens / dt:,.0f} tok/s, "
                      f"{eta(start, it, cfg.max_iters)}" + (f", {skipped} step(s) skipped" if skipped else ""))
                run.log.write({"iter": it, "loss": lo, "ce": ce, "recon": rc, "lr": lr, "tok_per_s": tokens / dt})
            if not math.isfinite(lo):
                failure = f"the loss became {lo} by iteration {it}"
                break
            loss_acc.zero_()
            t0, tokens, window, skipped = time.time(), 0, 0, 0
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            eval_loss = evaluate(run, it)["loss"] if master else 0.0
            # a checkpoint is never written from non-finite weights, training or eval losses
            if not run.finite(loss_acc, torch.tensor(eval_loss, device=run.device), *run.raw_model.parameters()):
                failure = f"the loss or the weights are not finite at iteration {it}"
                break
            with uninterrupted():  # a signal waits until the checkpoint, its log and this note of it are all done
                if master:
                    checkpoint(run, it)
                run.stop.saved = it
            t0 = time.time()
    if master and failure is None and run.resumed and run.iter_num >= cfg.max_iters:
        evaluate(run, it)  # resuming a finished run just reports it
    if failure:  # the same on every rank: the checks above are all-reduced
        fix = "lower learning_rate or grad_clip" + (", or pass --nan_policy=skip" if cfg.nan_policy == "stop" else "")
        raise run.stop.failure(failure, fix)


# ---------------------------------------------------------------------------------------------- setup
def configure(argv, world):
    """(TrainConfig, GPTConfig, checkpoint or None) from presets and flags, checked; on resume the checkpoint's
    configs with the RESUMABLE options given applied."""
    preset, flags = parse_args(argv, (TrainConfig, GPTConfig))
    tvals, mvals = split_config({**preset, **flags}, TrainConfig, GPTConfig)
    ckpt = None
    if tvals.get("init_from") == "resume":  # write where we read: out_dir is the directory of the checkpoint
        out_dir = tvals.get("out_dir", TrainConfig.out_dir)
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), (TrainConfig, GPTConfig))
        stored = {**ckpt["train_config"], "out_dir": out_dir, "init_from": "resume", "overwrite": False}
        tvals = resume_config(stored, tvals, RESUMABLE, out_dir)
        mvals = resume_config(ckpt["model_config"], mvals, (), out_dir)
        n, c0, c1 = ckpt["iter_num"], ckpt["train_config"].get("codebook_start", 0), tvals["codebook_start"]
        if c1 != c0 and (n > c0 or n > c1):  # the switch (and its k-means) must still lie ahead; at n == c0 it does
            raise ConfigError(f"--codebook_start={c1}: the checkpoint (iteration {n}, codebook_start={c0}) "
                              f"{'has its codebooks on already' if n > c0 else f'can switch them on at >= {n}'}: "
                              "drop --codebook_start or start a new out_dir")
    cfg = build(TrainConfig, tvals)
    claim(cfg.out_dir, "train", "out_dir")  # no other kind, no user's folder, not inside another run
    pretrained = cfg.init_from not in ("scratch", "resume")  # a Pythia directory: the codebooks are ours
    gcfg = build(GPTConfig, pythia.pythia_config(cfg.init_from, **mvals) if pretrained else mvals)
    if cfg.dataset == "fsm" and gcfg.block_size < 2 * len(str(cfg.num_states - 1)) + 1:
        raise ConfigError(f"block_size={gcfg.block_size} holds fewer than two FSM states: "
                          f"use >= {2 * len(str(cfg.num_states - 1)) + 1}")
    if cfg.dataset == "fsm" and gcfg.vocab_size < TokFSM.EOT + 1:
        raise ConfigError(f"vocab_size={gcfg.vocab_size} < the FSM's {TokFSM.EOT + 1} tokens: raise vocab_size")
    if cfg.batch_size % (world * cfg.gradient_accumulation_steps):
        raise ConfigError(f"batch_size={cfg.batch_size} does not split into {world} rank(s) x "
                          f"{cfg.gradient_accumulation_steps} micro-step(s): make it a multiple of "
                          f"{world * cfg.gradient_accumulation_steps}")
    return cfg, gcfg, ckpt


def setup(argv):
    """Everything a run needs, as a namespace: configs, data, model, optimizer, the owned out_dir and its log.
    Whatever can fail on bad input fails here, before the process group exists, so that each rank stops with
    its one-line error instead of leaving the others waiting in a collective."""
    rank, world = torchrun_ranks()  # torchrun's environment, checked; (None, 1) without it
    ddp, rank = rank is not None, rank or 0  # DDP, as nanoGPT: one process per device, rank 0 logs and saves
    cfg, gcfg, ckpt = configure(argv, world)
    run = SimpleNamespace(cfg=cfg, rank=rank, world=world, ddp=ddp, block_size=gcfg.block_size, fsm=None,
                          micro=cfg.batch_size // (world * cfg.gradient_accumulation_steps), resumed=ckpt is not None,
                          iter_num=ckpt["iter_num"] if ckpt else 0, train_time=0.0, lock=None, log=None,
                          ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"))
    run.device = rank_device(cfg.device, ddp)
    check_training(cfg, gcfg, world, run.device)  # sizes that cannot fit stop here, before the first big allocation
    run.stop = EarlyStop(cfg.out_dir, run.iter_num if ckpt else None, False, rank, world)  # where the run stands
    if cfg.dataset == "fsm":
        run.fsm = TokFSM(cfg.num_states, cfg.num_edges, cfg.fsm_seed)
        run.eval_x, run.eval_y = run.fsm.eval_set(cfg.eval_seqs, gcfg.block_size)
    else:  # token files, checked against the model; a fixed set of val windows, as fsm.eval_set
        run.train_data, run.val_data = load_tokens(cfg.dataset, gcfg.block_size, gcfg.vocab_size)
        run.eval_ix = torch.randint(len(run.val_data) - gcfg.block_size, (cfg.eval_iters * run.micro,),
                                    generator=torch.Generator().manual_seed(1234))
    run.autocast = autocast_for(run.device, cfg.dtype)
    if rank == 0:  # own out_dir before looking at what it holds; temporary files left by a killed run go
        run.lock = DirLock(cfg.out_dir)
        for name in ("ckpt.pt", "log.jsonl"):
            remove_leftovers(os.path.join(cfg.out_dir, name))
    try:
        run.stop.replacing = not run.resumed and os.path.exists(run.ckpt_path)  # the old run stays until our checkpoint
        if run.stop.replacing and not cfg.overwrite:
            raise ConfigError(f"{cfg.out_dir} already holds a run: pass --init_from=resume, --overwrite=true "
                              "or another --out_dir")
        build_model(run, gcfg, ckpt)
        if rank == 0:
            run.log = RunLog(os.path.join(cfg.out_dir, "log.jsonl"), ckpt.get("run") if ckpt else None,
                             run.iter_num if ckpt else None, pending=run.stop.replacing)
    except BaseException:
        close_run(run)
        raise
    if ddp:  # bypassed codebooks (before codebook_start) get no gradient, which DDP must be told
        unused = bool(run.codebooks) and run.iter_num < cfg.codebook_start
        run.model, run.stop.peers = join_process_group(run.model, run.device, unused)
    run.finite = AllFinite(run.device, ddp)
    if rank == 0 and run.iter_num >= cfg.max_iters:  # a resume with nothing left to train
        print(f"note: {cfg.out_dir} is at iteration {run.iter_num}, which reaches max_iters={cfg.max_iters}: nothing "
              f"to train, only its evaluation (pass --max_iters above {run.iter_num} to go on)", file=sys.stderr)
    if rank == 0:
        n_cb = sum(cb.codes.numel() for cb in run.codebooks)
        print(f"{run.raw_model.get_num_params() / 1e6:.2f}M parameters ({n_cb / 1e6:.2f}M in {len(run.codebooks)} "
              f"codebooks); {world} rank(s) x {run.micro} sequences x {cfg.gradient_accumulation_steps} micro-steps; "
              f"device {run.device}" + ("" if run.fsm else f"; data {cfg.dataset}: {len(run.train_data):,} train and "
                                         f"{len(run.val_data):,} val tokens"))
    return run


def build_model(run, gcfg, ckpt):
    """The model (from scratch, a Pythia directory or the checkpoint), its optimizer and RNG state."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed + run.rank)
    if cfg.init_from not in ("scratch", "resume"):
        model = GPT.from_pythia(cfg.init_from, **{k: getattr(gcfg, k) for k in pythia.OVERRIDES})
        if run.rank == 0 and gcfg.sites and gcfg.codebook_layernorm:
            print("note: codebook_layernorm=true adds a fresh LayerNorm before each codebook, which changes the "
                  "pretrained model's function even with its codebooks bypassed (--codebook_layernorm=false keeps it)")
    else:
        model = GPT(gcfg)
    if ckpt is not None:
        load_state(model, ckpt["model"], f"the weights in {run.ckpt_path}")
    model.to(run.device)
    run.optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               cfg.codebook_lr)
    if ckpt is not None:
        scales = [g["lr_scale"] for g in run.optimizer.param_groups]  # this config's, not the checkpoint's
        try:
            run.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"the optimizer state in {run.ckpt_path} does not match the model "
                              f"({str(e).splitlines()[0]}): use the checkpoint of the run itself") from None
        for g, scale in zip(run.optimizer.param_groups, scales):  # a resumed learning_rate keeps codebook_lr
            g["lr_scale"] = scale
    run.raw_model, run.codebooks = model, [cb for _, cb in model.codebooks()]
    for cb in run.codebooks:  # the warm start: bypassed until the switch at codebook_start
        cb.bypass = run.iter_num <= cfg.codebook_start
    run.model = torch.compile(model) if cfg.compile else model


if __name__ == "__main__":
    cli(main)
