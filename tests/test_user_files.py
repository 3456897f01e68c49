"""Nothing of a user's near or inside an output is removed or renamed: files whose names look like this project's
temporaries (`ckpt.pt.old.1500`, `log.jsonl.tmp.3000`, `analysis.old.2`, a dead PID's number, a date), this
project's temporary names without the record that only their writer makes, folders of a user's inside an output
the project replaces, and markers that contradict what their directory holds. Each case runs the real command (or
the staged write every tool uses) and checks the user's files byte for byte. CPU, in process."""

import json
import os
import subprocess
import sys

import pytest
import torch

import analyze
import steer
import train
from plumbing.entry import cli
from plumbing.files import atomic_write, remove_leftovers
from plumbing.rundir import MARKER, claim, kind_of, staged_dir

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--codebook_sites=mlp", "--num_codes=32", "--device=cpu", "--eval_interval=1"]


def dead_pid():
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def near_misses(output, dead):
    """{name: bytes} of a user's files beside `output` whose names a name-based cleanup would take for its own."""
    names = [f"{output}.old.1500", f"{output}.tmp.3000", f"{output}.old.999999", f"{output}.old.20240101",
             f"{output}.old.2", f"{output}.tmp.{dead}", f"{output}.old.{dead}", f"{output}.tmp.x",
             f".{output}.codebook-tmp-{dead}-0123abcd",  # our temporary's name, but no record of it
             f".{output}.codebook-old-{dead}-0123abce", f".{output}.codebook-record-{dead}-0123abce",  # a torn record
             f".{output}.codebook-tmp-{dead}-0123abcf"]
    files = {n: f"a user's {n}\n".encode() for n in names}
    files[f".{output}.codebook-record-{dead}-0123abce"] = b"{not json"
    return files


def put(folder, files):
    for name, data in files.items():
        (folder / name).write_bytes(data)


def survived(folder, files):
    for name, data in files.items():
        assert (folder / name).read_bytes() == data, f"{name} changed or went"


def snapshot(d):
    return {os.path.relpath(os.path.join(p, n), d): open(os.path.join(p, n), "rb").read()
            for p, _, names in os.walk(d) for n in names}


def test_staged_and_atomic_writes_touch_no_near_miss(tmp_path):
    """staged_dir (analyze.py, topics.py, sae.py, data/prepare.py) and atomic_write (ckpt.pt, log.jsonl, markers,
    steer.py --save, JSON outputs) beside a user's files of every near-miss name, written twice (the second
    replacing the first): the user's files are byte-identical, and no temporary is left."""
    dead = dead_pid()
    for output in ("analysis", "sae-mlp-k1", "topics", "data"):
        files = near_misses(output, dead)
        put(tmp_path, files)
        for i in range(2):
            with staged_dir(str(tmp_path / output), "analysis" if output == "analysis" else
                            {"sae-mlp-k1": "sae", "topics": "topics", "data": "dataset"}[output]) as d:
                name = {"analysis": "stats.json", "sae-mlp-k1": "results.json", "topics": "topic_codes.json",
                        "data": "meta.json"}[output]
                with open(os.path.join(d, name), "w") as f:
                    f.write(str(i))
            survived(tmp_path, files)
        assert (tmp_path / output / name).read_text() == "1"
    for output in ("ckpt.pt", "log.jsonl", "steer.json"):
        files = near_misses(output, dead)
        put(tmp_path, files)
        for i in range(2):
            with atomic_write(str(tmp_path / output)) as f:
                f.write(str(i))
            remove_leftovers(str(tmp_path / output))
        survived(tmp_path, files)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".") and n not in
                {k for o in ("analysis", "sae-mlp-k1", "topics", "data", "ckpt.pt", "log.jsonl", "steer.json")
                 for k in near_misses(o, dead)}]


