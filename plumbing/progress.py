"""
Progress bars for the loops that can run longer than a few seconds (tqdm, on stderr), and the ETA of train.py's
log lines. Bars show when stderr is a terminal; CODEBOOK_PROGRESS=1 turns them on anyway (a log file, CI) and
CODEBOOK_PROGRESS=0 turns them off. Only the first process of a torchrun run draws them. A bar only watches: what a
loop computes and what it prints on stdout are the same with and without it.
"""

import contextlib
import sys
import time

from plumbing.configuration import environment
from plumbing.entry import require


def enabled():
    """Whether bars are drawn: CODEBOOK_PROGRESS=1 or 0 if set, else whether stderr is a terminal; rank 0 only."""
    if environment("RANK", 0) != 0:
        return False
    flag = environment("CODEBOOK_PROGRESS")
    return sys.stderr.isatty() if flag is None else flag


def _tqdm():
    return require("tqdm", "progress bars (CODEBOOK_PROGRESS=0 turns them off)").tqdm


def progress(iterable, total=None, desc=None):
    """`iterable` itself, or wrapped in a tqdm bar on stderr when bars are on. total: its length, when it has none
    (a generator); desc: the bar's label."""
    if not enabled():
        return iterable
    return _tqdm()(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def forward_progress(module, total, desc=None):
    """A bar advanced by each forward call of `module` within the block (model.generate: one per new token, after
    one for the prompt), when bars are on. A forward hook that only counts: the outputs are untouched."""
    if not enabled():
        yield
        return
    bar = _tqdm()(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def count(*_):  # returns None: a forward hook that returned a value would replace the module's output
        bar.update()

    handle = module.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def eta(start, it, end):
    """"ETA 1h02m", "ETA 3m05s" or "ETA 12s": the time to go from step `it` to step `end` at the mean time per step
    since `start` = (time.time(), step) of the start (wall time: evaluations and checkpoints included)."""
    t0, it0 = start
    s = round((time.time() - t0) / max(it - it0, 1) * (end - it))
    return f"ETA {s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"ETA {s // 60}m{s % 60:02d}s" if s >= 60 \
        else f"ETA {s}s"
