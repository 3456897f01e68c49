"""Reliability (issue 6): exact resume on the FSM and LM paths, crash-safe checkpoints (SIGKILL trials through
scripts/fault_trials.py), a one-line error that leaves out_dir untouched for every kind of bad input (the table
BAD_INPUT, which `scripts/fault_trials.py --errors` also runs), numerical faults (nan_policy stop and skip, a
codebook fed zeros) and per-step DDP consistency on 2 gloo ranks. CPU; every subprocess runs one thread."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import train  # noqa: E402
from codebook import CodebookLayer  # noqa: E402

GPT2_TIKTOKEN = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "gpt2", "r50k_base.tiktoken")
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--codebook_sites=attn_heads,mlp", "--num_codes=32", "--device=cpu"]
TOKENS_VOCAB = 64  # the token datasets below: ids < 64, a model with vocab_size=64


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run(script, args, timeout=300):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def torchrun_cmd(script, args, extra=()):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *extra, script,
            *map(str, args)]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_state(a, b, where="checkpoint"):
    """Assert bitwise equality of nested checkpoint values (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def write_tokens(d, ids, vocab_size=TOKENS_VOCAB, splits=("train", "val")):
    """A data/prepare.py-like directory: train.bin and val.bin (uint16 ids) and meta.json."""
    os.makedirs(d)
    for split in splits:
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(d, f"{split}.bin"))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"tokenizer": "gpt2", "tokenizer_file": "none", "vocab_size": vocab_size}, f)
    return d


def pythia_dir(d, arch="gpt_neox", missing_shard=False):
    """A GPT-NeoX directory with a tiny config.json; with missing_shard, an index naming two weight shards of
    which only the first exists."""
    os.makedirs(d)
    config = {"model_type": arch, "architectures": ["GPTNeoXForCausalLM" if arch == "gpt_neox" else "LlamaForCausalLM"],
              "vocab_size": TOKENS_VOCAB, "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
              "intermediate_size": 64, "max_position_embeddings": 64, "rotary_pct": 0.25}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    if missing_shard:
        from safetensors.torch import save_file

        shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
        save_file({"gpt_neox.embed_in.weight": torch.zeros(TOKENS_VOCAB, 32)}, os.path.join(d, shards[0]))
        index = {"metadata": {}, "weight_map": {"gpt_neox.embed_in.weight": shards[0], "embed_out.weight": shards[1]}}
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    return d


def make_fixtures(root):
    """The files the bad-input cases and the resume tests read: a finished 2-iteration FSM run, token
    directories (good, short, empty, without val.bin, a bad meta.json, an id >= vocab_size), Pythia directories
    and a tokenizer directory for sample.py (None without ../shared/data)."""
    os.makedirs(root, exist_ok=True)
    j = lambda name: os.path.join(root, name)  # noqa: E731
    fx = {"run": j("run"), "preset": j("preset.py")}
    r = run("train.py", [*TINY, "--max_iters=2", "--eval_interval=2", "--log_interval=1", "--codebook_start=1",
                         f"--out_dir={fx['run']}"])
    assert r.returncode == 0, r.stderr
    with open(fx["preset"], "w") as f:
        f.write('config = {"max_iters": "10"}  # a string where an int belongs\n')
    rng = np.random.default_rng(0)
    fx["tokens"] = write_tokens(j("tokens"), rng.integers(0, TOKENS_VOCAB, 4000))
    fx["short"] = write_tokens(j("short"), range(10))
    fx["empty"] = write_tokens(j("empty"), [])
    fx["no_val"] = write_tokens(j("no_val"), np.arange(200) % 64, splits=("train",))
    fx["big_id"] = write_tokens(j("big_id"), [5] * 199 + [100])
    fx["bad_meta"] = write_tokens(j("bad_meta"), np.arange(200) % 64)
    with open(os.path.join(fx["bad_meta"], "meta.json"), "w") as f:
        f.write('{"tokenizer": "gpt2", "vocab')  # torn
    fx["shard"] = pythia_dir(j("pythia_missing_shard"), missing_shard=True)
    fx["llama"] = pythia_dir(j("llama"), arch="llama")
    fx["tok"] = None
    if os.path.isfile(GPT2_TIKTOKEN):
        fx["tok"] = j("tokenizer")
        os.makedirs(fx["tok"])
        with open(os.path.join(fx["tok"], "meta.json"), "w") as f:
            json.dump({"tokenizer": "gpt2", "tokenizer_file": os.path.abspath(GPT2_TIKTOKEN), "vocab_size": 50257}, f)
    return fx


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixtures(str(tmp_path_factory.mktemp("fixtures")))


