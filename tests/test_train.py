"""train.py end to end in subprocesses: a tiny run, exact resume, one-line config errors, DDP on CPU (gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_interval=3",
        "--log_interval=3", "--eval_seqs=16", "--eval_samples=8", "--codebook_sites=attn_heads,mlp",
        "--num_codes=32", "--device=cpu", "--codebook_start=0", "--kmeans_init=false", "--replace_after=0"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run(args, timeout=120):
    return subprocess.run([sys.executable, "train.py", *once(args)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def torchrun(script, args, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *once(args)]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_tiny_run_writes_checkpoint_and_log(tmp_path):
    out = tmp_path / "run"
    r = run([*TINY, "--max_iters=6", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    ckpt = load(out / "ckpt.pt")
    assert ckpt["iter_num"] == 6
    assert ckpt["model_config"]["codebook_sites"] == "attn_heads,mlp" and ckpt["model_config"]["n_embd"] == 32
    assert ckpt["train_config"]["max_iters"] == 6
    assert {"model", "optimizer"} <= set(ckpt)
    assert any(k.endswith("counts") for k in ckpt["model"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["iter"] for r in evals] == [3, 6]
    for r in evals:
        m = r["eval"]
        assert {"loss", "acc", "valid_mass", "valid", "first", "dead_pct"} <= set(m)
        assert all(0 <= m[k] <= 1 for k in ("acc", "valid_mass", "valid", "first"))
        assert 0 <= m["dead_pct"] <= 100
    logs = [r for r in records if "loss" in r]
    assert [r["iter"] for r in logs] == [3, 6]
    assert all(abs(r["loss"] - r["ce"] - r["recon"]) < 1e-4 for r in logs)  # recon_coef = 1
    assert not list(out.glob(".*.codebook-*"))  # the atomic writes left no temporary and no record behind


@pytest.mark.slow
def test_codebook_start_bypasses_then_switches_codebooks_on(tmp_path):
    out = tmp_path / "run"
    r = run([*TINY, "--max_iters=6", "--codebook_start=4", "--kmeans_init=true", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    sd = load(out / "ckpt.pt")["model"]
    tokens = 8 * 16  # batch_size x block_size per step
    for name in ("h.0.attn_heads", "h.0.mlp"):
        layer, site = name.split(".")[1:]
        counts = sd[f"transformer.h.{layer}.codebooks.{site}.counts"]
        # only the 2 steps after the switch are counted: each token picks k=1 code per group
        assert counts.sum(dim=1).tolist() == [2 * tokens] * counts.shape[0]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    recon = {r["iter"]: r["recon"] for r in records if "recon" in r}
    assert recon[3] == 0.0 and recon[6] > 0  # no reconstruction loss while bypassed


@pytest.mark.slow
def test_resume_equals_straight_run(tmp_path):
    extra = ["--kmeans_init=true", "--replace_after=2"]  # RNG use on both sides of the resume point
    straight, split = tmp_path / "straight", tmp_path / "split"
    r = run([*TINY, *extra, "--max_iters=6", f"--out_dir={straight}"])
    assert r.returncode == 0, r.stderr
    r = run([*TINY, *extra, "--max_iters=3", f"--out_dir={split}"])
    assert r.returncode == 0, r.stderr
    assert load(split / "ckpt.pt")["iter_num"] == 3
    r = run(["--init_from=resume", "--max_iters=6", f"--out_dir={split}"])
    assert r.returncode == 0, r.stderr
    a, b = load(straight / "ckpt.pt"), load(split / "ckpt.pt")
    assert b["iter_num"] == 6
    assert_state_equal(a["model"], b["model"])
    evals = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in evals if "eval" in r] == [3, 6]  # the log was appended, not replaced


@pytest.mark.slow
def test_resume_rejects_model_change(tmp_path):
    out = tmp_path / "run"
    assert run([*TINY, "--max_iters=3", f"--out_dir={out}"]).returncode == 0
    r = run(["--init_from=resume", "--max_iters=6", "--n_embd=64", f"--out_dir={out}"])
    assert r.returncode != 0
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


def assert_one_line_error(r):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]


@pytest.mark.parametrize("bad", [
    ["--no_such_key=1"],
    ["--max_iters=abc"],
    ["--kmeans_init=maybe"],
    ["--max_iters"],
    ["--k=64", "--num_codes=32"],  # k > num_codes
    ["--batch_size=7", "--gradient_accumulation_steps=2"],
    ["config/does_not_exist.py"],
])
def test_config_errors_are_one_line(tmp_path, bad):
    r = run([*TINY, "--max_iters=1", f"--out_dir={tmp_path / 'run'}", *bad])
    assert_one_line_error(r)
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.slow
def test_refuses_to_overwrite_existing_run(tmp_path):
    out = tmp_path / "run"
    assert run([*TINY, "--max_iters=3", f"--out_dir={out}"]).returncode == 0
    before = (out / "ckpt.pt").read_bytes()
    log_before = (out / "log.jsonl").read_bytes()
    r = run([*TINY, "--max_iters=3", f"--out_dir={out}"])
    assert_one_line_error(r)
    assert (out / "ckpt.pt").read_bytes() == before
    assert (out / "log.jsonl").read_bytes() == log_before
    r = run([*TINY, "--max_iters=3", "--overwrite=true", "--seed=7", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    assert (out / "ckpt.pt").read_bytes() != before


@pytest.mark.slow
def test_ddp_ranks_keep_identical_codebooks(tmp_path):
    args = [*TINY, "--max_iters=4", "--kmeans_init=true", "--replace_after=2", f"--out_dir={tmp_path / 'run'}"]
    r = torchrun("tests/ddp_worker.py", [str(tmp_path), *args])
    assert r.returncode == 0, r.stderr[-3000:]
    s0, s1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    assert_state_equal(s0, s1)  # every parameter and buffer, bitwise
    counts = [k for k in s0 if k.endswith(".counts")]
    assert len(counts) == 2
    for key in counts:  # counts are all-reduced: each group counted every token of the global batch, k=1
        assert (s0[key].sum(-1) == 8 * 16 * 4).all(), key
    ckpt = load(tmp_path / "run" / "ckpt.pt")
    assert_state_equal(ckpt["model"], s0)


@pytest.mark.slow
def test_torchrun_train_py(tmp_path):
    out = tmp_path / "run"
    r = torchrun("train.py", [*TINY, "--max_iters=4", "--kmeans_init=true", "--replace_after=2", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load(out / "ckpt.pt")
    assert ckpt["iter_num"] == 4
    assert "1 rank" not in r.stdout and "2 rank(s) x 4 sequences" in r.stdout
