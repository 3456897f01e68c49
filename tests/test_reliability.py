"""Reliability: exact resume on the FSM and LM paths, crash-safe checkpoints (SIGKILL trials through
scripts/fault_trials.py), one owner per run directory (a lock), resume writing where it reads, a replacing run that
leaves the old one whole until its first checkpoint, staged analysis outputs, numerical faults (nan_policy stop and
skip, a codebook fed zeros) and per-step DDP consistency on 2 gloo ranks. Bad input: tests/test_bad_input.py.
CPU; every subprocess runs one thread."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import train  # noqa: E402
from codebook import CodebookLayer  # noqa: E402
from conftest import same_state, write_tokens  # noqa: E402

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--codebook_sites=attn_heads,mlp", "--num_codes=32", "--device=cpu"]
TOKENS_VOCAB = 64  # the token datasets below: ids < 64, a model with vocab_size=64
LM = ["--vocab_size=64"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run(script, args, timeout=300):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def torchrun_cmd(script, args, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra, script,
            *map(str, args)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A finished 2-iteration FSM run and a token directory (ids < 64), for the resume and fault tests."""
    root = str(tmp_path_factory.mktemp("fixtures"))
    fx = {"run": os.path.join(root, "run")}
    r = run("train.py", [*TINY, "--max_iters=2", "--eval_interval=2", "--log_interval=1", "--codebook_start=1",
                         f"--out_dir={fx['run']}"])
    assert r.returncode == 0, r.stderr
    fx["tokens"] = write_tokens(os.path.join(root, "tokens"), np.random.default_rng(0).integers(0, TOKENS_VOCAB, 4000))
    return fx


# ---------------------------------------------------------------------------------------------- exact resume
WARM = ["--codebook_start=2", "--kmeans_init=true", "--replace_after=2", "--eval_interval=2", "--log_interval=2"]


def data_args(path, fx):
    return ["--dataset=" + fx["tokens"], *LM] if path == "lm" else []


@pytest.fixture(scope="module")
def straight(fx, tmp_path_factory):
    """6 iterations without a stop, on each data path: {path: out_dir}."""
    outs = {}
    for path in ("fsm", "lm"):
        outs[path] = str(tmp_path_factory.mktemp(f"straight_{path}"))
        r = run("train.py", [*TINY, *WARM, *data_args(path, fx), "--max_iters=6", f"--out_dir={outs[path]}",
                             "--overwrite=true"])
        assert r.returncode == 0, r.stderr
    return outs