# ---------------------------------------------------------------------------------------------- bad input
class Unavailable(Exception):
    """A case needs a file this machine lacks (the GPT-2 tokenizer in ../shared/data)."""


SCRATCH = [*TINY, "--max_iters=2", "--out_dir={out}", "--overwrite=true"]  # would overwrite the run in out_dir
RESUME = ["--init_from=resume", "--max_iters=4", "--out_dir={out}"]
SAMPLE = ["--out_dir={out}", "--max_new_tokens=2", "--num_samples=1"]
PYTHIA = ["--codebook_sites=attn_heads", "--num_codes=16", "--block_size=16", "--batch_size=4", "--max_iters=1",
          "--eval_seqs=4", "--eval_samples=2", "--device=cpu", "--out_dir={out}", "--overwrite=true"]
LM = ["--vocab_size=64"]

# (case, script, what out_dir holds besides log.jsonl, arguments ({out} and fixture names are filled in),
#  words the error line must contain). out_dir always starts as a copy of a finished run.
BAD_INPUT = [
    ("unknown config key", "train.py", "run", [*SCRATCH, "--no_such_key=1"], ["'no_such_key'", "TrainConfig"]),
    ("wrong value type (flag)", "train.py", "run", [*SCRATCH, "--max_iters=abc"], ["max_iters=abc", "expected int"]),
    ("wrong value type (preset)", "train.py", "run", ["{preset}", *SCRATCH], ["max_iters='10'", "expected int"]),
    ("value outside the choices", "train.py", "run", [*SCRATCH, "--nan_policy=ignore"], ["nan_policy", "'skip'"]),
    ("interval < 1", "train.py", "run", [*SCRATCH, "--eval_interval=0"], ["eval_interval=0", ">= 1"]),
    ("k > num_codes", "train.py", "run", [*SCRATCH, "--k=64"], ["k=64", "num_codes=32", "lower k"]),
    ("num_codes < 1", "train.py", "run", [*SCRATCH, "--num_codes=0"], ["num_codes", ">= 1", "raise num_codes"]),
    ("n_embd not divisible by codebook_groups", "train.py", "run",
     [*SCRATCH, "--codebook_sites=mlp", "--codebook_groups=3"], ["n_embd=32", "codebook_groups=3", "divisor"]),
    ("n_embd not divisible by n_head", "train.py", "run", [*SCRATCH, "--n_head=3"], ["n_head=3", "n_embd=32"]),
    ("block_size too short for the FSM", "train.py", "run", [*SCRATCH, "--block_size=4"], ["block_size=4", ">= 5"]),
    ("block_size longer than the data", "train.py", "run", [*SCRATCH, *LM, "--dataset={short}"],
     ["has 10 tokens", "block_size=16", "lower block_size"]),
    ("missing dataset directory", "train.py", "run", [*SCRATCH, *LM, "--dataset={out}/nowhere"],
     ["nowhere", "data/prepare.py"]),
    ("missing data file", "train.py", "run", [*SCRATCH, *LM, "--dataset={no_val}"], ["val.bin", "data/prepare.py"]),
    ("empty dataset", "train.py", "run", [*SCRATCH, *LM, "--dataset={empty}"], ["has 0 tokens", "block_size"]),
    ("torn meta.json", "train.py", "run", [*SCRATCH, *LM, "--dataset={bad_meta}"], ["meta.json", "data/prepare.py"]),
    ("token id >= vocab_size", "train.py", "run", [*SCRATCH, *LM, "--dataset={big_id}"],
     ["token id 100", "vocab_size=64"]),
    ("truncated checkpoint (resume)", "train.py", "truncated", RESUME,
     ["ckpt.pt", "cannot be read", "truncated", "--overwrite=true"]),
    ("truncated checkpoint (sample.py)", "sample.py", "truncated", SAMPLE, ["ckpt.pt", "truncated"]),
    ("non-checkpoint file (resume)", "train.py", "text", RESUME, ["cannot be read as a checkpoint", "another kind"]),
    ("non-checkpoint file (sample.py)", "sample.py", "text", SAMPLE, ["cannot be read", "another kind"]),
    ("bare state dict as ckpt.pt (resume)", "train.py", "state_dict", RESUME, ["not a checkpoint written by train.py"]),
    ("weights of another config (resume)", "train.py", "mismatch", RESUME, ["do not match", "another config"]),
    ("weights of another config (sample.py)", "sample.py", "mismatch", [*SAMPLE, "--dataset={tok}"],
     ["do not match", "another config"]),
    ("optimizer state of another config (resume)", "train.py", "optimizer", RESUME, ["optimizer state", "match"]),
    ("config keys of another version (resume)", "train.py", "old_version", RESUME,
     ["unknown keys", "attention_sink", "another version"]),
    ("model setting changed on resume", "train.py", "run", [*RESUME, "--n_embd=64"], ["n_embd", "new out_dir"]),
    ("codebook_start moved behind the checkpoint", "train.py", "run", [*RESUME, "--codebook_start=5"],
     ["codebook_start=5", "already"]),
    ("Pythia directory with a missing shard", "train.py", "run", ["--init_from={shard}", *PYTHIA],
     ["model-00002-of-00002.safetensors", "missing", "complete"]),
    ("Pythia directory of another architecture", "train.py", "run", ["--init_from={llama}", *PYTHIA],
     ["llama", "gpt_neox"]),
    ("init_from neither a mode nor a Pythia directory", "train.py", "run", ["--init_from={out}/nowhere", *PYTHIA],
     ["init_from=", "config.json"]),
    ("out_dir holds another run", "train.py", "run", SCRATCH[:-1], ["already holds a run", "--overwrite=true"]),
    ("torchrun: batch not divisible across ranks", "torchrun", "run", [*SCRATCH, "--batch_size=7"],
     ["batch_size=7", "2 rank(s)", "multiple of 2"]),
]


