"""Stopping early, in one line: SIGINT and SIGTERM during training (a real process, then a bitwise-exact resume;
a signal during a checkpoint waits for it), a full disk while saving, a DDP rank killed under torchrun (gloo, 2
ranks), Ctrl-C in the other tools, a resume with nothing left to train, and the note of a lock nobody holds. Each
ends with one line that names what happened, the checkpoint kept and how to go on; the lock is freed and log.jsonl
ends at the checkpoint. CPU; every subprocess runs one thread."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, same_state

import train
from plumbing import rundir
from plumbing.entry import cli
from plumbing.rundir import DirLock

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--codebook_sites=attn_heads,mlp", "--num_codes=32", "--device=cpu"]
# k-means at the switch, dead-code replacement, a checkpoint every 2 steps; a constant learning rate after the
# warmup, so that max_iters changes nothing before it is reached
EXACT = [*TINY, "--codebook_start=2", "--kmeans_init=true", "--replace_after=2", "--eval_interval=2",
         "--log_interval=1", "--lr_schedule=constant", "--warmup_iters=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
LINE = (r"interrupted by {sig} at iteration (\d+); the checkpoint of iteration (\d+) in {out} is kept; "
        r"resume with `{launch} train.py --init_from=resume --out_dir={out}`")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def iters(out):
    return [json.loads(line)["iter"] for line in open(os.path.join(out, "log.jsonl"))]


def wait_for(path, proc, timeout=180):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_in_training_then_an_exact_resume(tmp_path):
    """SIGINT to a real `python train.py` mid-run: one line naming the iteration reached, the checkpoint kept and
    the resume command, status 130, no traceback, the lock freed, log.jsonl ending at that checkpoint. The resume
    it names ends bitwise where a run never interrupted ends."""
    out, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    p = subprocess.Popen([sys.executable, "train.py", *EXACT, "--max_iters=100000", f"--out_dir={out}"], cwd=ROOT,
                         env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(os.path.join(out, "ckpt.pt"), p)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130 and len(err.strip().splitlines()) == 1, err[-3000:]
    m = re.fullmatch(LINE.format(sig="SIGINT", out=re.escape(out), launch="python"), err.strip())
    assert m, err
    at, kept = map(int, m.groups())
    assert load(os.path.join(out, "ckpt.pt"))["iter_num"] == kept and kept <= at
    assert max(iters(out)) == kept and not os.path.exists(os.path.join(out, ".lock"))
    end = kept + 3  # past the next checkpoint and k-means at 2
    runs = [subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
            for args in (["--init_from=resume", f"--max_iters={end}", f"--out_dir={out}"],
                         [*EXACT, f"--max_iters={end}", f"--out_dir={straight}"])]  # side by side
    for r in runs:
        assert r.wait(timeout=300) == 0, r.communicate()[1][-3000:]
    a, b = load(os.path.join(straight, "ckpt.pt")), load(os.path.join(out, "ckpt.pt"))
    assert a["iter_num"] == b["iter_num"] == end
    same_state(a["model"], b["model"], "model")
    same_state(a["optimizer"], b["optimizer"], "optimizer")
    evals = lambda o: [r["eval"] for r in map(json.loads, open(os.path.join(o, "log.jsonl"))) if "eval" in r]  # noqa
    assert evals(out) == evals(straight) and iters(out) == sorted(iters(out))


def test_sigterm_during_a_checkpoint_waits_for_it(tmp_path, monkeypatch, capsys):
    """SIGTERM that arrives while the checkpoint of iteration 4 is being written is held until the checkpoint and its
    log are complete: the line names that checkpoint, status 143, and the handlers are restored afterwards."""
    out, real, saved = str(tmp_path / "run"), torch.save, []

    def save(obj, f):
        saved.append(obj["iter_num"])
        if obj["iter_num"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        real(obj, f)

    monkeypatch.setattr(rundir.torch, "save", save)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        cli(train.main, [*TINY, "--max_iters=10", "--eval_interval=2", "--log_interval=1", f"--out_dir={out}"])
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
    line = capsys.readouterr().err.strip()
    assert re.fullmatch(LINE.format(sig="SIGTERM", out=re.escape(out), launch="python"), line), line
    assert "at iteration 4; the checkpoint of iteration 4" in line and saved == [2, 4]
    assert load(os.path.join(out, "ckpt.pt"))["iter_num"] == max(iters(out)) == 4
    assert sorted(os.listdir(out)) == [".codebook-kind.json", "ckpt.pt", "log.jsonl"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_keeps_the_old_checkpoint(tmp_path, monkeypatch, capsys):
    """The checkpoint of iteration 4 is written to /dev/full (a real ENOSPC, which torch reports as a RuntimeError):
    one line, the checkpoint of iteration 2 byte-identical, log.jsonl cut back to it, nothing else left; the resume
    it names then goes on."""
    out, real, before = str(tmp_path / "run"), torch.save, {}

    def save(obj, f):
        if obj["iter_num"] == 4:
            before["ckpt"] = open(os.path.join(out, "ckpt.pt"), "rb").read()
            with open("/dev/full", "wb") as full:
                real(obj, full)
        real(obj, f)

    monkeypatch.setattr(rundir.torch, "save", save)
    with pytest.raises(SystemExit) as e:
        cli(train.main, [*TINY, "--max_iters=6", "--eval_interval=2", "--log_interval=1", f"--out_dir={out}"])
    assert e.value.code == (f"error: No space left on device ({out}/ckpt.pt) at iteration 4; the checkpoint of "
                            f"iteration 2 in {out} is kept; free some space, then resume with `python train.py "
                            f"--init_from=resume --out_dir={out}`")
    assert capsys.readouterr().err == ""
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before["ckpt"] and max(iters(out)) == 2
    assert sorted(os.listdir(out)) == [".codebook-kind.json", "ckpt.pt", "log.jsonl"]
    monkeypatch.setattr(rundir.torch, "save", real)
    train.main(["--init_from=resume", "--max_iters=4", f"--out_dir={out}"])
    assert load(os.path.join(out, "ckpt.pt"))["iter_num"] == 4 and iters(out) == sorted(iters(out))


def children(pid):
    """{RANK: pid} of the worker processes that torchrun process `pid` started (Linux /proc)."""
    ranks = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                env = dict(v.split("=", 1) for v in open(f"/proc/{p}/environ").read().split("\0") if "=" in v)
                ranks[int(env["RANK"])] = int(p)
        except (OSError, KeyError, IndexError):
            pass
    return ranks


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
def test_a_killed_ddp_rank_is_named_by_the_survivor(tmp_path):
    """torchrun, 2 gloo ranks; rank 1 is killed (SIGKILL) after the first checkpoint. Rank 0 says in one line
    that it lost rank 1, naming its PID, then the checkpoint it keeps and the torchrun command that resumes; it
    frees the lock and cuts log.jsonl back to that checkpoint. (Whether rank 0 sees the broken connection or
    torchrun's SIGTERM first, the line names the lost rank.)"""
    out, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          f"--log-dir={logs}", "--redirects=3", "train.py", *TINY, "--max_iters=100000",
                          "--eval_interval=2", "--log_interval=1", f"--out_dir={out}"], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(os.path.join(out, "ckpt.pt"), p)
        victim = children(p.pid)[1]
        os.kill(victim, signal.SIGKILL)
        p.communicate(timeout=120)
    finally:
        p.kill()
    stderr = open(next(os.path.join(d, "attempt_0", "0", "stderr.log") for d in
                       [os.path.join(logs, x) for x in os.listdir(logs)])).read()
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert f"rank 1 (pid {victim}, which no longer runs)" in lines[0], lines[0]
    m = re.search(rf"at iteration (\d+)(?: after losing .*)?; the checkpoint of iteration (\d+) in {re.escape(out)} "
                  rf"is kept; resume with `torchrun --standalone --nproc_per_node=2 train.py --init_from=resume "
                  rf"--out_dir={re.escape(out)}`$", lines[0])
    assert m and lines[0].startswith(("error: lost rank 1", "interrupted by SIGTERM")), lines[0]
    kept = int(m.group(2))
    assert load(os.path.join(out, "ckpt.pt"))["iter_num"] == kept == max(iters(out))
    assert not os.path.exists(os.path.join(out, ".lock"))


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_tool_says_one_line(sig, status, capsys):
    """Any entry point under `cli` (sample, analyze, steer, topics, sae, prepare): one line, 130 or 143, no
    traceback; their outputs are staged or atomic, so nothing is half-written."""
    def main(argv):
        os.kill(os.getpid(), sig)
        time.sleep(10)

    with pytest.raises(SystemExit) as e:
        cli(main, [])
    err = capsys.readouterr().err
    assert e.value.code == status and err.count("\n") == 1, err
    assert err.startswith(f"interrupted by {signal.Signals(sig).name}: no output was left half-written")


