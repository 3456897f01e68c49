"""
Fault trials for train.py: kill training with SIGKILL at random moments, some of them in the middle of a
checkpoint write, then check that the last checkpoint on disk loads and that --init_from=resume from it finishes
the run, bitwise equal to a run that was never interrupted. (The bad-input cases are tests/test_reliability.py.)

    python scripts/fault_trials.py                  # 20 crash trials (~2-3 minutes on one CPU thread)
    python scripts/fault_trials.py --trials=3 --seed=1

A trial starts a tiny TokFSM run that checkpoints every 2 iterations (a ~1 MB ckpt.pt, written to a temporary
file, fsynced and renamed). Half the trials ("write") poll out_dir for the temporary file of a randomly chosen
checkpoint (the 2nd to the last: a kill during the first write leaves no checkpoint to load) and kill the process
0-8 ms after it appears, while the write is in flight; the others ("random") kill it at a random moment between
the first checkpoint and the end of the run, as timed on the uninterrupted reference run. A kill counts as
"in write" when it left the temporary file behind. Every process runs with OMP_NUM_THREADS=1. The exit status
is 1 if any trial fails.
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and in every child

import torch  # noqa: E402

from model import model_from_checkpoint  # noqa: E402
from plumbing.configuration import ConfigError, parse_config, spec, validate  # noqa: E402
from plumbing.entry import cli  # noqa: E402
from plumbing.rundir import load_checkpoint  # noqa: E402

MAX_ITERS = 16
RUN = ["--n_layer=1", "--n_embd=64", "--n_head=4", "--num_codes=512", "--block_size=16", "--batch_size=8",
       "--eval_interval=2", "--log_interval=2", "--eval_seqs=16", "--eval_samples=8", "--codebook_start=4",
       "--kmeans_init=true", "--replace_after=4", "--device=cpu", f"--max_iters={MAX_ITERS}"]


def train_cmd(args):
    return [sys.executable, os.path.join(ROOT, "train.py"), *args]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def same_state(a, b):
    """Bitwise equality of nested checkpoint values (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def log_ok(path):
    """log.jsonl parses line by line and its iterations never go back."""
    try:
        iters = [json.loads(line)["iter"] for line in open(path)]
    except (OSError, ValueError, KeyError):
        return False
    return iters == sorted(iters)


def start(out):
    return subprocess.Popen(train_cmd([*RUN, f"--out_dir={out}"]), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_for_checkpoint(proc, out):
    while proc.poll() is None and not os.path.exists(os.path.join(out, "ckpt.pt")):
        time.sleep(0.005)


def kill_run(out, mode, rng, span):
    """Start a run in `out` and SIGKILL it. Returns (seconds after start, whether it had already finished)."""
    tmp_pattern = os.path.join(out, ".ckpt.pt.codebook-tmp-*")
    proc = start(out)
    t0 = time.time()
    if mode == "write":  # the n-th checkpoint write (n >= 2), a few ms after its temporary file appears
        target, seen, writing = rng.randint(2, MAX_ITERS // 2), 0, False
        while proc.poll() is None:
            now = bool(glob.glob(tmp_pattern))
            if now and not writing:
                seen += 1
                if seen == target:
                    time.sleep(rng.uniform(0, 0.008))
                    break
            writing = now
            time.sleep(0.0005)
    else:  # a random moment between the first checkpoint and the end of the run
        wait_for_checkpoint(proc, out)
        time.sleep(rng.uniform(0, span))
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return time.time() - t0, finished


def trial(i, root, reference, span, seed):
    rng = random.Random(seed * 1000 + i)
    mode = "write" if i % 2 == 0 else "random"
    out = os.path.join(root, f"trial{i:02d}")
    killed_at, finished = kill_run(out, mode, rng, span)
    row = {"trial": i, "mode": mode, "killed_s": killed_at, "finished": finished,
           "in_write": bool(glob.glob(os.path.join(out, ".ckpt.pt.codebook-tmp-*"))), "ckpt_iter": None,
           "loadable": False, "resumed": False, "exact": False, "log_ok": False}
    try:
        ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
        model_from_checkpoint(ckpt)
        row["loadable"], row["ckpt_iter"] = True, ckpt["iter_num"]
    except ConfigError as e:
        row["why"] = str(e)
        return row
    r = subprocess.run(train_cmd(["--init_from=resume", f"--out_dir={out}"]), cwd=ROOT, env=env(),
                       capture_output=True, text=True)
    if r.returncode != 0:
        row["why"] = r.stderr.strip().splitlines()[-1:] or ["exit status %d" % r.returncode]
        return row
    final = load_checkpoint(os.path.join(out, "ckpt.pt"))
    row["resumed"] = final["iter_num"] == MAX_ITERS and not glob.glob(os.path.join(out, ".ckpt.pt.codebook-tmp-*"))
    row["exact"] = all(same_state(final[k], reference[k]) for k in ("model", "optimizer", "iter_num"))
    row["log_ok"] = log_ok(os.path.join(out, "log.jsonl"))
    return row


def crash_trials(n, seed, root):
    ref_dir = os.path.join(root, "reference")
    proc = start(ref_dir)  # the uninterrupted run; also times the span from its first checkpoint to its end
    wait_for_checkpoint(proc, ref_dir)
    t0 = time.time()
    if proc.wait() != 0:
        sys.exit(f"error: the reference run failed: python train.py {' '.join(RUN)}")
    span = time.time() - t0
    reference = load_checkpoint(os.path.join(ref_dir, "ckpt.pt"))
    print(f"{n} trials of {MAX_ITERS} iterations, a checkpoint every 2; reference run in {ref_dir}: "
          f"{span:.2f}s from its first checkpoint to its end")
    print(f"{'trial':>5}  {'mode':<6} {'kill at':>8}  {'in write':<8}  {'ckpt iter':>9}  {'loadable':<8}  "
          f"{'resumed':<7}  {'bitwise':<7}  {'log ok':<6}")
    rows = []
    for i in range(n):
        row = trial(i, root, reference, span, seed)
        rows.append(row)
        yes = lambda v: "yes" if v else "no"  # noqa: E731
        kill = "finished" if row["finished"] else f"{row['killed_s']:.3f}s"
        print(f"{i:>5}  {row['mode']:<6} {kill:>8}  {yes(row['in_write']):<8}  {str(row['ckpt_iter']):>9}  "
              f"{yes(row['loadable']):<8}  {yes(row['resumed']):<7}  {yes(row['exact']):<7}  {yes(row['log_ok']):<6}"
              + (f"  {row['why']}" if "why" in row else ""), flush=True)
    totals = {k: sum(r[k] for r in rows) for k in ("loadable", "resumed", "exact", "in_write", "log_ok")}
    print(f"trials {n}, loadable {totals['loadable']}, resumed {totals['resumed']} "
          f"(bitwise equal to the uninterrupted run: {totals['exact']}; clean log: {totals['log_ok']}; "
          f"killed during a checkpoint write: {totals['in_write']})")
    return all(r["loadable"] and r["resumed"] and r["exact"] and r["log_ok"] for r in rows)


@dataclass
class TrialsConfig:
    """Crash trials."""

    trials: int = spec(20, ">= 1")  # SIGKILL trials, half during a checkpoint write
    seed: int = spec(0, ">= 0")  # of the kill moments
    keep: bool = False  # keep the work directory

    def __post_init__(self):
        validate(self)


def main(argv):
    args = parse_config(argv, TrialsConfig)
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="fault_trials_")
    try:
        ok = crash_trials(args.trials, args.seed, root)
    finally:
        if args.keep:
            print(f"work directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cli(main)