def prepare_out(holds, fx, out):
    """out = a copy of the finished run, its ckpt.pt then damaged or replaced as `holds` says."""
    shutil.copytree(fx["run"], out)
    path = os.path.join(out, "ckpt.pt")
    if holds == "truncated":
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif holds == "text":
        with open(path, "w") as f:
            f.write("iter 2: loss 2.39\n")
    elif holds != "run":
        ckpt = load(path)
        if holds == "state_dict":  # e.g. a pytorch_model.bin copied over ckpt.pt
            ckpt = ckpt["model"]
        elif holds == "mismatch":  # the weights of a wider model under this run's config
            other = train.GPT(train.GPTConfig(**{**ckpt["model_config"], "n_embd": 64}))
            ckpt["model"] = other.state_dict()
        elif holds == "optimizer":  # AdamW state without the codes' parameter group
            ckpt["optimizer"]["param_groups"].pop()
        elif holds == "old_version":
            ckpt["model_config"]["attention_sink"] = 4
        torch.save(ckpt, path)


def snapshot(d):
    files = {}
    for dirpath, _, names in os.walk(d):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                files[os.path.relpath(os.path.join(dirpath, n), d)] = f.read()
    return files


def check_bad_input(case, fx, work):
    """Run one case in the empty directory `work`; assert a one-line `error:` naming the problem, a non-zero exit,
    no traceback and an untouched out_dir. Returns the error line."""
    _, script, holds, args, needles = case
    if any("{tok}" in a for a in args) and fx["tok"] is None:
        raise Unavailable("no GPT-2 tokenizer in ../shared/data")
    out = os.path.join(work, "out")
    prepare_out(holds, fx, out)
    before = snapshot(out)
    argv = [a.format(out=out, **fx) for a in args]
    if script == "torchrun":  # the workers' own stderr, one file per rank, apart from torchrun's report
        logs = os.path.join(work, "torchrun_logs")
        cmd = torchrun_cmd("train.py", argv, [f"--log-dir={logs}", "--redirects=3"])
    else:
        cmd = [sys.executable, script, *argv]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    stderr = r.stderr
    if script == "torchrun":
        files = sorted(glob.glob(os.path.join(logs, "*", "attempt_0", "*", "stderr.log")))
        assert len(files) == 2, files
        stderr = "".join(open(f).read() for f in files)
        assert 'train.py", line' not in r.stderr, r.stderr[-2000:]
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-3000:]
    for word in needles:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert snapshot(out) == before, "out_dir changed"
    return lines[0]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_leaves_out_dir_untouched(case, fx, tmp_path):
    try:
        check_bad_input(case, fx, str(tmp_path))
    except Unavailable as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------------------------------------- exact resume
