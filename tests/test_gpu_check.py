"""scripts/gpu_check.py on its CPU path (gloo, a tiny model), so that the GPU check does not rot where no GPU is:
every step runs as a subprocess, the table reports each run, and the resume check says "exact" only when the
checkpoints are bitwise equal. torch.compile is disabled in the subprocesses (TORCH_COMPILE_DISABLE=1) to keep the
test short: the compiled row then runs train.py's --compile=true path without compiling."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TORCH_COMPILE_DISABLE": "1"}


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device=cpu", "--tiny=true", "--steps=6",
                        "--bench=generate", f"--out={out}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


@pytest.mark.slow
def test_cpu_path_reports_every_run(checked):
    out, stdout = checked
    table = open(out / "table.md", encoding="utf-8").read()
    assert table in stdout
    rows = {m[0]: m for m in re.findall(r"^\| (\w+) \| ([^|]+) \| (\d+) \| ([\d.]+) ms \| ([\d,]+) \| ([\d.]+) % \| "
                                        r"([\d.]+) \| (\d+) s \|$", table, re.M)}
    assert list(rows) == ["eager", "compiled", "ddp", "resumed"], table
    assert all(r[2] == "6" and 0 <= float(r[5]) <= 100 and float(r[3]) > 0 for r in rows.values())
    assert "gloo" in rows["ddp"][1] and "3 steps + resume to 6" in rows["resumed"][1]
    assert "Resume exact (ddp against resumed): exact (" in table
    assert "generation with codebooks" in table and "tokens/s" in table  # bench.py's output
    for name in rows:  # every run finished its 6 steps and kept its checkpoint
        assert torch.load(out / name / "ckpt.pt", map_location="cpu", weights_only=False)["iter_num"] == 6


@pytest.mark.slow
def test_resume_check_names_a_difference(checked, tmp_path):
    out, _ = checked
    gc = gpu_check_module()
    a, b = out / "ddp" / "ckpt.pt", tmp_path / "ckpt.pt"
    shutil.copy(out / "resumed" / "ckpt.pt", b)
    assert gc.compare(a, b).startswith("exact")
    ckpt = torch.load(b, map_location="cpu", weights_only=False)
    ckpt["model"]["lm_head.weight"] = ckpt["model"]["lm_head.weight"] + 0.5  # this entry only
    torch.save(ckpt, b)
    msg = gc.compare(a, b)
    assert msg.startswith("no: 1 of ") and "model.lm_head.weight by 0.5" in msg, msg


@pytest.mark.parametrize("args,needle", [(["--steps=2"], "--steps=2"), (["--device=tpu"], "'tpu'"),
                                         (["--stepz=5"], "--stepz=5")])
def test_bad_input_is_one_line(args, needle, tmp_path):
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", *args, f"--out={tmp_path / 'o'}"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert not os.path.exists(tmp_path / "o")
