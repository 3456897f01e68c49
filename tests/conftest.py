"""Shared test setup: the repo root is importable (`import fsm, codebook, model, configuration`) and every test
starts from torch.manual_seed(0); helpers that write tiny token datasets and tokenizers on the spot, so that the
tests need nothing beside the repository (only those whose point is the real files in ../shared/data skip
without them). CPU only."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (trainings, subprocesses, the notebook, "
                            "DDP, the browser); `pytest -m \"not slow\"` is the fast tier")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def write_bpe(path, text, vocab_size=384):
    """A byte-level BPE tokenizer.json trained on `text` with the `tokenizers` library, laid out as Pythia's
    (<|endoftext|> = id 0, every byte a token, so any text encodes): tokens.load_codec("neox", path) loads it.
    Deterministic; at most vocab_size tokens. Returns path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from plumbing.tokens import EOT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    tok.save(str(path))
    return path


def write_tiktoken(path):
    """A valid tiktoken-format BPE file (base64 token, space, rank per line) that is not r50k_base: the 256
    single bytes, ranks 0..255. Returns path."""
    import base64

    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    return path


def write_lm_dataset(directory, text, vocab_size=384):
    """A tiny token dataset as data/prepare.py writes it (train.bin = val.bin = `text` + eot, meta.json, the
    tokenizer file), with a BPE trained on `text` (write_bpe), loaded through the tokenizer.json ("neox") path.
    Needs nothing outside the repository. Returns the directory."""
    import json

    import numpy as np

    from plumbing.tokens import load_codec

    os.makedirs(directory, exist_ok=True)
    codec = load_codec("neox", write_bpe(os.path.join(directory, "tokenizer.json"), text, vocab_size))
    ids = np.array(codec.encode([text])[0] + [codec.eot], dtype=np.uint16)
    for split in ("train", "val"):
        ids.tofile(os.path.join(directory, f"{split}.bin"))
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump({"tokenizer": "neox", "tokenizer_file": "tokenizer.json", "vocab_size": codec.vocab_size,
                   "eot_token": codec.eot}, f)
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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than ~5 s (deselect with -m 'not slow')")
