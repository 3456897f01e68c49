"""bench.py: every part runs and reports what it measures, on shapes and presets shrunk to a fraction of a second
(timings are not asserted: they belong to the README's recorded runs)."""

import json
import os
import subprocess
import sys

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layer_part_times_the_layer_and_its_floor(monkeypatch, capsys):
    monkeypatch.setattr(bench, "SHAPES", [("a", 64, 16, 1, 32, 1), ("b", 64, 16, 4, 32, 2)])
    cfg = bench.BenchConfig(only="layer", repeats=1, mem=False)
    rows = bench.bench_layer(cfg, bench.torch.autocast("cpu", enabled=False))
    assert [r["shape"] for r in rows] == ["a", "b"] and all(r["layer_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert "(b) N=64 d=16=4x4 M=32 k=2" in capsys.readouterr().out


def test_memory_of_one_shape_in_a_subprocess():
    """--mem_shape (what bench_layer runs in a fresh process per shape) prints the peak as JSON. It must run in a
    fresh process, as bench_layer runs it: in a long-lived one, memory freed earlier is reused without growing the
    resident size, and the peak reads as 0."""
    out = subprocess.run([sys.executable, "bench.py", "--mem_shape=a"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    name, N, dim, G, M, k = bench.SHAPES[0]
    peak = json.loads(out.stdout)["peak"]
    assert N * dim * 4 < peak < 4 * N * M * 4  # at least the activations' gradient, at most a few score matrices


def test_step_generate_and_profile_parts(monkeypatch, capsys):
    small = dict(n_layer=1, n_embd=32, n_head=2, block_size=16, num_codes=64, batch_size=2)
    monkeypatch.setattr(bench, "load_preset", lambda path: {**small, "vocab_size": 64 if "tinystories" in path else 11})
    bench.main(["--only=step,generate,profile", "--repeats=1", "--mem=false"])
    out = capsys.readouterr().out
    assert out.count("tok/s") == 6 and "tokens/s" in out and "aten::" in out
