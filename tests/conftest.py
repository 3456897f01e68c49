"""Shared test setup: the repo root is importable (`import fsm, codebook, model, utils`) and every test
starts from torch.manual_seed(0). CPU only."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


GPT2_FILE = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "gpt2", "r50k_base.tiktoken")


def write_gpt2_dataset(directory, text):
    """A tiny token dataset as data/prepare.py writes it (train.bin = val.bin = `text` + eot, meta.json,
    the tokenizer file), GPT-2 BPE from ../shared/data. Returns the directory."""
    import json
    import shutil

    import numpy as np

    from utils import load_codec

    codec = load_codec("gpt2", GPT2_FILE)
    ids = np.array(codec.encode([text])[0] + [codec.eot], dtype=np.uint16)
    os.makedirs(directory, exist_ok=True)
    for split in ("train", "val"):
        ids.tofile(os.path.join(directory, f"{split}.bin"))
    shutil.copy(GPT2_FILE, os.path.join(directory, "tokenizer.tiktoken"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"tokenizer": "gpt2", "tokenizer_file": "tokenizer.tiktoken", "vocab_size": 50257,
                   "eot_token": 50256}, f)
    return directory


def write_tokens(d, ids, vocab_size=64, splits=("train", "val")):
    """A data/prepare.py-like directory: train.bin and val.bin (uint16 ids) and meta.json. Returns d."""
    import json

    import numpy as np

    os.makedirs(d)
    for split in splits:
        np.asarray(ids, dtype=np.uint16).tofile(os.path.join(d, f"{split}.bin"))
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"tokenizer": "gpt2", "tokenizer_file": "none", "vocab_size": vocab_size}, f)
    return d


def once(args):
    """args with each --key=value given once, its last value kept: the tests vary a flag of a shared tiny
    configuration by appending it, and the entry points refuse a flag given twice."""
    last = {str(a).split("=")[0]: i for i, a in enumerate(args) if str(a).startswith("--")}
    return [a for i, a in enumerate(args) if not str(a).startswith("--") or last[str(a).split("=")[0]] == i]