@pytest.mark.slow
@pytest.mark.parametrize("path,stop", [("fsm", 2), ("fsm", 3), ("lm", 3)])
def test_resume_is_bitwise_exact(path, stop, fx, straight, tmp_path):
    """Stop at `stop`, resume to 6: the weights, the codebook buffers (counts, recent), the AdamW state and the RNG
    state equal those of the straight run, bit for bit. The codebooks switch on at 2 with k-means, and dead codes are
    replaced every 2 steps: stopping at 2 leaves k-means pending across the resume, stopping at 3 must not rerun it."""
    out = str(tmp_path / "split")
    r = run("train.py", [*TINY, *WARM, *data_args(path, fx), f"--max_iters={stop}", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    half = load(os.path.join(out, "ckpt.pt"))
    assert half["iter_num"] == stop
    r = run("train.py", ["--init_from=resume", "--max_iters=6", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    a, b = load(os.path.join(straight[path], "ckpt.pt")), load(os.path.join(out, "ckpt.pt"))
    assert b["iter_num"] == 6
    for key in ("model", "optimizer"):
        same_state(a[key], b[key], key)
    buffers = [k for k in b["model"] if k.endswith((".counts", ".recent"))]
    assert len(buffers) == 4 and all(b["model"][k].sum() > 0 for k in buffers if k.endswith(".counts"))
    assert not torch.equal(half["model"]["transformer.h.0.codebooks.mlp.codes"], b["model"]["transformer.h.0.codebooks.mlp.codes"])
    # the evaluations after the resume see the same model, so they match too; the log stays in order
    evals = lambda o: {r["iter"]: r["eval"] for r in records(o) if "eval" in r and r["iter"] > stop}  # noqa: E731
    assert evals(out) == evals(straight[path]) and set(evals(out)) == {4, 6}
    iters = [r["iter"] for r in records(out)]
    assert iters == sorted(iters)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["fsm", "lm"])
def test_resume_continues_the_data_stream(path, fx, tmp_path, monkeypatch):
    """The micro-batches a resumed run trains on are those the straight run trained on after the stop point
    (in process: GPT records every training input)."""
    seen = []

    class Recording(train.GPT):
        def forward(self, idx, targets=None, cache=None, last_only=False):
            if self.training and targets is not None:
                seen.append(idx.clone())
            return super().forward(idx, targets, cache, last_only)

    monkeypatch.setattr(train, "GPT", Recording)
    args = [*TINY, *data_args(path, fx), "--gradient_accumulation_steps=2", "--eval_interval=3", "--log_interval=3",
            "--codebook_start=0", "--kmeans_init=false"]
    train.main([*args, "--max_iters=6", f"--out_dir={tmp_path / 'straight'}"])
    straight_batches = seen[:]
    seen.clear()
    train.main([*args, "--max_iters=3", f"--out_dir={tmp_path / 'split'}"])
    assert len(seen) == 6
    train.main(["--init_from=resume", "--max_iters=6", f"--out_dir={tmp_path / 'split'}"])
    assert len(straight_batches) == len(seen) == 12  # 6 steps x 2 micro-steps
    for i, (a, b) in enumerate(zip(straight_batches, seen)):
        assert torch.equal(a, b), f"micro-batch {i}"
    assert len({x.numpy().tobytes() for x in seen}) == 12  # each micro-step reads new data


# ---------------------------------------------------------------------------------------------- crash safety
@pytest.mark.slow
def test_fault_trials_kill_and_resume():
    """Two SIGKILL trials (one aimed at a checkpoint write, one at a random moment) through the script."""
    r = subprocess.run([sys.executable, "scripts/fault_trials.py", "--trials=2", "--seed=1"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "trials 2, loadable 2, resumed 2 (bitwise equal to the uninterrupted run: 2; clean log: 2;" in r.stdout


# ---------------------------------------------------------------------------------------------- numerical faults
@pytest.mark.slow
@pytest.mark.parametrize("log_interval,eval_interval", [(1, 100), (100, 2)])
def test_diverging_run_stops_and_keeps_the_last_finite_checkpoint(log_interval, eval_interval, fx, tmp_path):
    """A real fault: learning_rate=1e6 drives the loss to inf/NaN within a few steps. The run stops with one line
    naming the checkpoint it kept, whether the log (every step) or the check before a checkpoint (every
    `eval_interval`, here with no log in between) sees it first; that checkpoint is finite."""
    out = str(tmp_path / "run")
    shutil.copytree(fx["run"], out)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    r = run("train.py", ["--init_from=resume", "--learning_rate=1e6", "--warmup_iters=0", "--max_iters=60",
                         f"--log_interval={log_interval}", f"--eval_interval={eval_interval}", f"--out_dir={out}"])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "not finite" in lines[0] or "the loss became" in lines[0], lines[0]
    assert "--nan_policy=skip" in lines[0]
    kept = int(re.search(r"checkpoint of iteration (\d+)", lines[0]).group(1))
    failed = int(re.search(r"iteration (\d+);", lines[0]).group(1))
    ckpt = load(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] == kept < failed < 60
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    if eval_interval == 100:  # no checkpoint was due before the fault: the file is the one we started from
        assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_policy(policy, tmp_path, monkeypatch):
    """The loss of chosen training steps is made NaN (in process, GPT patched). "stop" (the default) ends the run
    at the next check and keeps the checkpoint before the fault; "skip" leaves those steps out (no update, no code
    counts), logs them and finishes."""
    bad = {5} if policy == "stop" else {2, 5}
    calls = []

    class Poisoned(train.GPT):
        def forward(self, idx, targets=None, cache=None, last_only=False):
            logits, loss, terms = super().forward(idx, targets, cache, last_only)
            if self.training and targets is not None:
                calls.append(1)
                if len(calls) in bad:
                    loss = loss * float("nan")
            return logits, loss, terms

    monkeypatch.setattr(train, "GPT", Poisoned)
    out = tmp_path / "run"
    args = [*TINY, "--codebook_start=0", "--kmeans_init=false", "--max_iters=6", "--log_interval=2",
            "--eval_interval=2", f"--nan_policy={policy}", f"--out_dir={out}"]
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"the loss became nan by iteration 6; the checkpoint of "
                                                     r"iteration 4 in .* is kept: .* or pass --nan_policy=skip"):
            train.main(args)
        assert load(out / "ckpt.pt")["iter_num"] == 4
        assert [r["iter"] for r in records(out) if "eval" in r] == [2, 4]
        return
    train.main(args)
    recs = records(out)
    assert [r["iter"] for r in recs if r.get("skipped")] == [2, 5]
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
    ckpt = load(out / "ckpt.pt")
    assert ckpt["iter_num"] == 6
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {4}  # AdamW stepped 4 times of 6
    for name in ("transformer.h.0.codebooks.attn_heads.counts", "transformer.h.0.codebooks.mlp.counts"):
        assert (ckpt["model"][name].sum(-1) == 4 * 8 * 16).all()  # 4 counted steps x 8 x 16 tokens, k=1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("layernorm", [True, False])
@pytest.mark.parametrize("k,groups", [(1, 1), (2, 4)])
def test_codebook_stays_finite_for_zero_activations_and_zero_codes(layernorm, k, groups):
    cb = CodebookLayer(16, num_codes=8, k=k, groups=groups, layernorm=layernorm)
    with torch.no_grad():
        cb.codes.zero_()
    x = torch.zeros(3, 5, 16, requires_grad=True)
    out = cb(x)
    (out.square().sum() + cb.recon_loss).backward()
    assert torch.isfinite(out).all() and torch.isfinite(cb.recon_loss) and cb.recon_loss == 0
    grads = [x.grad, cb.codes.grad] + ([cb.ln.weight.grad, cb.ln.bias.grad] if layernorm else [])
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert ((cb.last_indices >= 0) & (cb.last_indices < 8)).all()
    # k-means init and dead-code replacement from all-zero activations keep the codes finite
    cb.kmeans_init(torch.zeros(10, groups, 16 // groups))
    cb.replace_dead_codes()
    assert torch.isfinite(cb.codes).all()


def test_zero_codes_score_zero_not_nan():
    """cos(a, 0) must be 0: a NaN score would win the argmax over the one code that matches a."""
    cb = CodebookLayer(16, num_codes=8, k=1, layernorm=False)
    a = torch.randn(5, 16)
    with torch.no_grad():
        cb.codes.zero_()
        cb.codes[0, 3] = a[0]
    assert cb.topk_codes(a[:1].view(1, 1, 16)).item() == 3
    cb(torch.zeros(2, 16))  # zero activations against (mostly) zero codes: a valid index, a finite loss
    assert torch.isfinite(cb.recon_loss) and ((cb.last_indices >= 0) & (cb.last_indices < 8)).all()


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_ranks_agree_after_every_step(tmp_path):
    """2 gloo ranks, k-means at the switch (iteration 2) and dead-code replacement every 2 steps: after every
    optimizer step each rank's weights, codes, usage counts and AdamW state hash the same, and every logged loss
    (ce, recon) is the mean of the two ranks' own losses (tests/ddp_step_worker.py records both)."""
    out = tmp_path / "run"
    args = [*TINY, "--max_iters=6", "--codebook_start=2", "--kmeans_init=true", "--replace_after=2",
            "--log_interval=1", "--eval_interval=3", f"--out_dir={out}"]
    r = subprocess.run(torchrun_cmd("tests/ddp_step_worker.py", [tmp_path, *args]), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{i}.json")) for i in (0, 1)]
    h0, h1 = (rk["hashes"] for rk in ranks)
    assert [h["iter"] for h in h0] == list(range(7))  # before the first step, then after each of the 6
    for a, b in zip(h0, h1):
        assert a == b, f"ranks differ after {a['iter']} steps: " + ", ".join(k for k in a if a[k] != b[k])
    codes = [h["codes"] for h in h0]
    assert codes[2] != codes[3] and codes[4] != codes[5]  # the codebooks did train (k-means, replacement, steps)
    counts = [h["counts"] for h in h0]
    assert counts[2] != counts[3] != counts[4]
    logged = {r["iter"]: r for r in records(out) if "loss" in r}
    assert sorted(logged) == list(range(1, 7))
    l0, l1 = (torch.tensor(rk["losses"]) for rk in ranks)  # (6, 3) float32: loss, ce, recon per step
    assert not torch.equal(l0, l1)  # the ranks saw different data
    mean = ((l0 + l1) / 2).tolist()
    for it, rec in logged.items():
        assert [rec["loss"], rec["ce"], rec["recon"]] == mean[it - 1], it


# ---------------------------------------------------------------------------------------------- one owner, nothing lost
@pytest.mark.slow
def test_a_second_run_cannot_share_a_busy_out_dir(tmp_path):
    """While one train.py runs in out_dir, a second one (scratch or resume) stops at once with one line naming the
    owner's PID and writes nothing. Once the owner is killed, its lock is stale: the next run names it and takes
    the directory over."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *TINY, "--max_iters=100000", "--eval_interval=20",
                              f"--out_dir={out}"], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "ckpt.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (out / ".lock").read_text().strip() == str(first.pid)
        for args in ([*TINY, "--max_iters=2", "--overwrite=true"], ["--init_from=resume", "--max_iters=100"]):
            r = run("train.py", [*args, f"--out_dir={out}"])
            lines = r.stderr.strip().splitlines()
            assert r.returncode != 0 and len(lines) == 1, r.stderr
            assert lines[0].startswith("error:") and f"in use by process {first.pid}" in lines[0], lines[0]
        assert first.poll() is None  # the owner was running all along
    finally:
        first.kill()
        first.wait()
    assert (out / ".lock").read_text().strip() == str(first.pid)  # SIGKILL left it
    n = load(out / "ckpt.pt")["iter_num"]
    r = run("train.py", ["--init_from=resume", f"--max_iters={n + 2}", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    assert f"process {first.pid}, which no longer runs: taken over" in r.stderr
    assert not (out / ".lock").exists() and load(out / "ckpt.pt")["iter_num"] == n + 2


@pytest.mark.slow
def test_a_stale_lock_is_named_and_taken_over(tmp_path, fx):
    """A lock file left by a killed run (no process holds it) does not block the next run; the note names it."""
    out = tmp_path / "run"
    shutil.copytree(fx["run"], out)
    (out / ".lock").write_text("999999\n")
    r = run("train.py", ["--init_from=resume", "--max_iters=3", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    assert "process 999999, which no longer runs: taken over" in r.stderr
    assert not (out / ".lock").exists() and load(out / "ckpt.pt")["iter_num"] == 3


@pytest.mark.slow
def test_resume_writes_where_it_reads(tmp_path, fx):
    """A copy of a run resumed in its new place trains there: the original stays byte-identical (the checkpoint
    still names the original out_dir), and the copy's checkpoint names the copy."""
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    shutil.copytree(fx["run"], orig)
    ckpt = load(orig / "ckpt.pt")
    ckpt["train_config"]["out_dir"] = str(orig)
    torch.save(ckpt, orig / "ckpt.pt")
    shutil.copytree(orig, copy)
    before = {p.name: p.read_bytes() for p in orig.iterdir()}
    r = run("train.py", ["--init_from=resume", "--max_iters=4", f"--out_dir={copy}"])
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in orig.iterdir()} == before
    resumed = load(copy / "ckpt.pt")
    assert resumed["iter_num"] == 4 and resumed["train_config"]["out_dir"] == str(copy)


def test_overwrite_replaces_the_run_at_its_first_checkpoint(tmp_path, fx, monkeypatch):
    """--overwrite=true: until the new run's first checkpoint, ckpt.pt and log.jsonl are the old run's; after it,
    both are the new run's (the log holds no record of the old run)."""
    out = tmp_path / "run"
    shutil.copytree(fx["run"], out)
    old = {n: (out / n).read_bytes() for n in ("ckpt.pt", "log.jsonl")}
    seen = []

    def spy(it, cfg, _get_lr=train.get_lr):  # called at the top of every iteration of the new run
        seen.append({n: (out / n).read_bytes() == old[n] for n in old})
        return _get_lr(it, cfg)

    monkeypatch.setattr(train, "get_lr", spy)
    train.main([*TINY, "--max_iters=4", "--eval_interval=3", "--log_interval=1", "--seed=7", "--overwrite=true",
                f"--out_dir={out}"])
    assert seen[:3] == [{"ckpt.pt": True, "log.jsonl": True}] * 3  # iterations 0-2: the old run is whole
    assert seen[3] == {"ckpt.pt": False, "log.jsonl": False}  # after the checkpoint of iteration 3
    recs = records(out)
    assert [r["iter"] for r in recs if "eval" in r] == [3, 4] and len({r["run"] for r in recs if "run" in r}) == 1
    assert recs[0]["run"] == load(out / "ckpt.pt")["run"]


def test_analysis_is_written_whole_or_not_at_all(tmp_path, fx, monkeypatch):
    """analyze.py writes into a staged directory: a failure after some outputs are written leaves the earlier
    analysis byte-identical and no temporary directory behind; by default the analysis goes into <out_dir>/analysis."""
    import analyze
    import report

    out = tmp_path / "run"
    shutil.copytree(fx["run"], out)
    analyze.main([f"--out_dir={out}", "--num_seqs=16", "--device=cpu", "--html_codes=2"])
    assert sorted(p.name for p in (out / "analysis").iterdir())[:4] == [".codebook-kind.json", "browser.html",
                                                                        "codes.pt", "freq.png"]  # with its kind
    before = {p.name: p.read_bytes() for p in (out / "analysis").iterdir()}

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_browser", fail)  # the last output: codes.pt, stats.json, ... are written
    with pytest.raises(OSError):
        analyze.main([f"--out_dir={out}", "--num_seqs=32", "--device=cpu"])
    assert {p.name: p.read_bytes() for p in (out / "analysis").iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == [".codebook-kind.json", "analysis", "ckpt.pt", "log.jsonl"]


HANGING_SHUTDOWN = """
import sys, time
import torch.distributed as dist
sys.path.insert(0, {root!r})
from plumbing.ddp import end_process_group
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=0, world_size=1)
dist.destroy_process_group = lambda: time.sleep(120)  # the rare hang of a real shutdown
print("work done", flush=True)
end_process_group(timeout_s=1, failed={failed})
print("not reached")
"""


@pytest.mark.parametrize("failed", [False, True])
def test_a_hanging_process_group_shutdown_ends_the_process(tmp_path, failed):
    """destroy_process_group can hang after the work is done: the watchdog ends the process after timeout_s, with
    the run's own status and a warning, instead of leaving it (and torchrun) waiting forever."""
    script = HANGING_SHUTDOWN.format(root=ROOT, store=str(tmp_path / "store"), failed=failed)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == (1 if failed else 0) and time.time() - t0 < 30, r.stderr[-2000:]
    assert r.stdout == "work done\n" and "did not shut down within 1 s" in r.stderr
