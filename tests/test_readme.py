"""Every command in the code blocks of README.md and RESULTS.md, so that a documented command cannot rot: each is
parsed against its script's configs (keys, types, ranges, presets, paths), and every one that runs offline on a CPU
is run, in order (README.md, then RESULTS.md, whose commands read runs the README's make), in a copy of the
repository (with ../shared beside it), with settings appended that make it tiny. Blocks
whose first line is a comment naming the network, a GPU, scripts/fsm_table.py or scripts/stories_study.py (whose
runs they read), torchrun
commands and CUDA devices are parsed only."""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import analyze
import bench
import sae
import sample
import steer
import topics
import train
from data.prepare import DATASETS, PrepareConfig
from model import GPTConfig
from plumbing.configuration import parse_args, split_config

SHARED = os.path.join(ROOT, "..", "shared")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}
CONFIGS = {"train.py": (train.TrainConfig, GPTConfig), "sample.py": (sample.SampleConfig,),
           "analyze.py": (analyze.AnalyzeConfig,), "steer.py": (steer.SteerConfig,),
           "topics.py": (topics.TopicsConfig,), "sae.py": (sae.SAEConfig,), "bench.py": (bench.BenchConfig,)}
# appended to a command that runs, so that it is quick, in place of the command's own value of a flag
TINY = {
    "train.py": ["--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=4",
                 "--gradient_accumulation_steps=1", "--max_iters=3", "--warmup_iters=1", "--codebook_start=1",
                 "--eval_interval=3", "--log_interval=1", "--eval_seqs=8", "--eval_samples=4", "--eval_iters=1"],
    "train.py resume": ["--max_iters=5", "--eval_interval=5", "--eval_seqs=8", "--eval_samples=4", "--eval_iters=1"],
    "train.py pretrained": ["--block_size=32", "--num_codes=16", "--batch_size=2", "--gradient_accumulation_steps=1",
                            "--max_iters=2", "--warmup_iters=1", "--eval_interval=2", "--eval_iters=1"],
    "sample.py": ["--max_new_tokens=4", "--num_samples=1"],
    "analyze.py": ["--num_seqs=32", "--max_tokens=2000", "--regex= the"],  # a regex that matches in 2000 tokens
    "steer.py": ["--pairs=10", "--eval_seqs=16", "--num_samples=2"],
    # a topic that matches in the few tokens read; the 10 most frequent nouns of the training text all do in 5000
    "topics.py": ["--max_tokens=5000", "--topics=friend", "--samples_per_prompt=1", "--max_new_tokens=4"],
    "sae.py": ["--steps=5", "--num_latents=16", "--num_seqs=32", "--pairs=10"],
    "bench.py": ["--repeats=1", "--mem=false", "--only=generate"],  # tests/test_bench.py runs every part, shrunk
    "scripts/random_pythia.py": ["--size=tiny"],
    "scripts/explorer_bench.py": ["--num_codes=200", "--rows=8", "--T=16"],
}


DOCS = ("README.md", "RESULTS.md")  # in the order their commands run


def readme_commands():
    """[(command, runs)] in the order of DOCS; `runs` is False for the parse-only blocks."""
    text = "\n".join(open(os.path.join(ROOT, doc), encoding="utf-8").read() for doc in DOCS)
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        runs = not (lines and lines[0].startswith("#") and re.search(r"network|GPU|fsm_table|stories_study", lines[0]))
        for line in lines:
            for cmd in line.split("&&"):
                words = shlex.split(cmd, comments=True)
                if words:
                    out.append((words, runs))
    return out


COMMANDS = readme_commands()


def script_and_args(words):
    """(script, args) of a `python X.py ...`, `/usr/bin/time python ...` or `torchrun ... X.py ...` command."""
    while words and words[0] in ("/usr/bin/time", "-v"):
        words = words[1:]
    if words[0] == "torchrun":
        i = next(i for i, w in enumerate(words) if w.endswith(".py"))
        return words[i], words[i + 1:]
    assert words[0] == "python", words
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1], words[2:]


