"""
Benchmarks for the codebook layer, a full training step and generation (nanoGPT has a bench.py too).

    python bench.py                        # everything, fp32 on CPU
    python bench.py --only=layer           # the codebook layer against its floor
    python bench.py --only=step,generate --device=cuda --dtype=bfloat16
    python bench.py --only=profile         # top ops of one laptop FSM training step (torch.profiler)
    python bench.py --only=codes --dtype=bfloat16   # codes chosen under bf16 autocast against fp32's

1. The codebook layer alone, forward + backward, on the paper's sizes, against its floor: the one
   matmul no implementation can avoid, the cosine scores normalize(a) @ normalize(C).T, forward only.
   Both are timed alternately in one process (median of `repeats`), so the ratio holds when the
   machine's speed drifts. Peak memory is measured in a fresh subprocess per shape (CPU: peak RSS above
   the inputs; CUDA: max_memory_allocated above the inputs) and compared with N x num_codes x 4 bytes,
   what a layer that holds the whole score matrix needs.
2. A full training step (tokens/s) of the laptop FSM preset (config/laptop.py), the paper's `fsm` preset and
   (if present) the `tinystories` preset, with and without codebooks.
3. Generation tokens/s of the laptop FSM model with codebooks (key/value cache, batch 256).
4. (--only=profile) torch.profiler's top ops of a laptop FSM training step with codebooks on.
5. (--only=codes) the choice of codes under the autocast: per shape, on codes fitted by cosine k-means to clustered
   activations (their top-2 gaps are tiny, as a trained codebook's), the layer's top-k (fp32 whatever the autocast)
   against top-k of the same cosines computed by a matmul under the autocast (in bf16 with --dtype=bfloat16): the
   time of each (alternated, median) and the share of (token, group) choices (the ordered top-k) equal to fp32's
   without autocast.
"""

from plumbing.entry import cli  # first: a Ctrl-C while torch loads is one line (plumbing/__init__)
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codebook import CodebookLayer
from fsm import TokFSM
from model import GPT, GPTConfig
from plumbing.configuration import is_device, load_preset, parse_config, spec, split_config, validate
from plumbing.memory import peak

# (name, N tokens, dim, groups, num_codes, k): the shapes of the performance goals
SHAPES = [
    ("a", 8192, 128, 1, 10_000, 1),
    ("b", 8192, 128, 4, 10_000, 1),
    ("c", 2048, 1024, 1, 10_000, 8),
    ("d", 2048, 1024, 1, 10_000, 64),
]