def test_a_run_keeps_a_users_files_through_resume_and_overwrite(tmp_path, capsys):
    """train.py in a run directory where a user put near-miss files beside ckpt.pt and log.jsonl: a resume,
    a run that replaces it (--overwrite=true), and a checkpoint set aside as ckpt.pt.old.999999 to start over:
    every one of the user's files is byte-identical after each, and the set-aside checkpoint is not put back."""
    out, dead = tmp_path / "run", dead_pid()
    train.main([*TINY, "--max_iters=1", f"--out_dir={out}"])
    files = {**near_misses("ckpt.pt", dead), **near_misses("log.jsonl", dead)}
    put(out, files)
    train.main(["--init_from=resume", "--max_iters=2", f"--out_dir={out}"])
    survived(out, files)
    train.main([*TINY, "--max_iters=1", "--overwrite=true", f"--out_dir={out}"])
    survived(out, files)
    os.rename(out / "ckpt.pt", out / "ckpt.pt.old.999999")  # set aside, to start over
    files["ckpt.pt.old.999999"] = (out / "ckpt.pt.old.999999").read_bytes()
    train.main([*TINY, "--max_iters=1", "--seed=7", f"--out_dir={out}"])
    survived(out, files)
    assert torch.load(out / "ckpt.pt", weights_only=True)["train_config"]["seed"] == 7


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("users") / "run"
    train.main([*TINY, "--max_iters=1", f"--out_dir={out}"])
    return out


def test_analysis_beside_near_misses_and_a_users_notes_inside(run, tmp_path, capsys):
    """analyze.py writes its analysis twice beside a user's `analysis.old.2` and friends (directories holding
    files), which survive; notes a user put inside the analysis make the next analysis refuse, in one line naming
    them, with nothing changed; a folder holding only `keep.old.7` is a user's, refused too."""
    dead = dead_pid()
    save = tmp_path / "analysis"
    beside = [f"analysis.old.2", f"analysis.tmp.3000", f"analysis.old.{dead}", f"analysis.tmp.{dead}",
              f".analysis.codebook-old-{dead}-0123abcd"]
    for name in beside:
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    before = snapshot(tmp_path)
    args = [f"--out_dir={run}", "--device=cpu", "--num_seqs=64", f"--save_dir={save}"]
    for _ in range(2):
        analyze.main(args)
        after = snapshot(tmp_path)
        assert {k: v for k, v in after.items() if not k.startswith("analysis/")} == before
    (save / "notes.txt").write_text("my notes\n")
    for target in (save, tmp_path / "keep"):
        if target.name == "keep":
            target.mkdir()
            (target / "keep.old.7").write_text("mine\n")
        before = snapshot(tmp_path)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli(analyze.main, [*args[:-1], f"--save_dir={target}"])
        msg = str(e.value.code)
        assert msg.startswith("error: save_dir=") and ("notes.txt" if target == save else "keep.old.7") in msg, msg
        assert snapshot(tmp_path) == before


def test_steer_save_beside_near_misses(run, tmp_path):
    """steer.py --save writes its JSON atomically beside a user's `s.json.tmp.3000` and friends, which survive."""
    dead = dead_pid()
    files = near_misses("s.json", dead)
    put(tmp_path, files)
    steer.main([f"--out_dir={run}", "--device=cpu", "--pairs=4", f"--save={tmp_path / 's.json'}"])
    survived(tmp_path, files)
    assert isinstance(json.loads((tmp_path / "s.json").read_text()), dict)


@pytest.mark.parametrize("marker", ["analysis", "torn", "directory"])
def test_a_marker_against_its_run(run, tmp_path, marker, capsys):
    """A run whose marker names another kind, is torn, or is a directory: its ckpt.pt and log.jsonl (this
    project's format) make it a training run. analyze.py may not write over it, and the run resumes."""
    d = tmp_path / "run"
    os.makedirs(d)
    for name in ("ckpt.pt", "log.jsonl"):
        (d / name).write_bytes((run / name).read_bytes())
    if marker == "directory":
        (d / MARKER).mkdir()
    else:
        (d / MARKER).write_text('{"kind": "analysis"}' if marker == "analysis" else '{"kind": "tr')
    assert kind_of(str(d))[0] == "train"
    before = snapshot(d)
    with pytest.raises(SystemExit) as e:
        cli(analyze.main, [f"--out_dir={run}", "--device=cpu", f"--save_dir={d}"])
    assert "holds a training run (ckpt.pt, log.jsonl" in str(e.value.code) and snapshot(d) == before
    train.main(["--init_from=resume", "--max_iters=2", f"--out_dir={d}"])
    assert torch.load(d / "ckpt.pt", weights_only=True)["iter_num"] == 2
    assert (d / MARKER).is_dir() if marker == "directory" else (d / MARKER).read_bytes() == before[MARKER]