def test_a_resume_with_nothing_left_says_so(tmp_path, capsys):
    """--init_from=resume with max_iters at or below the checkpoint's iteration: a note, the evaluation, status 0,
    the checkpoint unchanged."""
    out = str(tmp_path / "run")
    train.main([*TINY, "--max_iters=2", "--eval_interval=2", f"--out_dir={out}"])
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    capsys.readouterr()
    for n in (2, 1):
        cli(train.main, ["--init_from=resume", f"--max_iters={n}", f"--out_dir={out}"])
        captured = capsys.readouterr()
        assert f"note: {out} is at iteration 2, which reaches max_iters={n}: nothing to train" in captured.err
        assert "eval 2:" in captured.out
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_the_lock_note_tells_the_truth(tmp_path, capsys):
    """A lock file that nobody holds names its writer truthfully: one that no longer runs, or one that runs (here
    this very process) without holding it (a copied directory, a reused PID)."""
    d = tmp_path / "d"
    d.mkdir()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid, note in ((os.getpid(), f"names process {os.getpid()}, which runs but does not hold it"),
                      (int(done.stdout), f"was left by process {int(done.stdout)}, which no longer runs")):
        (d / ".lock").write_text(f"{pid}\n")
        with DirLock(str(d)):
            pass
        err = capsys.readouterr().err
        assert note in err and err.endswith(": taken over\n"), err
