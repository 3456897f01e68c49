"""The command line of every entry point (configuration.py, entry.py, progress.py): `--help` and `-h` list every option of the
entry point's dataclasses with its type, default, valid values, meaning and group; an unknown option names the
closest valid one; a flag given twice is an error; progress bars go to stderr only when asked and change nothing."""

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import analyze
import bench
import sae
import sample
import steer
import topics
import train
from plumbing import configuration
from plumbing import entry
from plumbing import progress
from data import prepare
from model import GPT, GPTConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
ENV.pop("CODEBOOK_PROGRESS", None)
# entry point: (its module, if imported here, and its dataclasses or, for scripts/, the name of its dataclass)
ENTRY = {
    "train.py": (train, (train.TrainConfig, GPTConfig)),
    "sample.py": (sample, (sample.SampleConfig,)),
    "analyze.py": (analyze, (analyze.AnalyzeConfig,)),
    "steer.py": (steer, (steer.SteerConfig,)),
    "topics.py": (topics, (topics.TopicsConfig,)),
    "sae.py": (sae, (sae.SAEConfig,)),
    "bench.py": (bench, (bench.BenchConfig,)),
    "data/prepare.py": (prepare, (prepare.PrepareConfig,)),
    "scripts/fsm_table.py": (None, "TableConfig"),
    "scripts/random_pythia.py": (None, "RandomPythiaConfig"),
    "scripts/fault_trials.py": (None, "TrialsConfig"),
}
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--num_codes=32", "--device=cpu"]


def fields_of(script, classes):
    """The option names an entry point must list: its dataclasses' fields (for scripts/, read from the source)."""
    if not isinstance(classes, str):
        return [f.name for c in classes for f in dataclasses.fields(c)]
    tree = ast.parse(open(os.path.join(ROOT, script), encoding="utf-8").read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == classes)
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]


def options(text):
    """{name: its line} of the options a --help lists."""
    return {m.group(1): line for line in text.splitlines() if (m := re.match(r"^\s+--(\w+)=", line))}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(ENTRY))
