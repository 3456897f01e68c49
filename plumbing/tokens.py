"""
Tokens (plumbing for the language-model paths): token files written by data/prepare.py (`load_tokens`, windows
and evaluation batches over them) and the two tokenizers behind one `Codec` face (GPT-2's BPE through tiktoken,
GPT-NeoX's through tokenizers).
"""

import functools
import os
from collections import namedtuple

import numpy as np
import torch

from plumbing.configuration import ConfigError
from plumbing.entry import require
from plumbing.files import read_json


def load_tokens(data_dir, block_size, vocab_size):
    """(train, val): data_dir/{train,val}.bin as 1-D uint16 np.memmaps, checked against their meta.json and the model.

    Raises ConfigError for a missing directory or file, a torn meta.json or one whose vocab_size is not a positive
    integer, a tokenizer larger than vocab_size, a file of an odd number of bytes (torn, or not uint16 tokens) or
    shorter than block_size + 1 tokens, or a token id beyond the tokenizer's vocabulary."""
    if not os.path.isdir(data_dir):
        raise ConfigError(f"dataset={data_dir!r} is not a directory: run data/prepare.py to create it, "
                          "or use dataset=fsm")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{meta_path} is missing: run data/prepare.py to prepare {data_dir}")
    n_vocab = read_json(meta_path, "dataset metadata", "re-run data/prepare.py").get("vocab_size")
    if not isinstance(n_vocab, int) or isinstance(n_vocab, bool) or n_vocab < 1:
        raise ConfigError(f"{meta_path}: vocab_size is {n_vocab!r}, not a positive integer (not written by "
                          "data/prepare.py?): re-run data/prepare.py")
    if n_vocab > vocab_size:
        raise ConfigError(f"{meta_path}: the tokenizer has {n_vocab} tokens but vocab_size={vocab_size}: "
                          f"raise vocab_size (e.g. --vocab_size={-(-n_vocab // 64) * 64})")
    splits = []
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is missing: run data/prepare.py to prepare {data_dir}")
        size = os.path.getsize(path)
        if size % 2:
            raise ConfigError(f"{path} holds {size} bytes, an odd number, so not uint16 tokens (2 bytes each): it is "
                              "torn or another kind of file: re-run data/prepare.py")
        n = size // 2
        if n < block_size + 1:
            raise ConfigError(f"{path} has {n} tokens, but block_size={block_size} needs at least {block_size + 1}: "
                              "lower block_size or prepare more text")
        data = np.memmap(path, dtype=np.uint16, mode="r")
        top = int(data.max())
        if top >= n_vocab:  # and so below vocab_size, which is >= n_vocab
            raise ConfigError(f"{path} holds token id {top}, beyond the {n_vocab} tokens of its tokenizer "
                              f"({meta_path}): the two are not of one dataset: re-run data/prepare.py")
        splits.append(data)
    return splits


def token_windows(data, ix, block_size):
    """Windows of block_size + 1 tokens at offsets ix (B,) of a 1-D token array: x, y (B, block_size) int64,
    y = x shifted by one. One vectorised read, no loop over rows."""
    w = data[ix.numpy()[:, None] + np.arange(block_size + 1)]  # (B, block_size + 1) uint16
    w = torch.from_numpy(w.astype(np.int64))
    return w[:, :-1], w[:, 1:]


def lm_batches(val, block_size, max_tokens, batch_size):
    """Consecutive, non-overlapping windows of the token array val, up to max_tokens tokens, as a list of
    (x, y) batches (batch_size, block_size)."""
    n = min((len(val) - 1) // block_size, max(1, max_tokens // block_size))
    ix = torch.arange(n) * block_size
    return [token_windows(val, ix[s : s + batch_size], block_size) for s in range(0, n, batch_size)]


# ---------------------------------------------------------------------------------------------- tokenizers
EOT = "<|endoftext|>"
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's r50k_base hash
Codec = namedtuple("Codec", "name encode decode eot vocab_size")
Codec.__doc__ = """One face for both tokenizers: encode(list[str]) -> list[list[int]] (text only, no special
tokens, so a literal "<|endoftext|>" in the text is just text), decode(list[int]) -> str, the end-of-text id,
and vocab_size (every id is below it)."""


def gpt2_tokenizer(path=None):
    """GPT-2 BPE (r50k_base) as a tiktoken.Encoding, from a local r50k_base.tiktoken (its sha256 must be
    tiktoken's; ValueError otherwise), or with path None from tiktoken's own download cache."""
    tiktoken = require("tiktoken", "the GPT-2 tokenizer (TinyStories)")
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    if path is None:
        return tiktoken.get_encoding("r50k_base")
    ranks = load_tiktoken_bpe(path, expected_hash=GPT2_SHA256)
    return tiktoken.Encoding("r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256})


def neox_tokenizer(path):
    """Pythia's GPT-NeoX-20B BPE from a tokenizer.json, as a tokenizers.Tokenizer (50,277 tokens, eot = 0)."""
    Tokenizer = require("tokenizers", "the GPT-NeoX tokenizer (WikiText, Pythia)").Tokenizer
    tok = Tokenizer.from_file(path)
    tok.encode_special_tokens = True  # "<|endoftext|>" in the text is text, as tiktoken's encode_ordinary
    return tok


def load_codec(name, path):
    """Codec for name "gpt2" (path: a .tiktoken file) or "neox" (path: a tokenizer.json); ConfigError if the
    file cannot be loaded as that tokenizer."""
    try:
        if name == "gpt2":
            enc = gpt2_tokenizer(path)
            return Codec("gpt2", enc.encode_ordinary_batch, enc.decode, enc.eot_token, enc.n_vocab)
        if name == "neox":
            tok = neox_tokenizer(path)
            encode = lambda docs: [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]  # noqa: E731
            decode = lambda ids: tok.decode(list(ids), skip_special_tokens=False)  # noqa: E731
            return Codec("neox", encode, decode, tok.token_to_id(EOT), tok.get_vocab_size())
    except ConfigError:  # a missing package (`require`), not a bad file
        raise
    except Exception as e:  # a missing file, a hash mismatch, a tokenizer.json that is not one
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"cannot load {path} as the {name} tokenizer ({first}): pass the right tokenizer file") \
            from None
    raise ConfigError(f"unknown tokenizer {name!r}: 'gpt2' or 'neox'")


def load_tokenizer(data_dir):
    """(Codec, meta) of a prepared dataset directory, from its meta.json and its copy of the tokenizer."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: run data/prepare.py to prepare {data_dir}")
    meta = read_json(path, "dataset metadata", "re-run data/prepare.py")
    if not all(isinstance(meta.get(k), str) for k in ("tokenizer", "tokenizer_file")):
        raise ConfigError(f"{path} names no tokenizer (not written by data/prepare.py?): re-run data/prepare.py")
    return load_codec(meta["tokenizer"], os.path.join(data_dir, meta["tokenizer_file"])), meta


def vocab_strings(decode):
    """A cached token -> text function for a decode(list[int]) -> str callable (or a Codec)."""
    decode = getattr(decode, "decode", decode)
    return functools.lru_cache(maxsize=None)(lambda t: decode([t]))