def test_a_torn_marker_alone_is_an_empty_directory(tmp_path):
    """A directory holding only a torn marker (this project's file, nothing else) is empty: a run may start there,
    and its marker is written whole. One whose marker name is a directory is a user's: refused, left as it is."""
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / MARKER).write_text('{"kin')
    assert kind_of(str(tmp_path / "torn"))[0] is None
    train.main([*TINY, "--max_iters=1", f"--out_dir={tmp_path / 'torn'}"])
    assert json.loads((tmp_path / "torn" / MARKER).read_text())["kind"] == "train"
    (tmp_path / "dir" / MARKER).mkdir(parents=True)
    assert kind_of(str(tmp_path / "dir"))[0] == ""
    with pytest.raises(SystemExit) as e:
        cli(train.main, [*TINY, "--max_iters=1", f"--out_dir={tmp_path / 'dir'}"])
    assert "files this project did not write (.codebook-kind.json)" in str(e.value.code)
    assert os.listdir(tmp_path / "dir") == [MARKER] and not os.listdir(tmp_path / "dir" / MARKER)


def test_a_kind_is_guessed_only_from_files_in_the_projects_format(tmp_path):
    """Without a marker, a folder holding only results.json (sae.py's name), or config.json and settings.json (a
    Pythia directory's names), is a user's folder: nothing there is taken for this project's, and a new run may be
    made inside it. Files in the project's format (sae.pt, a GPT-NeoX config.json) still show their kind."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text('{"my": "results"}')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "b" / "settings.json").write_text("{}")
    for name in ("a", "b"):
        assert kind_of(str(tmp_path / name))[0] == ""
        claim(str(tmp_path / name / "run"), "train", "out_dir")  # no error: nothing of another kind there
    torch.save({"x": torch.zeros(1)}, tmp_path / "a" / "sae.pt")
    (tmp_path / "b" / "config.json").write_text('{"model_type": "gpt_neox"}')
    assert kind_of(str(tmp_path / "a"))[0] == "sae" and kind_of(str(tmp_path / "b"))[0] == "pythia"


def test_sae_and_topics_beside_near_misses(tmp_path):
    """sae.py and topics.py write their outputs (twice each) beside a user's near-miss files and folders, which
    survive byte-identical."""
    from dataclasses import asdict

    from conftest import write_lm_dataset

    import sae
    import topics
    from model import GPT, GPTConfig

    dead = dead_pid()
    nocb = tmp_path / "nocb"
    train.main([*[a for a in TINY if "codebook_sites" not in a], "--max_iters=1", "--codebook_sites=",
                f"--out_dir={nocb}"])
    data = write_lm_dataset(tmp_path / "data", "Once upon a time there was a dragon and a king. " * 40)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=384,
                          codebook_sites="attn_heads", num_codes=16, k=2))
    lm = tmp_path / "lm"
    lm.mkdir()
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "optimizer": {},
                "train_config": asdict(train.TrainConfig(dataset=str(data))), "iter_num": 0}, lm / "ckpt.pt")
    mine = {}  # path: bytes of every file of the user's
    for folder, output in ((tmp_path, "sae"), (lm, "topics")):
        for name in (f"{output}.old.7", f"{output}.x.tmp.{dead}", f".{output}.codebook-old-{dead}-0123abee"):
            (folder / name).mkdir()
            (folder / name / "keep.old.7").write_text(name)
            mine[folder / name / "keep.old.7"] = name.encode()
        files = near_misses(output, dead)
        put(folder, files)
        mine.update({folder / n: data for n, data in files.items()})
    for _ in range(2):
        sae.main([f"--out_dir={nocb}", "--num_latents=8", "--num_seqs=8", "--steps=1", "--pairs=2", "--device=cpu",
                  f"--save_dir={tmp_path / 'sae'}"])
        topics.main([f"--out_dir={lm}", "--topics=dragon", "--samples_per_prompt=1", "--max_new_tokens=4",
                     "--device=cpu"])
        changed = [str(p) for p, data in mine.items() if not p.is_file() or p.read_bytes() != data]
        assert not changed, changed
    assert (tmp_path / "sae" / "sae.pt").is_file() and (lm / "topics" / "topic_codes.json").is_file()
