"""memory.py: the estimate against measured peaks (within a factor of 2), and every size option of every entry point
refused at an absurd value, in one line, before any allocation.

The size options not in SIZES cannot make a run outgrow the machine on their own: codebook_chunk (a chunk holds at
most a batch's tokens), n_head and gradient_accumulation_steps (they must divide n_embd and batch_size, refused when
those are too large), sample.py's top_k (at most the vocabulary), analyze.py's batch_size, top, html_codes and
contexts and topics.py's batch_size, window, top and codes_per_topic (bounded by the data or the codes), max_tokens
and an LM's eval_seqs (bounded by the val tokens), steer.py's max_new_tokens on TokFSM (bounded by block_size),
topics.py's frequent (its cost is the training text's size, memory.topic_search's "training text"), counts of steps
(max_iters, sae.py's steps: a step's memory does not grow with them) and bench.py's repeats (at most 1,000)."""

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, replace

import pytest
import torch
from conftest import ROOT, once, write_lm_dataset

import analyze
import codebook
import sae
import sample
import steer
import topics
import train
from model import GPT, GPTConfig
from plumbing import memory
from plumbing.entry import cli

# One fresh process measures every configuration in turn (memory.peak after glibc has handed back what the previous
# one freed), after a tiny warm-up run of each entry point: the first run of a process also pays the pages of
# torch's kernels (~0.1 GB), which the estimate leaves out. Each run's estimate is the one its own check computed.
MEASURE = r"""
import json, sys
import sae, train
from plumbing import memory
seen = []
check = memory.check
memory.check = lambda estimate, v, *a: seen.append(memory.need(estimate, v)[0]) or check(estimate, v, *a)
out = []
for name, entry, argv in json.loads(sys.argv[1]):
    main = {"train": train.main, "sae": sae.main}[entry]
    _, peak = memory.peak(lambda: main(argv))
    out.append((name, seen[-1], peak))
print(json.dumps(out))
"""
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=4", "--eval_seqs=4",
        "--eval_samples=4", "--max_iters=1", "--codebook_start=0", "--device=cpu"]
CONFIGS = [  # (name, entry point, arguments): each dominated by one term of the estimate, a few seconds on a CPU
    ("activations", "train", [*TINY, "--block_size=64", "--batch_size=1024", "--n_layer=2", "--num_codes=16",
                              "--kmeans_init=false", "--eval_seqs=16", "--eval_samples=16"]),
    ("codes and AdamW", "train", [*TINY, "--num_codes=262144", "--kmeans_init=false"]),
    ("sampling", "train", [*TINY, "--block_size=32", "--eval_samples=16384", "--codebook_sites="]),
    ("SAE concept tables", "sae", ["--num_latents=8192", "--num_seqs=64", "--steps=2", "--pairs=2", "--device=cpu"]),
]


@pytest.mark.slow
def test_estimate_is_within_a_factor_of_two_of_the_measured_peak(tmp_path):
    nocb = str(tmp_path / "nocb")
    runs = [("warm-up", "train", [*TINY, f"--out_dir={tmp_path / 'warm'}"]),
            ("warm-up", "train", [*TINY, "--codebook_sites=", f"--out_dir={nocb}"]),
            ("warm-up", "sae", ["--num_latents=8", "--num_seqs=8", "--steps=1", "--pairs=2", "--device=cpu",
                                f"--out_dir={nocb}", f"--save_dir={tmp_path / 'sae0'}"])]
    for i, (name, entry, args) in enumerate(CONFIGS):
        where = [f"--out_dir={nocb}", f"--save_dir={tmp_path / f'sae{i}'}"] if entry == "sae" else \
            [f"--out_dir={tmp_path / f'run{i}'}"]
        runs.append((name, entry, once([*args, *where])))
    r = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(runs)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    measured = [(name, est, peak) for name, est, peak in json.loads(r.stdout.splitlines()[-1]) if name != "warm-up"]
    report = ", ".join(f"{name}: estimate {est / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB" for name, est, peak in measured)
    assert all(0.5 <= est / peak <= 2 for _, est, peak in measured), report
    assert all(est > 2e8 for _, est, _ in measured), report  # each large beside torch's own ~0.1 GB


def test_kmeans_bound_is_codebooks():
    assert memory.KMEANS_MAX_TOKENS == codebook.KMEANS_MAX_TOKENS


