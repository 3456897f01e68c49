"""
Sample text from a language model trained by train.py (as nanoGPT's sample.py), codebooks on.

    python sample.py --out_dir=out-tinystories --start="Once upon a time" --num_samples=3
    python sample.py --out_dir=out-tinystories --bypass=true     # the same weights, every codebook bypassed
    python sample.py --out_dir=out-wikitext --start=FILE:prompt.txt --max_new_tokens=100 --temperature=0

The model and its config come from out_dir/ckpt.pt; the tokenizer from meta.json of the dataset it was
trained on (train_config.dataset, or --dataset=DIR), so it works offline. Each prompt is the end-of-text
token followed by --start, as a document starts in the token files.
"""

from plumbing.entry import cli  # first: a Ctrl-C while torch loads is one line (plumbing/__init__)
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from model import load_run
from plumbing.configuration import ConfigError, autocast_for, is_device, parse_config, read_text, spec, validate
from plumbing.memory import check_sampling
from plumbing.progress import forward_progress
from plumbing.tokens import load_tokenizer


@dataclass
class SampleConfig:
    """Sampling. Defaults: 3 samples of 200 tokens at temperature 0.8, top-200."""

    out_dir: str = "out"  # the run whose ckpt.pt is sampled
    dataset: Optional[str] = None  # a data/prepare.py directory for the tokenizer; None = the checkpoint's
    start: str = ""  # the prompt, after <|endoftext|>; "FILE:path" reads it from a UTF-8 file
    num_samples: int = spec(3, ">= 1")
    max_new_tokens: int = spec(200, ">= 1")
    temperature: float = spec(0.8, ">= 0")  # 0 = greedy
    top_k: Optional[int] = spec(200, ">= 1")  # keep the top_k most likely tokens; None = all
    bypass: bool = False  # bypass every codebook: the model without its bottleneck
    seed: int = spec(1337, ">= 0")
    device: str = spec("auto", check=is_device)

    def __post_init__(self):
        validate(self)


def main(argv):
    cfg = parse_config(argv, SampleConfig)
    start = read_text(cfg.start[5:], "prompt file") if cfg.start.startswith("FILE:") else cfg.start
    if cfg.start.startswith("FILE:") and not start.strip():
        raise ConfigError(f"prompt file {cfg.start[5:]} is empty: write the prompt into it, or drop --start to sample "
                          "from the start of a document")
    ckpt, model = load_run(cfg.out_dir, cfg.device)
    data_dir = cfg.dataset or ckpt["train_config"].get("dataset", "fsm")
    if data_dir == "fsm":
        raise ConfigError(f"{cfg.out_dir} was trained on TokFSM, which has no text tokenizer: sample an LM run "
                          "(steer.py --task=generate samples TokFSM runs), or pass --dataset=DIR")
    codec, _ = load_tokenizer(data_dir)
    if codec.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer of {data_dir} has {codec.vocab_size} tokens, the model only "
                          f"{model.config.vocab_size}: pass the --dataset the model was trained on")
    codebooks = [cb for _, cb in model.codebooks()]
    for cb in codebooks:
        cb.bypass = cfg.bypass
    if codebooks and not cfg.bypass and ckpt["iter_num"] <= ckpt["train_config"].get("codebook_start", 0):
        print(f"note: this checkpoint (iteration {ckpt['iter_num']}) is still before codebook_start: its codebooks "
              "are untrained; --bypass=true samples without them", file=sys.stderr)
    device = next(model.parameters()).device
    prompt = [codec.eot] + (codec.encode([start])[0] if start else [])
    check_sampling(cfg, model.config, len(prompt), device)  # sizes that cannot fit stop here
    idx = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long, device=device)  # (num_samples, T)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    with autocast_for(device.type), forward_progress(model, cfg.max_new_tokens + 1, "sampling"):
        out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, generator=gen)
    for row in out.tolist():
        print(codec.decode(row[1:]))  # without the leading end-of-text token
        print("---------------")


if __name__ == "__main__":
    cli(main)
