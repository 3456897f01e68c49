"""What a user reads while training: an evaluation before the codebook switch says the codebooks are not on yet
(not "FVU nan, loss recovered nan"), one after it gives their dead codes, FVU and loss recovered; and a torchrun run
whose codebooks switch on midway prints no warning of torch's about unused parameters on any rank (DDP is wrapped
again at the switch, without find_unused_parameters). gloo, 2 ranks, CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--codebook_sites=mlp", "--num_codes=32", "--device=cpu", "--max_iters=4",
        "--codebook_start=2", "--eval_interval=2", "--log_interval=1"]


@pytest.mark.slow
def test_ddp_run_switching_codebooks_on_reads_cleanly(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *TINY, f"--out_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "find_unused_parameters" not in r.stderr and "Warning" not in r.stderr, r.stderr[-3000:]
    evals = [line for line in r.stdout.splitlines() if line.startswith("eval ")]
    assert len(evals) == 2 and "nan" not in r.stdout, r.stdout
    assert evals[0].endswith("codebooks not on yet (they switch on at iteration 2)"), evals[0]
    assert "dead codes" in evals[1] and "FVU" in evals[1] and "loss recovered" in evals[1], evals[1]
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 4
    logged = [r["eval"] for r in map(json.loads, open(out / "log.jsonl")) if "eval" in r]
    assert [set(m) for m in logged] == [set(logged[1])] * 2  # log.jsonl keeps every key, before the switch too
