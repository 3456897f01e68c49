"""Every way a process can end, in one line or none: output piped into a reader that has gone (`| head`) ends
quietly with every output written; Ctrl-C while torch is still loading ends in one line; every environment
variable the project reads is checked like a flag (configuration.ENVIRONMENT), torchrun's as a whole. CPU."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

import analyze
import train
from plumbing.entry import cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--codebook_sites=mlp", "--num_codes=32", "--device=cpu"]


def closed_stdout(args):
    """Run `python *args` with its stdout a pipe whose reader has gone before the first byte. Returns the
    process's stderr after asserting it exited with status 0."""
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    p.stdout.close()  # as `| head -0`: every write to stdout now fails with EPIPE
    err = p.stderr.read()
    assert p.wait(timeout=600) == 0, err[-3000:]
    return err


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly_with_every_output_written(tmp_path):
    """train.py and analyze.py with stdout closed: status 0, nothing on stderr (no traceback, no `error: ... Broken
    pipe`), and their outputs complete: the checkpoint of the last iteration, the analysis."""
    out = tmp_path / "run"
    assert closed_stdout(["train.py", *TINY, "--max_iters=2", f"--out_dir={out}"]) == ""
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2
    assert closed_stdout(["analyze.py", f"--out_dir={out}", "--device=cpu", "--num_seqs=64"]) == ""
    assert (out / "analysis" / "codes.pt").is_file() and (out / "analysis" / "browser.html").is_file()


def loading_torch(pid):
    """Whether process `pid` has begun to map libtorch (Linux /proc): `import torch` is under way."""
    try:
        return "libtorch" in open(f"/proc/{pid}/maps").read()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="watches the import through /proc")
@pytest.mark.parametrize("script", ["train.py", "analyze.py", "scripts/fsm_table.py", "data/prepare.py"])
def test_ctrl_c_while_torch_loads_is_one_line(script, tmp_path):
    """SIGINT as soon as the process maps libtorch (its imports still running): one line, no traceback, ended by
    SIGINT, nothing written."""
    p = subprocess.Popen([sys.executable, script, f"--out_dir={tmp_path / 'run'}"], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not loading_torch(p.pid) and p.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode in (-signal.SIGINT, 130), (p.returncode, err[-3000:])
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("interrupted by SIGINT"), err[-3000:]
    assert not (tmp_path / "run").exists()


TORCHRUN = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "localhost",
            "MASTER_PORT": "29500"}
BAD_ENV = [  # (what, variables, what the line names)
    ("RANK not an integer", {**TORCHRUN, "RANK": "zero"}, ["RANK='zero'", "integer"]),
    ("RANK negative", {**TORCHRUN, "RANK": "-1"}, ["RANK='-1'", "integer >= 0"]),
    ("RANK >= WORLD_SIZE", {**TORCHRUN, "RANK": "2", "WORLD_SIZE": "2"}, ["RANK=2", "below WORLD_SIZE=2"]),
    ("LOCAL_RANK >= LOCAL_WORLD_SIZE", {**TORCHRUN, "LOCAL_RANK": "1"}, ["LOCAL_RANK=1", "LOCAL_WORLD_SIZE=1"]),
    ("LOCAL_WORLD_SIZE > WORLD_SIZE", {**TORCHRUN, "LOCAL_WORLD_SIZE": "4"}, ["LOCAL_WORLD_SIZE=4", "WORLD_SIZE=1"]),
    ("WORLD_SIZE zero", {**TORCHRUN, "WORLD_SIZE": "0"}, ["WORLD_SIZE='0'", ">= 1"]),
    ("LOCAL_WORLD_SIZE a float", {**TORCHRUN, "LOCAL_WORLD_SIZE": "1.5"}, ["LOCAL_WORLD_SIZE='1.5'"]),
    ("RANK alone", {"RANK": "0"}, ["sets RANK but not WORLD_SIZE", "torchrun"]),
    ("MASTER_PORT out of range", {**TORCHRUN, "MASTER_PORT": "70000"}, ["MASTER_PORT='70000'", "65535"]),
    ("MASTER_ADDR blank inside", {**TORCHRUN, "MASTER_ADDR": "my host"}, ["MASTER_ADDR='my host'"]),
    ("memory limit nan", {"CODEBOOK_MEMORY_LIMIT": "nan"}, ["CODEBOOK_MEMORY_LIMIT='nan'", "finite"]),
    ("memory limit negative", {"CODEBOOK_MEMORY_LIMIT": "-5e9"}, ["CODEBOOK_MEMORY_LIMIT='-5e9'", "> 0"]),
    ("memory limit infinite", {"CODEBOOK_MEMORY_LIMIT": "inf"}, ["CODEBOOK_MEMORY_LIMIT='inf'", "finite"]),
    ("memory limit garbage", {"CODEBOOK_MEMORY_LIMIT": "8GB"}, ["CODEBOOK_MEMORY_LIMIT='8GB'", "e.g. 8e9"]),
    ("progress yes", {"CODEBOOK_PROGRESS": "yes"}, ["CODEBOOK_PROGRESS='yes'", "0 or 1"]),
    ("progress 2", {"CODEBOOK_PROGRESS": "2"}, ["CODEBOOK_PROGRESS='2'", "0 or 1"]),
]


@pytest.mark.parametrize("env,needles", [c[1:] for c in BAD_ENV], ids=[c[0] for c in BAD_ENV])
@pytest.mark.parametrize("entry", [train.main, analyze.main], ids=["train", "analyze"])
def test_a_bad_environment_variable_is_one_line(entry, env, needles, tmp_path, monkeypatch, capsys):
    """Each entry point refuses it before any work, in one `error:` line naming the variable and the fix."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as e:
        cli(entry, [*TINY, f"--out_dir={tmp_path / 'run'}"] if entry is train.main else
            [f"--out_dir={tmp_path / 'run'}", "--device=cpu"])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    assert all(n in msg for n in needles) and ("unset" in msg or "torchrun" in msg), msg
    assert capsys.readouterr().err == "" and not (tmp_path / "run").exists()