# ---------------------------------------------------------------------------------------------- absurd sizes
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs the tools read, written directly (untrained weights, past codebook_start): a TokFSM model with codebooks,
    one without, and a language model on a tiny prepared dataset."""
    w = tmp_path_factory.mktemp("runs")

    def run(name, dataset="fsm", **model):
        cfg = GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, num_codes=32, **model)
        os.makedirs(w / name)
        torch.save({"model": GPT(cfg).state_dict(), "model_config": asdict(cfg), "optimizer": {}, "iter_num": 300,
                    "train_config": asdict(train.TrainConfig(dataset=dataset))}, w / name / "ckpt.pt")
    run("fsm")
    run("nocb", codebook_sites="")
    run("lm", str(write_lm_dataset(w / "data", "Once upon a time there was a dragon and a king. " * 40)),
        vocab_size=384, codebook_sites="attn_heads")
    return w


BIG = 10**9
T = ["--device=cpu", "--out_dir={w}/new"]
SIZES = [  # (entry point, arguments, the option the message must name)
    *[(train.main, [*T, f"--{k}={BIG}"], k) for k in ("batch_size", "block_size", "n_layer", "n_embd", "n_inner",
                                                       "vocab_size", "num_codes", "eval_seqs", "eval_samples",
                                                       "num_states")],
    (train.main, [*T, f"--k={BIG}", f"--num_codes={BIG}"], "k"),
    (train.main, [*T, "--codebook_sites=mlp", f"--codebook_groups={BIG}", f"--n_embd={BIG}"], "codebook_groups"),
    (train.main, [*T, f"--eval_iters={BIG}", "--dataset={w}/data", "--vocab_size=384"], "eval_iters"),
    (sample.main, ["--out_dir={w}/lm", "--device=cpu", f"--num_samples={BIG}"], "num_samples"),
    (sample.main, ["--out_dir={w}/lm", "--device=cpu", f"--max_new_tokens={BIG}"], "max_new_tokens"),
    (analyze.main, ["--out_dir={w}/fsm", "--device=cpu", f"--num_seqs={BIG}"], "num_seqs"),
    (steer.main, ["--out_dir={w}/fsm", "--device=cpu", f"--pairs={BIG}"], "pairs"),
    (steer.main, ["--out_dir={w}/fsm", "--device=cpu", "--task=generate", f"--num_samples={BIG}"], "num_samples"),
    (steer.main, ["--out_dir={w}/lm", "--device=cpu", "--task=generate", f"--max_new_tokens={BIG}"], "max_new_tokens"),
    (steer.main, ["--out_dir={w}/fsm", "--device=cpu", "--task=ablate", "--ablate=h.0.mlp:1", f"--eval_seqs={BIG}"],
     "eval_seqs"),
    (topics.main, ["--out_dir={w}/lm", "--device=cpu", f"--samples_per_prompt={BIG}"], "samples_per_prompt"),
    (topics.main, ["--out_dir={w}/lm", "--device=cpu", f"--max_new_tokens={BIG}"], "max_new_tokens"),
    *[(sae.main, ["--out_dir={w}/nocb", "--device=cpu", f"--{k}={BIG}"], k) for k in ("num_latents", "batch_size",
                                                                                      "num_seqs", "pairs")],
]


@pytest.mark.parametrize("entry,args,option", SIZES, ids=[f"{e.__module__} {o}" for e, _, o in SIZES])
def test_size_that_cannot_fit_is_refused_before_allocation(entry, args, option, runs, capsys):
    before = sorted(os.listdir(runs))
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        cli(entry, [a.format(w=runs) for a in args])
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: this configuration needs about ") and "\n" not in msg, msg
    assert re.search(rf" available: .*lower (.* )?--{option}\b", msg), msg  # the limit, the option to lower
    assert time.time() - t0 < 2 and capsys.readouterr().err == ""
    assert sorted(os.listdir(runs)) == before  # nothing written


def test_limit_from_the_environment(monkeypatch):
    """CODEBOOK_MEMORY_LIMIT stands for the machine: a batch of 1,024 fits in 1 GB, not in 100 MB, where the option
    set beyond its default is named with a value that fits; a limit that is not a number is one line too."""
    cfg, gcfg = train.TrainConfig(device="cpu", batch_size=1024), GPTConfig()
    monkeypatch.setenv("CODEBOOK_MEMORY_LIMIT", "1e9")
    assert memory.check_training(cfg, gcfg, 1, "cpu") < 1e9
    monkeypatch.setenv("CODEBOOK_MEMORY_LIMIT", "1e8")
    with pytest.raises(memory.ConfigError, match=r"but CODEBOOK_MEMORY_LIMIT allows 100.0 MB: lower --batch_size "
                                                 r"\(to about [0-9,]+\) \(where the estimate") as e:
        memory.check_training(cfg, gcfg, 1, "cpu")
    batch = int(str(e.value).split("(to about ")[1].split(")")[0].replace(",", ""))
    assert 128 < batch < 1024 and memory.check_training(replace(cfg, batch_size=batch), gcfg, 1, "cpu") <= 1e8
    monkeypatch.setenv("CODEBOOK_MEMORY_LIMIT", "lots")
    with pytest.raises(memory.ConfigError, match="not a finite number of bytes"):
        memory.check_training(cfg, gcfg, 1, "cpu")
