"""A check for a machine with a GPU: the paper's TokFSM preset for a few hundred steps in bf16, eager and compiled,
a 1-GPU torchrun run with an exact-resume check, and the codebook layer's benchmark at GPU shapes, then a table of
what it measured. Nothing in this repository has been measured on a GPU yet; this script has not yet been run on
one either (only its CPU path, which tests/test_gpu_check.py runs).

    python scripts/gpu_check.py                              # on a CUDA machine -> out-gpu-check/, table at the end
    python scripts/gpu_check.py --steps=200 --out=/tmp/gpu-check
    python scripts/gpu_check.py --device=cpu --tiny=true --steps=6 --bench=generate   # the CPU path (gloo)

Each step is a subprocess of this repository's own commands, in its own directory under --out (a new or empty
directory, or one this script wrote: anything else is refused before the first run):
1. eager:    python train.py config/fsm.py --device=DEV --dtype=bfloat16 --max_iters=STEPS (bf16 autocast)
2. compiled: the same with --compile=true
3. ddp:      torchrun --standalone --nproc_per_node=1 train.py ... (nccl on CUDA, gloo on CPU), STEPS steps
4. resumed:  the same torchrun run stopped at STEPS/2, then --init_from=resume to STEPS; its checkpoint (weights,
             codebook buffers, optimizer state) is compared bitwise with 3's: "exact" or the largest difference
5. bench:    python bench.py --only=layer,codes --device=DEV --dtype=bfloat16: the layer against its floor, and the
             codes it chooses under bf16 autocast against fp32's (the share that agree, and the time of the fp32
             choice against one bf16 matmul's)
Every training run uses the preset's model and batch (4 layers, d=128, k=1 of 10,000 codes on every head and MLP,
batch 512 x 128 tokens) with a warmup of STEPS/10 and a constant learning rate after it (so that the half run's
learning rates are the full run's), logs every STEPS/5 steps and evaluates at its end (2,048 sequences, valid
transitions sampled from 1,000). Step time and tokens/s are the median over the log windows after the first
(which holds compilation and warm-up). After a few hundred steps the valid-transition accuracy is far below the
paper's 20k-step 63.65 %: it shows that training, evaluation and sampling work on the GPU, not the result.

Expected runtime (an estimate, not a measurement): 4-8 minutes on one recent datacenter GPU at --steps=300, most
of it process start-up, compilation and the five evaluations. The CPU path (--tiny=true, --steps=6,
--bench=generate) took about 40 s of CPU time here, most of it the seven processes starting up. Output: the table on stdout and in --out/table.md; each run's log.jsonl and ckpt.pt stay in --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --tiny=true: a model and batch that run in seconds on a CPU (the test suite's path)
TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--n_inner=64", "--block_size=16", "--num_codes=32",
        "--batch_size=8", "--eval_seqs=16", "--eval_samples=8"]


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every entry point of this repository
        sys.exit(f"error: {message}: see --help")


def parse(argv):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="autocast dtype")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (>= 4)")
    p.add_argument("--out", default="out-gpu-check", help="directory of the runs (created)")
    p.add_argument("--tiny", default="false", choices=("true", "false"), help="tiny model and batch (CPU tests)")
    p.add_argument("--bench", default="layer,codes", help="bench.py parts to run (its --only), or none")
    args = p.parse_args(argv)
    if args.steps < 4:
        sys.exit(f"error: --steps={args.steps}: must be >= 4 (the resume check stops at half of it)")
    if not (args.device == "cpu" or args.device.split(":")[0] == "cuda"):
        sys.exit(f"error: --device={args.device!r}: use cuda, cuda:N or cpu")
    return args


def run(name, cmd, out):
    """Run one command in the repository root; returns its wall seconds. A failure ends this script with its
    command and the tail of its output."""
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(out, f"{name}.txt"), "a", encoding="utf-8") as f:
        f.write(r.stdout + r.stderr)
    if r.returncode != 0:
        print(r.stdout[-2000:] + r.stderr[-3000:], file=sys.stderr)
        sys.exit(f"error: the {name} step failed (exit status {r.returncode}); its output is in {out}/{name}.txt")
    return time.time() - t0, r.stdout


def train_args(args, out_dir, steps):
    """`train.py config/fsm.py ...` for one run of `steps` steps in out_dir."""
    total = args.steps
    return ["config/fsm.py", f"--device={args.device}", f"--dtype={args.dtype}", f"--max_iters={steps}",
            f"--warmup_iters={max(1, total // 10)}", "--lr_schedule=constant", f"--log_interval={max(1, total // 5)}",
            f"--eval_interval={total}", f"--out_dir={out_dir}", "--overwrite=true",
            *(TINY if args.tiny == "true" else [])]


def measured(out_dir, tokens_per_step):
    """(median step ms, median tokens/s, final eval dict) from a run's log.jsonl."""
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8")]
    speeds = [r["tok_per_s"] for r in recs if "tok_per_s" in r]
    speeds = speeds[1:] or speeds  # the first window holds compilation and warm-up
    tok_s = statistics.median(speeds)
    return 1e3 * tokens_per_step / tok_s, tok_s, [r for r in recs if "eval" in r][-1]["eval"]


