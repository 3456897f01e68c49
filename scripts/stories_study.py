"""The story-language study: when does codebook steering work on text? Train the rows below (config/stories.py with one
change each), find their codes against the truth (analyze.py) and steer every topic and mood (topics.py), then print
the Markdown table of RESULTS.md ("The story language").

    python data/prepare.py stories                     # once
    python scripts/stories_study.py                    # every row (~10 minutes a row on 2 loaded CPU cores)
    python scripts/stories_study.py --rows=preset,c256 # some rows

A row is `python train.py config/stories.py <arguments>` (out_dir: the preset's own out-stories for the preset row,
<out>/<row> for the others), then `python analyze.py` and `python topics.py` on it. A step whose outputs are there and
newer than the checkpoint is read back, not run again; delete a row's directory to train it again.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from plumbing.configuration import (ConfigError, is_out_dir, load_preset, parse_config, spec, split_list,  # noqa: E402
                                    validate)
from plumbing.entry import cli  # noqa: E402

ROWS = {  # name: (what changes, arguments of `python train.py config/stories.py`)
    "preset": ("64 codes per head, k=1 (the preset)", []),
    "c16": ("16 codes per head", ["--num_codes=16"]),
    "c256": ("256 codes per head", ["--num_codes=256"]),
    "c1024k8": ("1,024 codes per head, k=8 (TinyStories' shape)", ["--num_codes=1024", "--k=8"]),
    "k4": ("64 codes per head, k=4", ["--k=4"]),
    "mlp": ("the MLP output, 64 codes, k=1", ["--codebook_sites=mlp"]),
    "2layers": ("2 layers, every head", ["--n_layer=2"]),
    "heads8": ("8 heads of 16", ["--n_head=8"]),
}


@dataclass
class StudyConfig:
    """The rows to run and where."""

    rows: str = spec(",".join(ROWS), check=lambda s: next((f"has no row {r!r}: use {', '.join(ROWS)}"
                                                           for r in split_list(s) if r not in ROWS), None))
    out: str = spec("out-stories-study", check=is_out_dir)  # rows other than the preset go to out/<row>
    threads: int = spec(1, ">= 1")  # OMP_NUM_THREADS of each step

    def __post_init__(self):
        validate(self)


def step(cmd, outputs, ckpt, threads):
    """Run `python *cmd` in the repository unless every output exists and is newer than ckpt; returns seconds."""
    if ckpt and all(os.path.exists(o) and os.path.getmtime(o) >= os.path.getmtime(ckpt) for o in outputs):
        return 0.0
    print("$ python " + " ".join(cmd), flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, *cmd], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode != 0:
        raise ConfigError(f"`python {' '.join(cmd)}` failed (exit status {r.returncode}); see its output above")
    return time.time() - t0


def run_row(name, cfg):
    """Train, analyze and steer one row; returns its numbers (dict)."""
    path = os.path.join(ROOT, "out-stories") if name == "preset" else os.path.join(cfg.out, name)
    ckpt, log = os.path.join(path, "ckpt.pt"), os.path.join(path, "log.jsonl")
    evals = [json.loads(line) for line in open(log) if '"eval"' in line] if os.path.exists(log) else []
    done = evals and evals[-1]["iter"] == load_preset(os.path.join(ROOT, "config", "stories.py"))["max_iters"]
    args = ["train.py", "config/stories.py", *ROWS[name][1], f"--out_dir={path}"]
    t_train = step(args + ["--overwrite=true"], [ckpt], ckpt if done else None, cfg.threads)
    t_find = step(["analyze.py", f"--out_dir={path}"], [os.path.join(path, "analysis", "stories.json")], ckpt,
                  cfg.threads)
    t_steer = step(["topics.py", f"--out_dir={path}"], [os.path.join(path, "topics", "steering.json")], ckpt,
                   cfg.threads)
    if any(a.startswith("--k=") for a in ROWS[name][1]):  # Table 3's "all codes": the forced code alone in its book
        t_steer += step(["topics.py", f"--out_dir={path}", "--mode=all", f"--save_dir={path}/topics-all"],
                        [os.path.join(path, "topics-all", "steering.json")], ckpt, cfg.threads)
    evals = [json.loads(line) for line in open(log) if '"eval"' in line]
    summary = json.load(open(os.path.join(path, "analysis", "stories.json")))
    res = json.load(open(os.path.join(path, "topics", "steering.json")))["results"]
    row = {"loss": evals[-1]["eval"]["loss"], "loss_in_context": summary["loss_in_context"],
           "minutes": (t_train + t_find + t_steer) / 60 if t_train else None}
    alls = os.path.join(path, "topics-all", "steering.json")
    res_all = json.load(open(alls))["results"] if os.path.exists(alls) else None
    for latent in ("topic", "mood"):
        s, r = summary[latent], [x for n, x in res.items() if n.startswith(latent)]
        row[latent] = {"owned": s["owned"], "of": s["of"], "P": s["mean_P_next"], "R": s["mean_R_next"],
                       "neuron_P": sum(x["neuron"]["P_next"] for x in s["values"]) / len(s["values"]),
                       "base": sum(x["truth"][0] for x in r) / len(r), "truth": sum(x["truth"][1] for x in r) / len(r),
                       "regex": sum(x["regex"][1] for x in r) / len(r),
                       "kept": sum(x["other_kept"] for x in r) / len(r)}
        if res_all:
            r = [x for n, x in res_all.items() if n.startswith(latent + " ")]
            row[latent]["all"] = sum(x["truth"][1] for x in r) / len(r)
    return row


def table(rows):
    lines = ["| row | loss (in context) | topics owning a code | topic code P / R (neuron P) | topic steered: truth "
             "(regex; all codes) | moods owning | mood code P / R (neuron P) | mood steered: truth (regex; all codes) | "
             "other latent kept |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t, m = r["topic"], r["mood"]
        alls = [f"; {100 * x['all']:.0f} %" if "all" in x else "" for x in (t, m)]
        lines.append(f"| {ROWS[name][0]} | {r['loss']:.3f} ({r['loss_in_context']:.3f}) | {t['owned']} / {t['of']} | "
                     f"{t['P']:.2f} / {t['R']:.2f} ({t['neuron_P']:.2f}) | {100 * t['truth']:.0f} % "
                     f"({100 * t['regex']:.0f} %{alls[0]}) | {m['owned']} / {m['of']} | {m['P']:.2f} / {m['R']:.2f} "
                     f"({m['neuron_P']:.2f}) | {100 * m['truth']:.0f} % ({100 * m['regex']:.0f} %{alls[1]}) | "
                     f"{100 * t['kept']:.0f} % / {100 * m['kept']:.0f} % |")
    return "\n".join(lines)


def main(argv):
    cfg = parse_config(argv, StudyConfig)
    rows = {name: run_row(name, cfg) for name in split_list(cfg.rows)}
    print(table(rows))
    print("baselines (no forcing): topic " + ", ".join(f"{100 * r['topic']['base']:.1f} %" for r in rows.values())
          + "; mood " + ", ".join(f"{100 * r['mood']['base']:.1f} %" for r in rows.values()))


if __name__ == "__main__":
    cli(main)