@dataclass
class BenchConfig:
    """Benchmarks. Defaults: every part but the profile, fp32 on the CPU."""

    only: str = spec("layer,step,generate", each=("layer", "step", "generate", "profile", "codes"))  # parts to run
    device: str = spec("cpu", check=is_device)
    dtype: str = spec("float32", ("float32", "bfloat16"))  # bfloat16: autocast
    repeats: int = spec(5, "[1, 1000]")  # timed repeats per measurement (after one warm-up)
    mem: bool = True  # measure peak memory per shape (one subprocess each)
    compile: bool = False  # torch.compile the layer / model
    mem_shape: str = spec("", ("", *(s[0] for s in SHAPES)))  # internal: one shape's memory, printed as JSON

    def __post_init__(self):
        validate(self)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device, repeats):
    """Median wall seconds of fn() over `repeats` calls, after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_layer(shape, device, compile_):
    _, N, dim, G, M, k = shape
    layer = CodebookLayer(dim, M, k, groups=G).to(device)
    x = torch.randn(N, dim, device=device, requires_grad=True)
    g = torch.randn(N, dim, device=device)  # upstream gradient
    fwd = torch.compile(layer) if compile_ else layer

    def step():
        out = fwd(x)
        loss = (out * g).sum() + layer.recon_loss
        loss.backward()
        x.grad = layer.codes.grad = None
    return layer, x, step


def floor_fn(layer, x):
    """The unavoidable matmul: cosine scores of every token against every code, forward only."""
    G, d = layer.groups, layer.dim // layer.groups
    a = x.detach().view(-1, G, d).transpose(0, 1)  # (G, N, d)

    @torch.no_grad()
    def fn():
        return torch.bmm(F.normalize(a, dim=-1), F.normalize(layer.codes, dim=-1).transpose(1, 2))  # (G, N, M)
    return fn


def layer_memory(shape, device, compile_):
    """Peak bytes above the inputs for one forward + backward (run in a fresh process): memory.peak, on CPU the
    peak resident set size (Linux VmHWM) above the resident size before."""
    layer, x, step = make_layer(shape, device, compile_)
    return peak(step, device)[1]


def bench_layer(cfg, autocast):
    print(f"\n1. codebook layer, forward + backward ({cfg.dtype}, {cfg.device}); floor = cosine-score matmul, forward only")
    print(f"{'shape':<34} {'layer ms':>9} {'floor ms':>9} {'ratio':>6} {'peak MB':>8} {'N*M*4 MB':>9}")
    rows = []
    for shape in SHAPES:
        name, N, dim, G, M, k = shape
        layer, x, step = make_layer(shape, cfg.device, cfg.compile)
        floor = floor_fn(layer, x)
        with autocast:
            t_layer, t_floor = [], []
            for _ in range(cfg.repeats):  # alternate, so drift hits both alike
                t_layer.append(timeit(step, cfg.device, 1))
                t_floor.append(timeit(floor, cfg.device, 1))
        tl, tf = statistics.median(t_layer), statistics.median(t_floor)
        peak = float("nan")
        if cfg.mem:
            out = subprocess.run([sys.executable, __file__, f"--mem_shape={name}", f"--device={cfg.device}",
                                  f"--compile={cfg.compile}"], capture_output=True, text=True, check=True)
            peak = json.loads(out.stdout)["peak"]
        desc = f"({name}) N={N} d={dim}" + (f"={G}x{dim // G}" if G > 1 else "") + f" M={M} k={k}"
        print(f"{desc:<34} {tl * 1e3:9.1f} {tf * 1e3:9.1f} {tl / tf:6.2f} {peak / 2**20:8.0f} {N * M * 4 / 2**20:9.0f}")
        rows.append(dict(shape=name, layer_ms=tl * 1e3, floor_ms=tf * 1e3, ratio=tl / tf, peak_mb=peak / 2**20))
    return rows


def bench_step(cfg, autocast):
    print(f"\n2. full training step, tokens/s ({cfg.dtype}, {cfg.device})")
    here = os.path.dirname(os.path.abspath(__file__))
    presets = [("laptop FSM", load_preset(os.path.join(here, "config", "laptop.py"))),
               ("fsm (paper)", load_preset(os.path.join(here, "config", "fsm.py"))),
               ("tinystories", load_preset(os.path.join(here, "config", "tinystories.py")))]
    for label, preset in presets:
        (mcfg,) = split_config(preset, GPTConfig)
        batch = preset.get("batch_size", 128)  # train.py's default batch
        if cfg.device == "cpu":
            batch = min(batch, 128 if "tinystories" not in label else 4)  # keep CPU runs short
        for sites in (mcfg.get("codebook_sites", GPTConfig.codebook_sites), ""):
            gcfg = GPTConfig(**{**mcfg, "codebook_sites": sites})
            model = GPT(gcfg).to(cfg.device)
            opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
            x = torch.randint(0, min(gcfg.vocab_size, 11) if "tinystories" not in label else gcfg.vocab_size,
                              (batch, gcfg.block_size + 1), device=cfg.device)
            fwd = torch.compile(model) if cfg.compile else model

            def step():
                with autocast:
                    _, loss, _ = fwd(x[:, :-1], x[:, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            t = timeit(step, cfg.device, cfg.repeats)
            what = f"codebooks {sites}, M={gcfg.num_codes}, k={gcfg.k}" if sites else "no codebooks"
            print(f"{label:<22} batch {batch:>4} x {gcfg.block_size:<4} {what:<46} {batch * gcfg.block_size / t:>10,.0f} tok/s")


def laptop_model():
    """The model of config/laptop.py (the 98 % TokFSM recipe), which the README's tables measure."""
    preset = load_preset(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "laptop.py"))
    return GPTConfig(**split_config(preset, GPTConfig)[0])


def bench_generate(cfg, autocast):
    print(f"\n3. generation with codebooks, laptop FSM model ({cfg.dtype}, {cfg.device})")
    model = GPT(laptop_model()).to(cfg.device).eval()
    bos = torch.full((256, 1), 10, dtype=torch.long, device=cfg.device)
    n = model.config.block_size - 1

    def gen():
        with autocast:
            model.generate(bos, n)
    t = timeit(gen, cfg.device, cfg.repeats)
    print(f"batch 256, {n} new tokens each, codebooks {model.config.codebook_sites} M={model.config.num_codes}: "
          f"{256 * n / t:,.0f} tokens/s")


