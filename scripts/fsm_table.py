"""Regenerate the README's TokFSM results table: train its rows one after another and print the Markdown table
(loss, next-token accuracy, valid- and first-transition accuracy, valid-successor mass, dead codes, FVU, CE loss
recovered, wall time) and the machine it ran on.

    python scripts/fsm_table.py                         # every row, ~26 minutes on 2 CPU cores
    python scripts/fsm_table.py --rows=quick,k1         # some rows
    python scripts/fsm_table.py --out=out-table --threads=2

Each row is `python train.py <arguments> --out_dir=<out>/<row>`, timed as a whole process (evaluations included):
the quick row is the default recipe (no arguments), the others start from config/laptop.py, the slower 98 % recipe.
A row whose directory already holds its finished run (every setting the row's, iterations included) is read from its
log instead of trained again (its wall time is then the one recorded in the log, marked *); delete the directory to
train it again. A row directory that holds
anything else (a run of another configuration, a user's files) is refused, before any row is trained. The runs stay
in --out for analyze.py, steer.py and sae.py (sae.py reads the no-codebook row).
"""

import ast
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing.entry import cli  # noqa: E402  (first: a Ctrl-C while torch loads is one line)
from model import GPTConfig  # noqa: E402
from plumbing.configuration import (ConfigError, is_out_dir, load_preset, parse_config, spec, split_list,  # noqa: E402
                                    validate)
from plumbing.progress import progress  # noqa: E402
from plumbing.rundir import claim, dir_problem, load_checkpoint, mark  # noqa: E402

ROWS = {  # name: (label, arguments of `python train.py`); the laptop rows use config/laptop.py, quick is the default
    "nocb": ("no codebooks (laptop)", ["config/laptop.py", "--codebook_sites="]),
    "k1": ("**k=1 laptop**, every head + every MLP", ["config/laptop.py"]),
    "quick": ("k=1 quick (**the default**)", []),
    "k4": ("k=4 laptop, every head + every MLP", ["config/laptop.py", "--k=4"]),
}


def machine(threads):
    """A line naming the CPU, cores, torch and threads."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s)"


def last_eval(out):
    """The final evaluation of the finished run in out (its checkpoint at max_iters), or None."""
    try:
        ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
        evals = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"eval"' in line]
    except (ConfigError, OSError, ValueError):
        return None
    done = ckpt["iter_num"] == ckpt["train_config"]["max_iters"] and evals and evals[-1]["iter"] == ckpt["iter_num"]
    return evals[-1] if done else None


def train_defaults():
    """{field: default} of train.py's TrainConfig, read from its source with ast (no entry point imports train.py):
    `name: type = value` or `name: type = spec(value, ...)`."""
    with open(os.path.join(ROOT, "train.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    out = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            v = node.value
            out[node.target.id] = ast.literal_eval(v.args[0] if isinstance(v, ast.Call) else v)
    return out


def row_config(args):
    """Every setting of the row `python train.py *args`: TrainConfig's and GPTConfig's defaults, then its preset's
    and flags' values; the model's settings first."""
    want = {**{f.name: f.default for f in fields(GPTConfig)}, **train_defaults()}
    for a in args:
        if a.startswith("--"):
            key, value = a[2:].split("=", 1)
            try:
                want[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):  # a plain string, e.g. --codebook_sites=
                want[key] = value
        else:
            want.update(load_preset(os.path.join(ROOT, a)))
    return want


def row_problem(args, path):
    """None if the directory `path` may hold the row `python train.py *args`: it is new or empty, or holds a run
    whose checkpoint has every setting of the row (`row_config`, max_iters included: a shorter run of the same
    model is not the row; where it runs and where it is written may differ); else the problem, in words."""
    problem = dir_problem(path, "train")
    if problem or not os.path.isfile(os.path.join(path, "ckpt.pt")):
        return problem
    try:
        ckpt = load_checkpoint(os.path.join(path, "ckpt.pt"))
    except ConfigError:
        return None  # a torn checkpoint: the row is trained again
    have = {**ckpt["train_config"], **ckpt["model_config"]}
    differ = [f"{k}={have[k]!r}, not {v!r}" for k, v in row_config(args).items()
              if k not in ("out_dir", "init_from", "overwrite", "device", "compile") and k in have and have[k] != v]
    return f"holds a run of another configuration ({'; '.join(differ[:3])}): delete it to train the row again, " \
        "or choose another --out" if differ else None


def run_row(name, args, out, threads):
    """Train one row (unless its directory holds the finished run); returns (final eval, wall seconds, reused)."""
    path = os.path.join(out, name)
    last = last_eval(path)
    if last is not None:
        return last["eval"], last["elapsed_s"], True
    cmd = [sys.executable, "train.py", *args, f"--out_dir={path}", "--overwrite=true"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode != 0:
        sys.exit(f"error: the row {name!r} failed (exit status {r.returncode}); see its output above")
    return last_eval(path)["eval"], time.time() - t0, False


def table(results, threads):
    head = ("| model | arguments | loss | next-token acc | valid-transition | first-transition | valid-successor mass "
            "| dead codes | FVU | loss recovered | wall time |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, (m, wall, reused) in results.items():
        label, args = ROWS[name]
        codes = [f"{m[key]:{fmt}}" if name != "nocb" and key in m else "–"
                 for key, fmt in (("dead_pct", ".1f"), ("fvu", ".3f"), ("recovered", ".3f"))]
        codes[0] += " %" if codes[0] != "–" else ""
        overrides = " ".join(f"`{a}`" for a in args) or "none"
        lines.append(f"| {label} | {overrides} | {m['loss']:.3f} | {100 * m['acc']:.2f} % | {100 * m['valid']:.1f} % | "
                     f"{100 * m['first']:.1f} % | {m['valid_mass']:.3f} | {codes[0]} | {codes[1]} | {codes[2]} | "
                     f"{wall / 60:.1f} min{'*' if reused else ''} |")
    return "\n".join(lines) + f"\n\nMachine: {machine(threads)}."


@dataclass
class TableConfig:
    """The rows of the table and where their runs go."""

    rows: str = spec(",".join(ROWS), each=tuple(ROWS))  # the rows to train (or read), comma-separated
    out: str = spec("out-table", check=is_out_dir)  # directory of the runs, one subdirectory per row
    threads: int = spec(2, ">= 1")  # OMP_NUM_THREADS of each training process

    def __post_init__(self):
        validate(self)
        claim(self.out, "fsm-table", "out")  # no other kind, no user's folder


def main(argv):
    cfg = parse_config(argv, TableConfig)
    rows = split_list(cfg.rows)
    for name in rows:  # every row directory is checked before the first is trained
        problem = row_problem(ROWS[name][1], os.path.join(cfg.out, name))
        if problem:
            raise ConfigError(f"the row {name} ({os.path.join(cfg.out, name)}) {problem}")
    os.makedirs(cfg.out, exist_ok=True)
    mark(cfg.out, "fsm-table")
    results = {name: run_row(name, ROWS[name][1], cfg.out, cfg.threads) for name in progress(rows, desc="rows")}
    print(table(results, cfg.threads))


if __name__ == "__main__":
    cli(main)
