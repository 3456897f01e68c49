"""Directories that know their kind (rundir.KINDS, the marker .codebook-kind.json): every command that writes a
directory refuses, before any work and in one line, a training run, a prepared dataset, another tool's output and a
user's folder, and leaves them byte-identical; a file where a directory belongs, or the reverse, is named as that;
the results table refuses a row directory that holds another configuration's run; the leftovers of a killed tool go
with its next run. Directories written before markers existed are known by their files. Runs in process, CPU."""

import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
from conftest import ROOT, write_tokens

import analyze
import sae
import steer
import topics
import train
from plumbing.entry import cli
from data import prepare
from plumbing.files import atomic_write, remove_leftovers
from plumbing.rundir import MARKER, claim, kind_of, mark, staged_dir

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import fsm_table  # noqa: E402

with mock.patch.dict(os.environ):  # random_pythia sets HF_HUB_OFFLINE for its process: not for the other tests
    import random_pythia  # noqa: E402

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--codebook_sites=mlp", "--num_codes=32", "--device=cpu", "--max_iters=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A marked training run, the same run as written before markers, a dataset, a user's folder, an analysis, a
    file, runs whose ckpt.pt or log.jsonl is a directory, a run whose analysis directory holds a training run
    (train.py --out_dir=RUN/analysis, as it was accepted before), and a results table whose quick row holds the
    tiny run. Returns its path."""
    w = tmp_path_factory.mktemp("kinds")
    train.main([*TINY, f"--out_dir={w / 'run'}"])
    shutil.copytree(w / "run", w / "old_run")
    os.remove(w / "old_run" / MARKER)
    write_tokens(w / "dataset", range(100))
    os.makedirs(w / "user")
    (w / "user" / "notes.txt").write_text("my notes\n")
    os.makedirs(w / "analysis")
    for name in ("stats.json", "browser.html"):
        (w / "analysis" / name).write_text("{}")
    torch.save({"codes": torch.zeros(2, dtype=torch.int16)}, w / "analysis" / "codes.pt")  # analyze.py's format
    (w / "afile").write_text("a file where a directory belongs\n")
    for name in ("ckpt.pt", "log.jsonl"):
        shutil.copytree(w / "run", w / f"{name}_dir")
        os.remove(w / f"{name}_dir" / name)
        os.makedirs(w / f"{name}_dir" / name)
    shutil.copytree(w / "run", w / "nested")
    shutil.copytree(w / "old_run", w / "nested" / "analysis")
    shutil.copytree(w / "run", w / "table" / "quick")
    os.makedirs(w / "table_file")
    (w / "table_file" / "k1").write_text("a file where a row's directory belongs\n")
    mark(str(w / "table_file"), "fsm-table")
    return w


def snapshot(d):
    out = {}
    for dirpath, dirs, names in os.walk(d):
        out[os.path.relpath(dirpath, d)] = sorted(dirs)
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, n), d)] = f.read()
    return out


def refused(entry, args, needles, world, capsys):
    """Run one command; assert one `error:` line holding every needle, nothing else on stderr, an untouched world."""
    before = snapshot(world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(entry, [a.format(w=world) for a in args])
    msg, err = e.value.code, capsys.readouterr().err
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    assert err == "", err
    for needle in needles:
        assert needle.format(w=world) in msg, f"{needle!r} not in {msg!r}"
    assert snapshot(world) == before, "a directory changed"


# each tool with the option naming the directory it writes; {} is the target
TOOLS = {
    "train": (train.main, [*TINY, "--out_dir={}"]),
    "analyze": (analyze.main, ["--out_dir={w}/run", "--device=cpu", "--save_dir={}"]),
    "topics": (topics.main, ["--out_dir={w}/run", "--device=cpu", "--save_dir={}"]),
    "sae": (sae.main, ["--out_dir={w}/run", "--device=cpu", "--save_dir={}"]),
    "prepare": (prepare.main, ["tinystories", "--out={}"]),
    "prepare pythia": (prepare.main, ["pythia", "--model=EleutherAI/pythia-70m", "--out={}"]),
    "random_pythia": (random_pythia.main, ["--size=tiny", "--out={}"]),
    "fsm_table": (fsm_table.main, ["--rows=quick", "--out={}"]),
}
TARGETS = {  # the target: what the message names
    "run": "holds a training run (ckpt.pt, log.jsonl)",
    "old_run": "holds a training run (ckpt.pt, log.jsonl)",
    "dataset": "holds data/prepare.py's dataset (meta.json, train.bin, val.bin)",
    "user": "holds files this project did not write (notes.txt)",
    "analysis": "holds analyze.py's analysis",
}
OWN = {("analyze", "analysis"), ("prepare", "dataset")}  # a tool may replace its own kind: tested with each tool
CASES = [(tool, target) for tool in TOOLS for target in TARGETS if (tool, target) not in OWN]


@pytest.mark.parametrize("tool,target", CASES, ids=[f"{t} at {g}" for t, g in CASES])
def test_a_tool_refuses_a_directory_of_another_kind(tool, target, world, capsys):
    entry, args = TOOLS[tool]
    needles = ["{w}/" + target, TARGETS[target]]
    if tool == "train" and "run" in target:  # its own kind: a new run inside it is refused
        target, needles = f"{target}/sub", ["{w}/" + target, "lies inside", "which holds a training run"]
    refused(entry, [a.replace("{}", "{w}/" + target) for a in args], needles, world, capsys)


FILES_AND_DIRS = [  # a file where a directory belongs, or the reverse
    ("out_dir under a file", train.main, [*TINY, "--out_dir={w}/afile/run"], ["lies under {w}/afile", "is a file"]),
    ("save_dir under a file", analyze.main, ["--out_dir={w}/run", "--save_dir={w}/afile/an"], ["{w}/afile", "a file"]),
    ("ckpt.pt a directory (scratch)", train.main, [*TINY, "--out_dir={w}/ckpt.pt_dir", "--overwrite=true"],
     ["holds ckpt.pt as a directory", "keeps a file"]),
    ("ckpt.pt a directory (resume)", train.main, ["--init_from=resume", "--out_dir={w}/ckpt.pt_dir"],
     ["ckpt.pt is a directory, not a checkpoint file"]),
    ("ckpt.pt a directory (analyze)", analyze.main, ["--out_dir={w}/ckpt.pt_dir", "--device=cpu"],
     ["ckpt.pt is a directory, not a checkpoint file"]),
    ("log.jsonl a directory", train.main, [*TINY, "--out_dir={w}/log.jsonl_dir", "--overwrite=true"],
     ["holds log.jsonl as a directory"]),
    ("--save under a file", steer.main, ["--out_dir={w}/run", "--save={w}/afile/s.json"],
     ["lies under {w}/afile, which is a file"]),
    ("--save a directory", steer.main, ["--out_dir={w}/run", "--save={w}/user"], ["is a directory, not a file"]),
    ("--save over a run's checkpoint", steer.main, ["--out_dir={w}/run", "--save={w}/run/ckpt.pt"],
     ["is a file of a training run"]),
    ("--save inside an analysis", steer.main, ["--out_dir={w}/run", "--save={w}/analysis/s.json"],
     ["lies inside {w}/analysis"]),
    ("a table of no rows", fsm_table.main, ["--rows=", "--out={w}/table"], ["rows=''", "names nothing"]),
    ("a table's row a file", fsm_table.main, ["--rows=k1", "--out={w}/table_file"], ["holds k1 as a file"]),
    # the case: the default analysis of a run whose analysis directory holds a training run
    ("RUN/analysis holds a run", analyze.main, ["--out_dir={w}/nested", "--device=cpu"],
     ["{w}/nested/analysis", "holds a training run"]),
    ("a row of another configuration", fsm_table.main, ["--rows=quick", "--out={w}/table"],
     ["the row quick", "another configuration", "block_size=16, not 32", "delete it"]),
]


@pytest.mark.parametrize("entry,args,needles", [c[1:] for c in FILES_AND_DIRS], ids=[c[0] for c in FILES_AND_DIRS])
def test_files_and_directories_are_named_as_they_are(entry, args, needles, world, capsys):
    refused(entry, args, needles, world, capsys)


def test_kinds_are_known_with_and_without_a_marker(world):
    """Marked directories by their marker; those written before markers by their files. Each tool may write its
    own kind; a new output may lie inside a training run, a new training run only inside a results table (one
    that lies inside a run already, written before the check, can still be resumed)."""
    marker = json.loads((world / "run" / MARKER).read_text())
    assert marker["kind"] == "train" and {"argv", "cwd", "time"} <= marker.keys()
    kinds = {name: kind_of(str(world / name))[0] for name in ("run", "old_run", "dataset", "user", "analysis")}
    assert kinds == {"run": "train", "old_run": "train", "dataset": "dataset", "user": "", "analysis": "analysis"}
    assert kind_of(str(world / "nowhere")) == (None, []) and kind_of(str(world / "afile")) == (None, [])
    for path, kind in (("old_run", "train"), ("dataset", "dataset"), ("analysis", "analysis"),
                       ("run/analysis", "analysis"), ("table/k1", "train"), ("old_run/topics", "topics"),
                       ("nested/analysis", "train")):
        claim(str(world / path), kind, "dir")  # no error


def dead_pid():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def leave(folder, output, what, pid, tag="0123abcd", record=True):
    """What a writer of `output` (process `pid`) leaves in `folder` when it is killed: a temporary (`what`: tmp or
    old, an analysis directory) and, unless record=False, its record. Returns the temporary's name."""
    name = f".{output}.codebook-{what}-{pid}-{tag}"
    os.makedirs(folder / name)
    (folder / name / "codes.pt").write_text(what)
    mark(str(folder / name), "analysis")
    if record:
        start = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19] if pid == os.getpid() else None
        (folder / f".{output}.codebook-record-{pid}-{tag}").write_text(json.dumps(
            {"output": output, "pid": pid, "start": start}))
    return name