def compare(a_path, b_path):
    """'exact' if the two checkpoints' model and optimizer states are bitwise equal, else what differs."""
    import torch

    a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in (a_path, b_path))
    if a["iter_num"] != b["iter_num"]:
        return f"no: iterations {a['iter_num']} and {b['iter_num']}"
    pairs = [(f"model.{k}", v, b["model"].get(k)) for k, v in a["model"].items()]
    for i, s in a["optimizer"]["state"].items():
        pairs += [(f"optimizer.{i}.{k}", v, b["optimizer"]["state"][i].get(k)) for k, v in s.items()
                  if torch.is_tensor(v)]
    diff = [(name, (x.double() - y.double()).abs().max().item()) for name, x, y in pairs
            if y is None or x.shape != y.shape or not torch.equal(x, y)]
    if not diff:
        return f"exact ({len(pairs)} tensors bitwise equal)"
    name, worst = max(diff, key=lambda d: d[1])
    return f"no: {len(diff)} of {len(pairs)} tensors differ, the most {name} by {worst:.3g}"


def claim_out(out):
    """Make --out this script's marked directory of runs, after checking, before any run, that it may be (a new or
    empty directory, or one this script wrote) and that each run's directory may be written (rundir.claim)."""
    from plumbing.configuration import ConfigError
    from plumbing.rundir import claim, mark

    try:
        claim(out, "gpu-check", "--out")
        for name in ("eager", "compiled", "ddp", "resumed"):
            claim(os.path.join(out, name), "train", f"--out/{name}")
        os.makedirs(out, exist_ok=True)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: --out={out!r} cannot be created ({e.strerror}): choose a writable place")
    mark(out, "gpu-check")


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, ROOT)
    claim_out(args.out)
    out = os.path.abspath(args.out)
    from plumbing.configuration import load_preset
    from plumbing.files import atomic_write

    preset = load_preset(os.path.join(ROOT, "config", "fsm.py"))
    sizes = {**preset, **dict(a[2:].split("=") for a in TINY)} if args.tiny == "true" else preset
    batch, block = int(sizes["batch_size"]), int(sizes["block_size"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py"]
    S, rows = args.steps, []
    for name, cmd in [("eager", [sys.executable, "train.py"]), ("compiled", [sys.executable, "train.py"]),
                      ("ddp", torchrun)]:
        d = os.path.join(out, name)
        wall, _ = run(name, [*cmd, *train_args(args, d, S), *(["--compile=true"] if name == "compiled" else [])], out)
        rows.append((name, d, wall))
    d = os.path.join(out, "resumed")
    wall, _ = run("resumed", [*torchrun, *train_args(args, d, S // 2)], out)
    more, _ = run("resumed", [*torchrun, "--init_from=resume", f"--max_iters={S}", f"--out_dir={d}"], out)
    rows.append(("resumed", d, wall + more))
    resume = compare(os.path.join(out, "ddp", "ckpt.pt"), os.path.join(d, "ckpt.pt"))

    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    what = {"eager": f"python train.py, {args.dtype} autocast", "compiled": "the same, --compile=true",
            "ddp": f"torchrun, 1 process, {backend}", "resumed": f"torchrun, {S // 2} steps + resume to {S}"}
    lines = ["| run | what | steps | step time | tokens/s | valid-transition | loss | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, d, wall in rows:
        ms, tok_s, m = measured(d, batch * block)
        lines.append(f"| {name} | {what[name]} | {S} | {ms:.1f} ms | {tok_s:,.0f} | {100 * m['valid']:.1f} % | "
                     f"{m['loss']:.3f} | {wall:.0f} s |")
    import torch

    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "no GPU (CPU path)"
    lines += ["", f"Resume exact (ddp against resumed): {resume}.",
              f"Machine: {gpu}, torch {torch.__version__}, batch {batch} x {block} tokens, device {args.device}."]
    if args.bench != "none":
        bench = [sys.executable, "bench.py", f"--only={args.bench}", f"--device={args.device}", f"--dtype={args.dtype}",
                 *(["--repeats=1", "--mem=false"] if args.tiny == "true" else [])]
        _, text = run("bench", bench, out)
        lines += ["", f"`{' '.join(['python', *bench[1:]])}`:", "", "```", text.strip(), "```"]
    table = "\n".join(lines)
    with atomic_write(os.path.join(out, "table.md")) as f:
        f.write(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from plumbing.entry import cli  # an interrupt or a closed pipe: one line, as every entry point

    cli(main)