def test_help_lists_every_option_and_exits_0(script, capsys):
    module, classes = ENTRY[script]
    r = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    assert list(options(r.stdout)) == fields_of(script, classes)  # all of them, in the dataclasses' order
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, script), encoding="utf-8").read()))
    assert r.stdout.startswith(doc.splitlines()[0])  # the usage part of the docstring comes first
    assert f"python {script}" in r.stdout.split("Options:")[0]  # with its command lines
    if module is None:  # a script of scripts/: -h in its own process too
        h = subprocess.run([sys.executable, script, "-h"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=120)
        assert h.returncode == 0 and h.stdout == r.stdout, h.stderr[-2000:]
        return
    argv = ["tinystories", "-h"] if script == "data/prepare.py" else ["-h"]
    with pytest.raises(SystemExit) as e:
        entry.cli(module.main, argv)
    assert e.value.code == 0 and capsys.readouterr().out == r.stdout


def test_help_shows_type_default_valid_values_meaning_and_group():
    text = configuration.help_text(train.__doc__, (train.TrainConfig, GPTConfig))
    opt = options(text)
    assert "--max_iters=INT " in opt["max_iters"]
    assert f"(default {train.TrainConfig.max_iters}; >= 1)" in opt["max_iters"]
    assert opt["lr_schedule"].endswith("after a linear warmup (default 'cosine'; one of 'cosine', 'constant')")
    assert opt["codebook_lr"].split()[0] == "--codebook_lr=FLOAT|None" and "None = lr" in opt["codebook_lr"]
    assert "(default 0.25; [0, 1])" in opt["rotary_pct"] and "(default 0.0; [0, 1))" in opt["dropout"]
    assert "comma-separated, each one of attn_heads, attn, mlp" in opt["codebook_sites"]
    assert "--compile=true|false" in opt["compile"] and "(default false)" in opt["compile"]
    assert "checked by is_device" in opt["device"]
    # a comment of two lines above a field is its meaning (first sentence), not a group
    start = train.TrainConfig.codebook_start
    assert f"train with the codebooks bypassed until this iteration, then switch them on (default {start}" in \
        opt["codebook_start"]
    lines = text.splitlines()
    group = lambda name: next(l for l in reversed(lines[: lines.index(opt[name])]) if not l.startswith("    "))  # noqa
    assert group("batch_size") == group("nan_policy") == "  optimisation"
    assert group("num_states") == "  data: TokFSM" and group("k") == "  codebooks"
    assert group("out_dir").startswith("TrainConfig: Training.") and group("n_layer").startswith("GPTConfig: The model")


def test_usage_is_the_first_paragraph_and_its_commands():
    doc = "\nWhat it is,\nin two lines.\n\n    python x.py      # one\n    python x.py --a=1\n\nMore text.\n"
    assert configuration.usage(doc) == "What it is,\nin two lines.\n\n    python x.py      # one\n    python x.py --a=1"


def error_of(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        entry.cli(main, argv)
    assert capsys.readouterr().err == ""
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg
    return msg


def test_unknown_option_suggests_the_closest(tmp_path, capsys):
    msg = error_of(train.main, [*TINY, "--max_iter=3"], capsys)
    assert msg.startswith("error: unknown option --max_iter: did you mean --max_iters?"), msg
    assert "'max_iter'" in msg and "TrainConfig and GPTConfig" in msg
    assert error_of(sample.main, ["--num_sample=2"], capsys).startswith(
        "error: unknown option --num_sample: did you mean --num_samples?")
    msg = error_of(steer.main, ["--zzzz=1"], capsys)  # nothing close: no suggestion
    assert msg.startswith("error: unknown option --zzzz (") and "did you mean" not in msg
    preset = tmp_path / "p.py"
    preset.write_text("config = dict(lerning_rate=1e-3)\n")
    msg = error_of(train.main, [str(preset)], capsys)
    assert "unknown config key 'lerning_rate'" in msg and "did you mean 'learning_rate'?" in msg and "p.py" in msg


def test_a_flag_given_twice_is_an_error(tmp_path, capsys):
    msg = error_of(train.main, [*TINY, "--max_iters=3", f"--out_dir={tmp_path / 'run'}", "--max_iters=4"], capsys)
    assert msg == "error: --max_iters is given twice (again as --max_iters=4): give it once"
    assert not (tmp_path / "run").exists()
    assert "--topics is given twice" in error_of(topics.main, ["--topics=dragon", "--topics=sea"], capsys)
    preset = tmp_path / "p.py"  # a flag still overrides a preset, once
    preset.write_text("config = dict(max_iters=7, k=2)\n")
    assert configuration.parse_args([str(preset), "--max_iters=9"], (train.TrainConfig, GPTConfig)) == \
        ({"max_iters": 7, "k": 2}, {"max_iters": 9})


def test_progress_is_off_unless_asked(monkeypatch, capsys):
    items = [1, 2, 3]
    monkeypatch.delenv("CODEBOOK_PROGRESS", raising=False)
    assert progress.progress(items, desc="x") is items  # stderr is not a terminal under pytest
    monkeypatch.setenv("CODEBOOK_PROGRESS", "0")
    assert progress.progress(items, desc="x") is items
    monkeypatch.setenv("CODEBOOK_PROGRESS", "1")
    assert list(progress.progress(items, desc="counting")) == items
    assert "counting: 100%" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # only the first process of a torchrun run draws
    assert progress.progress(items) is items


def test_sampling_bar_counts_the_new_tokens_and_changes_nothing(monkeypatch, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, num_codes=8)).eval()
    idx = torch.zeros(2, 1, dtype=torch.long)
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("CODEBOOK_PROGRESS", flag)
        with torch.no_grad(), progress.forward_progress(model, 6, "sampling"):
            out[flag] = model.generate(idx, 5, generator=torch.Generator().manual_seed(1))
        err = capsys.readouterr().err
        assert ("sampling: 100%" in err and "6/6" in err) if flag == "1" else err == ""
    assert torch.equal(out["0"], out["1"]) and not model._forward_hooks


@pytest.mark.slow
def test_a_bar_on_stderr_leaves_stdout_and_results_identical(tmp_path, capsys):
    run = tmp_path / "run"
    train.main([*TINY, "--max_iters=4", "--log_interval=2", "--eval_interval=4", "--codebook_start=1",
                f"--out_dir={run}"])
    iters = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter ")]
    assert len(iters) == 2 and all(re.search(r", ETA \d+s$", line) for line in iters), iters
    outs = {}
    for flag in ("1", None):  # forced on; off by default (stderr is a pipe here)
        save = tmp_path / f"steer-{flag}.json"
        env = {**ENV, "CODEBOOK_PROGRESS": flag} if flag else ENV
        r = subprocess.run([sys.executable, "steer.py", f"--out_dir={run}", "--pairs=200", "--device=cpu",
                            f"--save={save}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[flag] = r.stdout, json.loads(save.read_text())["results"], r.stderr
    assert outs["1"][:2] == outs[None][:2]
    assert "swap (state+next): 100%" in outs["1"][2] and "2/2" in outs["1"][2]
    assert outs[None][2] == ""