def bench_profile(cfg, autocast):
    """torch.profiler's top ops (self time) of a few laptop FSM training steps with codebooks on."""
    from torch.profiler import ProfilerActivity, profile

    print(f"\n4. where a laptop FSM training step's time goes ({cfg.dtype}, {cfg.device}), top ops by self time")
    model = GPT(laptop_model()).to(cfg.device)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))
    x, y = TokFSM().batch(128, model.config.block_size, torch.Generator().manual_seed(0))
    x, y = x.to(cfg.device), y.to(cfg.device)

    def step():
        with autocast:
            _, loss, _ = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(cfg.repeats):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"  {e.key:<48} {100 * e.self_cpu_time_total / total:5.1f}%")


def bench_codes(cfg, autocast):
    """Part 5 (module docstring). Returns one dict per shape."""
    print(f"\n5. choosing codes under the autocast ({cfg.dtype}, {cfg.device}), k-means codes on clustered "
          "activations; 'same' = share of choices equal to fp32's without autocast")
    print(f"{'shape':<34} {'layer ms':>9} {'same':>8} {'matmul ms':>10} {'same':>8}")
    rows = []
    for name, N, dim, G, M, k in SHAPES:
        gen = torch.Generator().manual_seed(0)
        centers = F.normalize(torch.randn(64, G, dim // G, generator=gen), dim=-1)
        a = (centers[torch.randint(64, (N,), generator=gen)] + 0.05 * torch.randn(N, G, dim // G, generator=gen))
        layer = CodebookLayer(dim, M, k, groups=G, layernorm=False).to(cfg.device)
        a = a.to(cfg.device)  # (N, G, d)
        layer.kmeans_iters = 3
        layer.kmeans_init(a)
        want = layer.topk_codes(a)  # (N, G, k) fp32, no autocast

        def by_matmul():  # the same cosines by one matmul under the autocast, then top-k
            c = F.normalize(layer.codes.detach(), dim=-1)  # (G, M, d)
            scores = torch.bmm(F.normalize(a, dim=-1).transpose(0, 1), c.transpose(1, 2))  # (G, N, M)
            return scores.topk(k, -1).indices.transpose(0, 1)  # (N, G, k)
        with torch.no_grad(), autocast:
            t_layer, t_mm = [], []
            for _ in range(cfg.repeats):  # alternate, so drift hits both alike
                t_layer.append(timeit(lambda: layer.topk_codes(a), cfg.device, 1))
                t_mm.append(timeit(by_matmul, cfg.device, 1))
            same_layer = (layer.topk_codes(a) == want).all(-1).float().mean().item()
            same_mm = (by_matmul() == want).all(-1).float().mean().item()
        tl, tm = statistics.median(t_layer), statistics.median(t_mm)
        desc = f"({name}) N={N} d={dim}" + (f"={G}x{dim // G}" if G > 1 else "") + f" M={M} k={k}"
        print(f"{desc:<34} {tl * 1e3:9.1f} {100 * same_layer:7.2f}% {tm * 1e3:10.1f} {100 * same_mm:7.2f}%")
        rows.append(dict(shape=name, layer_ms=tl * 1e3, same=same_layer, matmul_ms=tm * 1e3, matmul_same=same_mm))
    return rows


def main(argv):
    cfg = parse_config(argv, BenchConfig)
    if cfg.mem_shape:
        shape = next(s for s in SHAPES if s[0] == cfg.mem_shape)
        print(json.dumps({"peak": layer_memory(shape, cfg.device, cfg.compile)}))
        return
    torch.manual_seed(0)
    autocast = torch.autocast(device_type=cfg.device.split(":")[0], dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bfloat16")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {cfg.device}")
    parts = cfg.only.split(",")
    if "layer" in parts:
        bench_layer(cfg, autocast)
    if "step" in parts:
        bench_step(cfg, autocast)
    if "generate" in parts:
        bench_generate(cfg, autocast)
    if "profile" in parts:
        bench_profile(cfg, autocast)
    if "codes" in parts:
        bench_codes(cfg, autocast)


if __name__ == "__main__":
    cli(main)