WARM = ["--codebook_start=2", "--kmeans_init=true", "--replace_after=2", "--eval_interval=2", "--log_interval=2"]


def data_args(path, fx):
    return ["--dataset=" + fx["tokens"], *LM] if path == "lm" else []


@pytest.fixture(scope="module")
def straight(fx, tmp_path_factory):
    """6 iterations without a stop, on each data path: {path: out_dir}."""
    outs = {}
    for path in ("fsm", "lm"):
        outs[path] = str(tmp_path_factory.mktemp(f"straight_{path}"))
        r = run("train.py", [*TINY, *WARM, *data_args(path, fx), "--max_iters=6", f"--out_dir={outs[path]}",
                             "--overwrite=true"])
        assert r.returncode == 0, r.stderr
    return outs


@pytest.mark.parametrize("path,stop", [("fsm", 2), ("fsm", 3), ("lm", 3)])
def test_resume_is_bitwise_exact(path, stop, fx, straight, tmp_path):
    """Stop at `stop`, resume to 6: the weights, the codebook buffers (counts, recent), the AdamW state and the RNG
    state equal those of the straight run, bit for bit. The codebooks switch on at 2 with k-means, and dead codes are
    replaced every 2 steps: stopping at 2 leaves k-means pending across the resume, stopping at 3 must not rerun it."""
    out = str(tmp_path / "split")
    r = run("train.py", [*TINY, *WARM, *data_args(path, fx), f"--max_iters={stop}", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    half = load(os.path.join(out, "ckpt.pt"))
    assert half["iter_num"] == stop
    r = run("train.py", ["--init_from=resume", "--max_iters=6", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    a, b = load(os.path.join(straight[path], "ckpt.pt")), load(os.path.join(out, "ckpt.pt"))
    assert b["iter_num"] == 6
    for key in ("model", "optimizer", "rng"):
        same_state(a[key], b[key], key)
    buffers = [k for k in b["model"] if k.endswith((".counts", ".recent"))]
    assert len(buffers) == 4 and all(b["model"][k].sum() > 0 for k in buffers if k.endswith(".counts"))
    assert not torch.equal(half["model"]["transformer.h.0.mlp_cb.codes"], b["model"]["transformer.h.0.mlp_cb.codes"])
    # the evaluations after the resume see the same model, so they match too; the log stays in order
    evals = lambda o: {r["iter"]: r["eval"] for r in records(o) if "eval" in r and r["iter"] > stop}  # noqa: E731
    assert evals(out) == evals(straight[path]) and set(evals(out)) == {4, 6}
    iters = [r["iter"] for r in records(out)]
    assert iters == sorted(iters)


@pytest.mark.parametrize("path", ["fsm", "lm"])
def test_resume_continues_the_data_stream(path, fx, tmp_path, monkeypatch):
    """The micro-batches a resumed run trains on are those the straight run trained on after the stop point
    (in process: GPT records every training input)."""
    seen = []

    class Recording(train.GPT):
        def forward(self, idx, targets=None, cache=None, last_only=False):
            if self.training and targets is not None:
                seen.append(idx.clone())
            return super().forward(idx, targets, cache, last_only)

    monkeypatch.setattr(train, "GPT", Recording)
    args = [*TINY, *data_args(path, fx), "--gradient_accumulation_steps=2", "--eval_interval=3", "--log_interval=3",
            "--codebook_start=0", "--kmeans_init=false"]
    train.main([*args, "--max_iters=6", f"--out_dir={tmp_path / 'straight'}"])
    straight_batches = seen[:]
    seen.clear()
    train.main([*args, "--max_iters=3", f"--out_dir={tmp_path / 'split'}"])
    assert len(seen) == 6
    train.main(["--init_from=resume", "--max_iters=6", f"--out_dir={tmp_path / 'split'}"])
    assert len(straight_batches) == len(seen) == 12  # 6 steps x 2 micro-steps
    for i, (a, b) in enumerate(zip(straight_batches, seen)):
        assert torch.equal(a, b), f"micro-batch {i}"
    assert len({x.numpy().tobytes() for x in seen}) == 12  # each micro-step reads new data


# ---------------------------------------------------------------------------------------------- crash safety
def test_fault_trials_kill_and_resume():
    """Two SIGKILL trials (one aimed at a checkpoint write, one at a random moment) through the script."""
    r = subprocess.run([sys.executable, "scripts/fault_trials.py", "--trials=2", "--seed=1"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "trials 2, loadable 2, resumed 2 (bitwise equal to the uninterrupted run: 2; clean log: 2;" in r.stdout


# ---------------------------------------------------------------------------------------------- numerical faults
@pytest.mark.parametrize("log_interval,eval_interval", [(1, 100), (100, 2)])
def test_diverging_run_stops_and_keeps_the_last_finite_checkpoint(log_interval, eval_interval, fx, tmp_path):
    """A real fault: learning_rate=1e6 drives the loss to inf/NaN within a few steps. The run stops with one line
    naming the checkpoint it kept, whether the log (every step) or the check before a checkpoint (every
    `eval_interval`, here with no log in between) sees it first; that checkpoint is finite."""
    out = str(tmp_path / "run")
    shutil.copytree(fx["run"], out)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    r = run("train.py", ["--init_from=resume", "--learning_rate=1e6", "--warmup_iters=0", "--max_iters=60",
                         f"--log_interval={log_interval}", f"--eval_interval={eval_interval}", f"--out_dir={out}"])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "not finite" in lines[0] or "the loss became" in lines[0], lines[0]
    assert "--nan_policy=skip" in lines[0]
    kept = int(re.search(r"checkpoint of iteration (\d+)", lines[0]).group(1))
    failed = int(re.search(r"iteration (\d+);", lines[0]).group(1))
    ckpt = load(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] == kept < failed < 60
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    if eval_interval == 100:  # no checkpoint was due before the fault: the file is the one we started from
        assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_policy(policy, tmp_path, monkeypatch):
    """The loss of chosen training steps is made NaN (in process, GPT patched). "stop" (the default) ends the run
    at the next check and keeps the checkpoint before the fault; "skip" leaves those steps out (no update, no code
    counts), logs them and finishes."""
    bad = {5} if policy == "stop" else {2, 5}
    calls = []

    class Poisoned(train.GPT):
        def forward(self, idx, targets=None, cache=None, last_only=False):
            logits, loss, terms = super().forward(idx, targets, cache, last_only)
            if self.training and targets is not None:
                calls.append(1)
                if len(calls) in bad:
                    loss = loss * float("nan")
            return logits, loss, terms

    monkeypatch.setattr(train, "GPT", Poisoned)
    out = tmp_path / "run"
    args = [*TINY, "--codebook_start=0", "--kmeans_init=false", "--max_iters=6", "--log_interval=2",
            "--eval_interval=2", f"--nan_policy={policy}", f"--out_dir={out}"]
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"the loss became nan by iteration 6; the checkpoint of "
                                                     r"iteration 4 in .* is kept: .* or pass --nan_policy=skip"):
            train.main(args)
        assert load(out / "ckpt.pt")["iter_num"] == 4
        assert [r["iter"] for r in records(out) if "eval" in r] == [2, 4]
        return
    train.main(args)
    recs = records(out)
    assert [r["iter"] for r in recs if r.get("skipped")] == [2, 5]
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
    ckpt = load(out / "ckpt.pt")
    assert ckpt["iter_num"] == 6
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {4}  # AdamW stepped 4 times of 6
    for name in ("transformer.h.0.attn.codebook.counts", "transformer.h.0.mlp_cb.counts"):
        assert (ckpt["model"][name].sum(-1) == 4 * 8 * 16).all()  # 4 counted steps x 8 x 16 tokens, k=1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("layernorm", [True, False])
@pytest.mark.parametrize("k,groups", [(1, 1), (2, 4)])
def test_codebook_stays_finite_for_zero_activations_and_zero_codes(layernorm, k, groups):
    cb = CodebookLayer(16, num_codes=8, k=k, groups=groups, layernorm=layernorm)
    with torch.no_grad():
        cb.codes.zero_()
    x = torch.zeros(3, 5, 16, requires_grad=True)
    out = cb(x)
    (out.square().sum() + cb.recon_loss).backward()
    assert torch.isfinite(out).all() and torch.isfinite(cb.recon_loss) and cb.recon_loss == 0
    grads = [x.grad, cb.codes.grad] + ([cb.ln.weight.grad, cb.ln.bias.grad] if layernorm else [])
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert ((cb.last_indices >= 0) & (cb.last_indices < 8)).all()
    # k-means init and dead-code replacement from all-zero activations keep the codes finite
    cb.kmeans_init(torch.zeros(10, groups, 16 // groups))
    cb.replace_dead_codes()
    assert torch.isfinite(cb.codes).all()


def test_zero_codes_score_zero_not_nan():
    """cos(a, 0) must be 0: a NaN score would win the argmax over the one code that matches a."""
    cb = CodebookLayer(16, num_codes=8, k=1, layernorm=False)
    a = torch.randn(5, 16)
    with torch.no_grad():
        cb.codes.zero_()
        cb.codes[0, 3] = a[0]
    assert cb.topk_codes(a[:1].view(1, 1, 16)).item() == 3
    cb(torch.zeros(2, 16))  # zero activations against (mostly) zero codes: a valid index, a finite loss
    assert torch.isfinite(cb.recon_loss) and ((cb.last_indices >= 0) & (cb.last_indices < 8)).all()


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_ranks_agree_after_every_step(tmp_path):
    """2 gloo ranks, k-means at the switch (iteration 2) and dead-code replacement every 2 steps: after every
    optimizer step each rank's weights, codes, usage counts and AdamW state hash the same, and every logged loss
    (ce, recon) is the mean of the two ranks' own losses (tests/ddp_step_worker.py records both)."""
    out = tmp_path / "run"
    args = [*TINY, "--max_iters=6", "--codebook_start=2", "--kmeans_init=true", "--replace_after=2",
            "--log_interval=1", "--eval_interval=3", f"--out_dir={out}"]
    r = subprocess.run(torchrun_cmd("tests/ddp_step_worker.py", [tmp_path, *args]), cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{i}.json")) for i in (0, 1)]
    h0, h1 = (rk["hashes"] for rk in ranks)
    assert [h["iter"] for h in h0] == list(range(7))  # before the first step, then after each of the 6
    for a, b in zip(h0, h1):
        assert a == b, f"ranks differ after {a['iter']} steps: " + ", ".join(k for k in a if a[k] != b[k])
    codes = [h["codes"] for h in h0]
    assert codes[2] != codes[3] and codes[4] != codes[5]  # the codebooks did train (k-means, replacement, steps)
    counts = [h["counts"] for h in h0]
    assert counts[2] != counts[3] != counts[4]
    logged = {r["iter"]: r for r in records(out) if "loss" in r}
    assert sorted(logged) == list(range(1, 7))
    l0, l1 = (torch.tensor(rk["losses"]) for rk in ranks)  # (6, 3) float32: loss, ce, recon per step
    assert not torch.equal(l0, l1)  # the ranks saw different data
    mean = ((l0 + l1) / 2).tolist()
    for it, rec in logged.items():
        assert [rec["loss"], rec["ce"], rec["recon"]] == mean[it - 1], it
