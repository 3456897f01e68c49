"""The paths a default run does not take: bf16 autocast through the switch for every preset's shape, extreme seeds
and many micro-steps, k-means on duplicates, across micro-steps and ranks, a resume that changes the learning rate
or moves the switch, and exact resume on every rank with dropout."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from codebook import CodebookLayer
from conftest import once, write_tokens
from plumbing import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_interval=4",
        "--log_interval=2", "--eval_seqs=16", "--eval_samples=8", "--num_codes=32", "--device=cpu"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def run(args, timeout=180, launcher=()):
    return subprocess.run([sys.executable, *launcher, "train.py", *once(args)], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


PRESETS = sorted(f for f in os.listdir(os.path.join(ROOT, "config")) if f.endswith(".py"))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_shape_trains_through_the_switch_under_bf16(preset, tmp_path):
    """Each preset's shape (sites, k, LayerNorm or not, k-means, positions, residual), made tiny, under bf16
    autocast on the CPU (the GPU's default dtype), through the switch and its k-means."""
    from plumbing.configuration import load_preset

    cfg = load_preset(os.path.join(ROOT, "config", preset))
    extra = []
    if cfg.get("dataset", "fsm") != "fsm":
        extra += [f"--dataset={write_tokens(str(tmp_path / 'tokens'), np.arange(2000) % 64)}", "--vocab_size=64",
                  "--eval_iters=2"]
    if cfg.get("init_from", "scratch") not in ("scratch", "resume"):  # a Pythia directory: its shape, from scratch
        extra += ["--init_from=scratch", "--pos_emb=rotary", "--parallel_residual=true", "--tie_weights=false"]
    k = min(cfg.get("k", 1), 4)
    r = run([f"config/{preset}", *TINY, *extra, f"--k={k}", "--dtype=bfloat16", "--codebook_start=2",
             "--kmeans_init=true", "--max_iters=4", "--warmup_iters=1", "--gradient_accumulation_steps=2",
             f"--out_dir={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    sd = load(tmp_path / "run" / "ckpt.pt")["model"]
    codes = [v for key, v in sd.items() if key.endswith(".codes")]
    assert codes and all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in codes)
    for key, v in sd.items():
        if key.endswith(".counts"):  # 2 steps after the switch, each token and group choosing k codes
            assert (v.sum(-1) == 2 * 8 * 16 * k).all(), key


@pytest.mark.slow
def test_seeds_at_the_extremes_and_many_micro_steps_draw_distinct_batches(tmp_path):
    data = np.arange(10_000, dtype=np.uint16)
    for seed in (0, 2_147_483_647):
        draws = {}
        for it in (0, 1):
            for micro in range(66):  # past 64 micro-steps the old formula repeated the next step's batches
                x, _ = train.get_batch(data, 8, 4, train.data_generator(seed, 0, it, micro))
                draws[(it, micro)] = x.numpy().tobytes()
        assert len(set(draws.values())) == len(draws)
        x, _ = train.get_batch(data, 8, 4, train.data_generator(seed, 1, 0, 0))
        assert x.numpy().tobytes() != draws[(0, 0)]  # another rank, other data
    r = run([*TINY, "--seed=2147483647", "--batch_size=65", "--gradient_accumulation_steps=65", "--max_iters=2",
             "--eval_interval=2", "--codebook_start=1", f"--out_dir={tmp_path / 'run'}"])
    assert r.returncode == 0, r.stderr[-3000:]


def test_kmeans_starts_from_distinct_points():
    """Half the activations are one repeated row (a BOS position): no two codes may start on it, so every code
    can win a token."""
    torch.manual_seed(0)
    a = torch.randn(400, 1, 8)
    a[:200] = a[0]
    cb = CodebookLayer(8, num_codes=64, layernorm=False)
    cb.kmeans_iters = 0
    cb.kmeans_init(a)
    assert len(torch.unique(cb.codes.data[0], dim=0)) == 64
    cb.kmeans_iters = 5
    cb.kmeans_init(a)
    used = torch.unique(cb.topk_codes(a)).numel()
    assert used == 64


def test_kmeans_under_bf16_autocast_is_fp32():
    a = torch.randn(256, 2, 8).to(torch.bfloat16)
    results = []
    for autocast in (True, False):
        torch.manual_seed(0)
        cb = CodebookLayer(16, num_codes=16, groups=2, layernorm=False)
        cb.request_kmeans_init(3)
        cb.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            cb(a.view(256, 16) if autocast else a.float().view(256, 16))
        assert cb.codes.dtype == torch.float32 and cb._last_a.dtype == torch.float32
        results.append(cb.codes.data.clone())
    assert torch.equal(results[0], results[1])


def test_switch_kmeans_reads_every_micro_step(tmp_path, monkeypatch):
    seen = []
    kmeans = CodebookLayer.kmeans_init

    def recording(self, a, max_tokens=None):
        seen.append(a.shape[0])
        return kmeans(self, a, max_tokens)

    monkeypatch.setattr(CodebookLayer, "kmeans_init", recording)
    train.main(once([*TINY, "--codebook_sites=mlp", "--n_layer=1", "--gradient_accumulation_steps=4", "--max_iters=3",
                "--codebook_start=1", "--kmeans_init=true", "--eval_interval=3", f"--out_dir={tmp_path / 'run'}"]))
    assert seen == [8 * 16]  # all 4 micro-batches of 2 sequences x 16 tokens, not the first one only


@pytest.mark.slow
def test_kmeans_gathers_every_rank(tmp_path):
    """Two gloo ranks, each with its own activations: rank 0's codes are k-means of both ranks' rows, equal to
    one process's k-means of the concatenation."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "tests/ddp_kmeans_worker.py", str(tmp_path)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    a0, a1 = (torch.load(tmp_path / f"a{i}.pt") for i in range(2))
    torch.manual_seed(0)
    ref = CodebookLayer(8, num_codes=16, layernorm=False)
    ref.kmeans_iters = 4
    ref.kmeans_init(torch.cat([a0, a1]))
    for i in range(2):
        assert torch.equal(torch.load(tmp_path / f"codes{i}.pt"), ref.codes.data)


@pytest.mark.slow
def test_resume_with_a_new_learning_rate_keeps_the_codes_rate(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--learning_rate=3e-3", "--codebook_lr=1e-2", "--lr_schedule=constant", "--warmup_iters=0"]
    assert run([*args, "--max_iters=4", f"--out_dir={out}"]).returncode == 0
    run_ = train.setup(["--init_from=resume", "--learning_rate=1.5e-3", "--max_iters=6", f"--out_dir={out}"])
    try:
        train.train_step(run_, 4)
        lrs = sorted(g["lr"] for g in run_.optimizer.param_groups)
    finally:
        rundir.close_run(run_)
    assert lrs == pytest.approx([1.5e-3, 1.5e-3, 1e-2])  # the weights at the new rate, the codes at codebook_lr


@pytest.mark.slow
def test_resume_at_the_switch_may_still_move_it(tmp_path):
    out = tmp_path / "run"
    assert run([*TINY, "--codebook_start=4", "--max_iters=4", f"--out_dir={out}"]).returncode == 0
    r = run(["--init_from=resume", "--codebook_start=6", "--max_iters=8", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr  # at iteration 4 the codebooks were still bypassed
    r = run(["--init_from=resume", "--codebook_start=7", "--max_iters=10", f"--out_dir={out}"])
    assert r.returncode == 1 and "has its codebooks on already" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_two_rank_resume_with_dropout_is_exact(tmp_path):
    """Dropout draws from seeds of (seed, rank, iteration, micro-step): every rank resumes its own masks."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    args = [*TINY, "--dropout=0.2", "--codebook_start=2", "--kmeans_init=true"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, n in ((straight, 8), (split, 4)):
        r = run([*args, f"--max_iters={n}", f"--out_dir={out}"], launcher=torchrun)
        assert r.returncode == 0, r.stderr[-3000:]
    r = run(["--init_from=resume", "--max_iters=8", f"--out_dir={split}"], launcher=torchrun)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load(straight / "ckpt.pt")["model"], load(split / "ckpt.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    seeds = {tuple(train.step_seeds(1337, rank, 3, 0)) for rank in (0, 1)}
    assert len(seeds) == 2  # the ranks' masks differ
