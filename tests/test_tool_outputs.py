"""The scripts' output directories follow the rules of every other tool: scripts/gpu_check.py refuses, before any
run and in one line, an --out that is empty, a file, a user's folder or a training run (it used to train into
<out>/eager with --overwrite=true over whatever run was there), and marks the directory it writes; the results
table (scripts/fsm_table.py) reads a row back only from a run of the row's whole configuration, iterations
included. CPU."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

import train
from plumbing.configuration import ConfigError
from plumbing.rundir import kind_of

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import fsm_table  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--codebook_sites=mlp", "--num_codes=32", "--device=cpu"]


def snapshot(d):
    return {os.path.relpath(os.path.join(p, n), d): open(os.path.join(p, n), "rb").read()
            for p, _, names in os.walk(d) for n in names}


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    w = tmp_path_factory.mktemp("outs")
    train.main([*TINY, "--max_iters=1", f"--out_dir={w / 'run'}"])
    (w / "afile").write_text("a file\n")
    (w / "user").mkdir()
    (w / "user" / "notes.txt").write_text("mine\n")
    (w / "user_eager" / "eager").mkdir(parents=True)
    (w / "user_eager" / "eager" / "notes.txt").write_text("mine\n")
    return w


@pytest.mark.slow
@pytest.mark.parametrize("out,needle", [("", "is empty"), ("{w}/afile", "is a file"),
                                        ("{w}/user", "files this project did not write (notes.txt)"),
                                        ("{w}/run", "holds a training run"),
                                        ("{w}/user_eager", "files this project did not write (eager)")])
def test_gpu_check_refuses_an_out_it_may_not_write(places, out, needle):
    before = snapshot(places)
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device=cpu", "--tiny=true",
                        f"--out={out.format(w=places)}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: --out"), r.stderr
    assert needle in lines[0], lines[0]
    assert snapshot(places) == before and r.stdout == ""


def test_gpu_check_marks_its_directory(tmp_path):
    """claim_out makes --out a marked directory of runs, which a second check may write again."""
    spec = __import__("importlib.util").util.spec_from_file_location("gpu_check", f"{ROOT}/scripts/gpu_check.py")
    gc = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    gc.claim_out(str(tmp_path / "check"))
    assert kind_of(str(tmp_path / "check"))[0] == "gpu-check"
    gc.claim_out(str(tmp_path / "check"))


def test_a_short_run_of_a_rows_model_is_not_the_finished_row(tmp_path, monkeypatch):
    """A row directory holding a run of the row's model and data that ran fewer iterations than the row's default
    max_iters (it finished its own) is refused, naming max_iters, instead of being read back as the row's result."""
    monkeypatch.setitem(fsm_table.ROWS, "quick", ("tiny", TINY))  # the row leaves max_iters at train.py's default
    train.main([*TINY, "--max_iters=1", f"--out_dir={tmp_path / 'table' / 'quick'}"])
    with pytest.raises(ConfigError, match=r"the row quick .* another configuration \(max_iters=1, not 1700\)"):
        fsm_table.main(["--rows=quick", f"--out={tmp_path / 'table'}"])
    assert fsm_table.row_problem([*TINY, "--max_iters=1"], str(tmp_path / "table" / "quick")) is None
