"""
torch.distributed plumbing for train.py and the codebook layer: joining the process group, leaving it without
hanging, one finite check over every rank, naming a rank that was lost, and the collectives the codebook statistics
use (rank 0 computes, every rank receives; rows gathered from every rank).
"""

import os
import re
import socket
import sys
import threading
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing.configuration import device_of, environment
from plumbing.files import pid_alive


def distributed():
    """Whether torch.distributed is initialised (a DDP run)."""
    return dist.is_available() and dist.is_initialized()


def is_rank0():
    """Rank 0 of a DDP run, or the only process."""
    return not distributed() or dist.get_rank() == 0


def rank0_broadcast(t):
    """Make every rank hold rank 0's values of t (a no-op without torch.distributed)."""
    if distributed():
        dist.broadcast(t, src=0)


def gather_rows(a, max_tokens):
    """a (N, ...) -> the rows of every rank, (world * n, ...), each rank sending n = min(N, max_tokens // world)
    rows drawn at random (the same n on every rank). Without torch.distributed: a, or max_tokens rows of it."""
    world = dist.get_world_size() if distributed() else 1
    n = torch.tensor([min(a.shape[0], max(1, max_tokens // world))], device=a.device)
    if world > 1:
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n = int(n)
    if n < a.shape[0]:
        a = a[torch.randperm(a.shape[0], device=a.device)[:n]]
    if world == 1:
        return a
    parts = [torch.empty_like(a) for _ in range(world)]
    dist.all_gather(parts, a.contiguous())
    return torch.cat(parts)


def rank_device(name, ddp):
    """The device of this process for a validated device name (configuration.device_of); under DDP on CUDA, the GPU
    of its LOCAL_RANK, made the current one."""
    device = device_of(name)
    if ddp and device.startswith("cuda"):
        device = f"cuda:{environment('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    return device


def join_process_group(model, device, find_unused):
    """Join the process group (nccl on CUDA, gloo on CPU) and wrap the model in DDP, its buffers (code counts) left
    to sync_counts. find_unused: some parameters get no gradient (bypassed codebooks, before codebook_start).
    Returns (the DDP model, [(host, pid)] of every rank: `lost_peer` names a rank that vanishes by it)."""
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    with warnings.catch_warnings():  # torch 2.13 deprecates broadcast_buffers=False, with no replacement yet
        warnings.filterwarnings("ignore", ".*broadcast_buffers", FutureWarning)
        model = DDP(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused)
    peers = [None] * dist.get_world_size()
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    return model, peers


def every_parameter_used(model):
    """The DDP `model` (join_process_group) wrapped again without find_unused_parameters, for the rest of a run in
    which every parameter gets a gradient (the codebooks switched on): the search for unused parameters costs a
    traversal of the autograd graph every step, and torch warns on every rank that it found none. The old wrapper
    is dropped (its gradient hooks go with it); the new one checks that the ranks' parameters agree."""
    if not model.find_unused_parameters:
        return model
    ids = model.device_ids
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*broadcast_buffers", FutureWarning)
        return DDP(model.module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=False)


def lost_peer(exc, peers, wait_s=2.0):
    """The other rank(s) that made this one stop, as far as can be known: "rank 1 (pid 123, which no longer runs)"
    for the ranks of this host whose process ended (waiting up to `wait_s` for one: a killed process closes its
    connections a moment before it is gone), "the connection to another rank (...)" for a network error of the
    backend, else None. peers: [(host, pid)] of every rank (`join_process_group`)."""
    host, deadline = socket.gethostname(), time.time() + wait_s
    while True:
        lost = [(r, pid) for r, (h, pid) in enumerate(peers) if h == host and pid != os.getpid() and not pid_alive(pid)]
        if lost or time.time() > deadline:
            break
        time.sleep(0.02)
    if len(lost) == 1:
        return f"rank {lost[0][0]} (pid {lost[0][1]}, which no longer runs)"
    if lost:
        return "ranks " + ", ".join(f"{r} (pid {pid})" for r, pid in lost) + ", which no longer run"
    text = str(exc).strip()
    if isinstance(exc, dist.DistError) or re.search(r"gloo|NCCL|Connection (closed|reset)|Broken pipe", text):
        reason = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "").split(". ")[0][:160]
        return f"the connection to another rank ({reason})"
    return None


def end_process_group(timeout_s=60.0, failed=False, barrier=True):
    """Leave torch.distributed: a barrier, then destroy_process_group (without the barrier gloo can abort at exit).
    Both can hang, rarely, once the work is done (a known torch problem, seen here with gloo); after `timeout_s`
    seconds the process exits (status 1 if `failed`, else 0) with a warning, its outputs being complete already.
    barrier=False: the ranks no longer meet (one was lost or interrupted mid-step), so only destroy."""
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout_s):
            print(f"warning: torch.distributed did not shut down within {timeout_s:g} s; exiting without it "
                  "(every output was written before)", file=sys.stderr, flush=True)
            os._exit(1 if failed else 0)
    threading.Thread(target=watchdog, daemon=True).start()
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
    done.set()


class AllFinite:
    """all_finite(*tensors): whether every value is finite on every rank (all-reduced under DDP), one host sync."""

    def __init__(self, device, ddp):
        # a persistent flag, because a temporary tensor handed to gloo can hang the exit: gloo's thread then needs
        # the GIL to free it while the main thread, holding it, waits for that thread in the group's teardown
        self.flag, self.ddp = torch.ones((), device=device), ddp

    def __call__(self, *tensors):
        self.flag.copy_(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        if self.ddp:
            dist.all_reduce(self.flag, op=dist.ReduceOp.MIN)
        return bool(self.flag.item())