def parse(script, args):
    """Check args against the script's configs, as the script itself would before doing anything."""
    args = ["--device=cpu" if a.startswith("--device=cuda") else a for a in args]  # a GPU command, checked here
    if script == "data/prepare.py":
        assert args[0] in DATASETS, args
        preset, flags = parse_args(args[1:], (PrepareConfig,))
        PrepareConfig(**{**preset, **flags})
    elif script in CONFIGS:
        classes = CONFIGS[script]
        preset, flags = parse_args(args, classes)
        values = {**preset, **flags}
        if script == "train.py":
            values.pop("init_from", None)  # resume and Pythia directories need the run or the download
        for cls, vals in zip(classes, split_config(values, *classes)):
            cls(**vals)
    else:  # a script of scripts/: its flags are the fields of its config dataclass
        source = open(os.path.join(ROOT, script)).read()
        for a in args:
            if a.startswith("--"):
                assert re.search(rf"^    {a[2:].split('=')[0]}: \w+ = ", source, re.M), (script, a)


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=[" ".join(w)[:80] for w, _ in COMMANDS])
def test_readme_command_parses(words, monkeypatch):
    monkeypatch.chdir(ROOT)
    if words[0] == "pip":
        assert words[1:3] == ["install", "-r"] and os.path.isfile(os.path.join(ROOT, words[3]))
        return
    script, args = script_and_args(words)
    if script == "pytest":  # the paths it is given exist; -m and -k take an expression
        paths = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in ("-m", "-k"))]
        assert paths and all(os.path.exists(os.path.join(ROOT, a)) for a in paths), args
        return
    assert os.path.isfile(os.path.join(ROOT, script)), script
    if not os.path.isdir(SHARED) and any("../shared" in a for a in args):
        pytest.skip("../shared is not here")
    parse(script, args)


def tiny(script, args):
    key = script
    if script == "train.py" and "--init_from=resume" in args:
        key = "train.py resume"
    elif script == "train.py" and any(a.startswith("--init_from=") for a in args):
        key = "train.py pretrained"
    extra = [*TINY.get(key, []), *(["--device=cpu"] if script in CONFIGS and script != "bench.py" else [])]
    given = {a.split("=")[0] for a in extra}  # a flag may be given once
    return [a for a in args if a.split("=")[0] not in given] + extra


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared is not here")
def test_readme_commands_run(tmp_path):
    """The runnable commands, in order, in a copy of the repository: each exits 0."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "out*", "__pycache__", ".pytest_cache",
                                                               ".ipynb_checkpoints"))
    for d in ("data/tinystories", "data/wikitext", "data/downloads", "data/pythia-70m-random"):
        shutil.rmtree(repo / d, ignore_errors=True)
    os.symlink(os.path.abspath(SHARED), tmp_path / "shared")
    ran, seen = [], set()
    for words, runs in COMMANDS:
        if not runs or words[0] in ("pip", "torchrun") or "-m" in words[:3] or "--device=cuda" in " ".join(words):
            continue
        if tuple(words) in seen:  # the same command shown twice runs once
            continue
        seen.add(tuple(words))
        script, args = script_and_args(words)
        if script in ("scripts/fault_trials.py", "scripts/fsm_table.py"):  # long; test_reliability runs the first
            continue
        if script == "scripts/explorer_bench.py" and (shutil.which("chromium") or shutil.which("chromium-browser")) is None:
            continue  # a browser benchmark; without a browser tests/test_explorer.py says what to install
        cmd = [sys.executable, script, *tiny(script, args)]
        r = subprocess.run(cmd, cwd=repo, env=ENV, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(words)}\n{r.stderr[-3000:]}"
        ran.append(script)
    assert ran.count("train.py") >= 5 and {"analyze.py", "steer.py", "topics.py", "sample.py"} <= set(ran)
    assert "scripts/random_pythia.py" in ran  # a command of RESULTS.md ran too


def test_readme_is_short_and_links_results():
    """The README is what a newcomer reads in one sitting; the long studies live in RESULTS.md."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert len(text.splitlines()) <= 250 and "](RESULTS.md" in text
