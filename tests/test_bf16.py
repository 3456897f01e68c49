"""Codes are chosen in fp32 whatever the autocast. Under bf16 autocast `mm`/`bmm` run in bf16 whatever their inputs'
dtype, and bf16 resolves cosines near 1 only to 2**-8 = 0.0039: where the best and second-best codes are closer than
that, a bf16 choice is another code than fp32's. For the same activations, CodebookLayer.topk_codes under CPU bf16
autocast must return exactly the codes it returns in fp32: on a 10,000-code codebook initialised by cosine k-means
(the paper's size, the gaps far below bf16's resolution), on a trained TokFSM model's activations, and inside the whole
model's forward under autocast (what training, the switch and in-training evaluation run)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from codebook import CodebookLayer
from fsm import TokFSM
from model import load_run

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def both(layer, a, k=None):
    """(codes chosen in fp32, codes chosen under bf16 autocast) for the same activations a (N, G, d)."""
    fp32 = layer.topk_codes(a, k)
    with torch.autocast(**BF16):
        bf16 = layer.topk_codes(a, k)
    return fp32, bf16


def top2_gap(layer, a):
    """(N, G) fp64 cosine of the best code minus that of the second best."""
    codes = F.normalize(layer.codes.detach().double(), dim=-1)  # (G, M, d)
    s = torch.einsum("ngd,gmd->ngm", F.normalize(a.double(), dim=-1), codes)
    top = s.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["one-group", "two-groups"])
def paper_sized(request):
    """A 10,000-code codebook per group, cosine k-means on clustered data (64 directions, 5 % noise), and fresh
    activations from the same clusters: many codes per cluster, so the top-1/top-2 gaps are tiny."""
    G, d = request.param, 16
    gen = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(64, G, d, generator=gen), dim=-1)

    def draw(n):
        return centers[torch.randint(64, (n,), generator=gen)] + 0.05 * torch.randn(n, G, d, generator=gen)
    layer = CodebookLayer(G * d, 10_000, k=1, groups=G, layernorm=False)
    layer.kmeans_iters = 3
    layer.kmeans_init(draw(12_000))
    return layer, draw(2048)


@pytest.mark.parametrize("k", [1, 4])
def test_paper_sized_codebook_chooses_the_fp32_codes_under_bf16(paper_sized, k):
    layer, a = paper_sized
    assert top2_gap(layer, a).median() < 2**-8  # the case bf16 cannot resolve
    fp32, bf16 = both(layer, a, k)
    assert bf16.shape == (2048, layer.groups, k) and torch.equal(fp32, bf16), \
        f"{(fp32 != bf16).any(-1).float().mean():.1%} of (token, group) choices differ"


def test_chunked_scoring_and_banned_codes_agree_under_bf16(paper_sized):
    layer, a = paper_sized
    banned = torch.rand(layer.groups, layer.num_codes, generator=torch.Generator().manual_seed(1)) < 0.1
    layer.chunk_size, layer.banned = 300, banned
    try:
        fp32, bf16 = both(layer, a)
    finally:
        layer.chunk_size, layer.banned = 0, None
    assert torch.equal(fp32, bf16)
    assert not banned.gather(1, fp32[..., 0].T).any()  # (G, N): no banned code chosen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The default TokFSM model (2 layers, d=64, k=1 of 256 codes on every head and MLP) trained briefly by train.py:
    a warm start, cosine k-means at the switch, then codes and network together; and a batch of eval sequences."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    args = ["--max_iters=150", "--codebook_start=100", "--batch_size=32", "--warmup_iters=20", "--eval_interval=150",
            "--log_interval=150", "--eval_seqs=32", "--eval_samples=16", "--device=cpu", "--dtype=float32",
            f"--out_dir={out}"]
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    _, model = load_run(str(out), "cpu")
    x, _ = TokFSM().eval_set(256, model.config.block_size)
    return model, x


def recording(model):
    """Wrap every codebook's topk_codes to keep, per codebook, the activations it was given and what it chose."""
    seen = {}
    for name, cb in model.codebooks():
        def spy(a, k=None, name=name, real=cb.topk_codes):
            seen[name] = (a.detach().clone(), real(a, k))
            return seen[name][1]
        cb.topk_codes = spy
    return seen


@pytest.mark.slow
def test_trained_model_codes_are_the_fp32_codes_under_bf16(trained):
    model, x = trained
    seen = recording(model)
    try:
        with torch.no_grad():
            model(x)  # fp32: the activations every codebook sees
        for name, cb in model.codebooks():
            a, _ = seen[name]
            fp32, bf16 = both(cb, a)
            assert torch.equal(fp32, bf16), f"{name}: {(fp32 != bf16).float().mean():.2%} of choices differ"
        # the whole forward under autocast: each codebook's choice is the fp32 choice for what it was given
        with torch.no_grad(), torch.autocast(**BF16):
            model(x)
        for name, cb in model.codebooks():
            a, chosen = seen[name]
            assert torch.equal(chosen, type(cb).topk_codes(cb, a)), name
            assert torch.equal(cb.last_indices.reshape(chosen.shape), chosen), name
    finally:
        for _, cb in model.codebooks():
            del cb.topk_codes


def test_bench_reports_the_choice_under_autocast(monkeypatch, capsys):
    """bench.py's codes part (which scripts/gpu_check.py runs on a GPU): the layer's choice under bf16 autocast is
    fp32's everywhere; the one bf16 matmul's is not, on k-means codes of clustered activations."""
    import bench

    monkeypatch.setattr(bench, "SHAPES", [("a", 3000, 16, 1, 2000, 1), ("b", 3000, 32, 2, 2000, 3)])
    rows = bench.bench_codes(bench.BenchConfig(only="codes", repeats=1, mem=False), torch.autocast(**BF16))
    assert [r["shape"] for r in rows] == ["a", "b"] and all(r["same"] == 1.0 for r in rows), rows
    assert all(r["matmul_same"] < 1.0 and r["layer_ms"] > 0 and r["matmul_ms"] > 0 for r in rows), rows
    assert "(b) N=3000 d=32=2x16 M=2000 k=3" in capsys.readouterr().out