def test_leftovers_of_a_killed_tool_are_removed_by_its_next_run(tmp_path):
    """staged_dir and atomic_write first remove the temporaries that a killed run recorded beside their output,
    when that process no longer runs; a live process's are kept. An old copy left between staged_dir's two renames
    (the output itself gone) is put back. Nothing is left beside the output once it is written."""
    dead, alive = dead_pid(), os.getpid()
    leave(tmp_path, "out", "tmp", dead)
    leave(tmp_path, "out", "old", dead, "0123abce")
    kept = leave(tmp_path, "out", "tmp", alive, "0123abcf")
    (tmp_path / f".s.json.codebook-tmp-{dead}-0123abcd").write_text("{")  # another output's: its own writer's
    (tmp_path / f".s.json.codebook-record-{dead}-0123abcd").write_text(json.dumps({"output": "s.json", "pid": dead}))
    with staged_dir(str(tmp_path / "out"), "analysis") as d:
        (tmp_path / d / "codes.pt").write_text("new")
    ours = sorted(n for n in os.listdir(tmp_path) if n.startswith(".out"))
    assert ours == [f".out.codebook-record-{alive}-0123abcf", kept], ours
    assert kind_of(str(tmp_path / "out"))[0] == "analysis"
    assert len(os.listdir(tmp_path)) == 5
    with atomic_write(str(tmp_path / "s.json")) as f:
        f.write("{}")
    assert sorted(n for n in os.listdir(tmp_path) if "s.json" in n) == ["s.json"]
    tag = "0123abd0"
    os.rename(tmp_path / "out", tmp_path / f".out.codebook-old-{dead}-{tag}")
    (tmp_path / f".out.codebook-record-{dead}-{tag}").write_text(json.dumps({"output": "out", "pid": dead}))
    remove_leftovers(str(tmp_path / "out"))
    assert (tmp_path / "out" / "codes.pt").read_text() == "new"
    assert not (tmp_path / f".out.codebook-record-{dead}-{tag}").exists()
