"""
torch.distributed plumbing for train.py: leaving the process group without hanging, and one finite check over
every rank.
"""

import os
import sys
import threading

import torch


def end_process_group(timeout_s=60.0, failed=False):
    """Leave torch.distributed: a barrier, then destroy_process_group (without the barrier gloo can abort at exit).
    Both can hang, rarely, once the work is done (a known torch problem, seen here with gloo); after `timeout_s`
    seconds the process exits (status 1 if `failed`, else 0) with a warning, its outputs being complete already."""
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout_s):
            print(f"warning: torch.distributed did not shut down within {timeout_s:g} s; exiting without it "
                  "(every output was written before)", file=sys.stderr, flush=True)
            os._exit(1 if failed else 0)
    threading.Thread(target=watchdog, daemon=True).start()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
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
            torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MIN)
        return bool(self.flag.item())
