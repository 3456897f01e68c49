"""
Plumbing shared by the entry points (train.py, sample.py, analyze.py, steer.py, bench.py, data/prepare.py), kept
apart so that the concept files show only the method:

- configs, presets, flags, `--help`, ConfigError and `cli` live in configuration.py, progress bars in progress.py;
  both are re-exported here, so `from utils import spec, cli, progress, ...` works;
- files: the device, files read from users (fail clearly when torn or foreign), outputs written to a temporary
  name and renamed into place, a lock that gives a directory one owner process;
- checkpoints, token files and tokenizers.
"""

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import sys
import threading
import time
from collections import namedtuple

import numpy as np
import torch

from configuration import (ConfigError, HelpRequested, _parse_value, build, check_help, cli,  # noqa: F401
                           is_device, is_out_dir, is_regex, load_preset, parse_args, parse_config, read_text,
                           resume_config, spec, split_config, split_list, validate)
from progress import eta, forward_progress, progress  # noqa: F401


def device_of(name):
    """The torch device for a validated device name: "auto" is CUDA when present, else the CPU."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def autocast_for(device, dtype="auto"):
    """bf16 autocast on CUDA for "auto" or "bfloat16", a disabled autocast otherwise."""
    kind = torch.device(device).type
    on = dtype == "bfloat16" or (dtype == "auto" and kind == "cuda")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=on)


# ---------------------------------------------------------------------------------------------- files from users
def read_json(path, what, fix="write it again", kind=dict):
    """A JSON file holding a `kind` (dict or list), or a ConfigError naming the file, what is wrong and `fix`."""
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON (line {e.lineno}: {e.msg}), torn or foreign: {fix}") \
            from None
    if not isinstance(value, kind):
        raise ConfigError(f"{what} {path} holds a JSON {type(value).__name__}, not a {kind.__name__}: {fix}")
    return value


def read_torch(path, what, keys=(), fix="pass the right file"):
    """torch.load of a user's file (tensors and plain values only), or a ConfigError when it is missing, torn,
    foreign, or a dict without `keys`; the message ends with `fix`."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} not found: check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn zip, a text file, a pickle of code: all end the same way
        raise ConfigError(f"{path} cannot be read as a {what} ({type(e).__name__}): it is truncated or another kind "
                          f"of file: {fix}") from None
    lacks = sorted(set(keys) - set(obj)) if isinstance(obj, dict) else sorted(keys)
    if lacks:
        raise ConfigError(f"{path} is not a {what} (it lacks {', '.join(lacks)}): {fix}")
    return obj


# ---------------------------------------------------------------------------------------------- outputs
@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Write to `path.tmp.<pid>` and rename it onto `path` only when the block completes: a crash or an error
    leaves the old file (or none), never a torn one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def staged_dir(path):
    """Yield a fresh `path.tmp.<pid>` directory; when the block completes it replaces `path` as a whole. On an
    error it is removed and `path` stays as it was: a half-written result never looks like a finished one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise ConfigError(f"{path} cannot be written ({e.strerror}): choose a writable place") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = f"{path}.old.{os.getpid()}"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


class DirLock:
    """One owner process for a directory: an flock on `<dir>/.lock`, which holds the owner's PID. The kernel
    drops the lock when its process dies, so a lock file left by a killed run is stale and is taken over.

    Raises ConfigError when another live process holds it (naming its PID) or the directory cannot be made."""

    def __init__(self, directory, what="out_dir"):
        import fcntl

        self.path, self.dir = os.path.join(directory, ".lock"), directory
        self.created = not os.path.isdir(directory)  # an empty directory we made is removed again on release
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{what}={directory} cannot be created ({e.strerror}): choose a writable place") from None
        while True:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(self.fd, 64).decode(errors="replace").strip() or "?"
                os.close(self.fd)
                raise ConfigError(f"{what}={directory} is in use by process {owner} ({self.path}): wait for it to "
                                  f"finish, or choose another {what}") from None
            try:  # the file may have been removed by its owner between our open and our lock: then try again
                if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)
        stale = os.read(self.fd, 64).decode(errors="replace").strip()
        if stale:
            print(f"note: {self.path} was left by process {stale}, which no longer runs: taken over", file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            os.remove(self.path)  # while still holding the lock: a waiting process then sees a new file
            os.close(self.fd)
            self.fd = None
            if self.created and not os.listdir(self.dir):
                os.rmdir(self.dir)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class RunLog:
    """out_dir/log.jsonl: one JSON record per line, the first {"iter": 0, "run": id} naming the run.

    A resumed run (resume_iter = the checkpoint's iteration) keeps its own records up to that iteration (a killed
    run can leave later ones or a torn line) and appends. A run that replaces another (`pending`) holds its records
    in memory and writes the file at commit(), after its first checkpoint: until then the old run stays whole."""

    def __init__(self, path, run_id=None, resume_iter=None, pending=False):
        self.path, self.pending, self.f = path, pending, None
        self.run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.lines = [json.dumps({"iter": 0, "run": self.run_id}) + "\n"]
        if resume_iter is not None and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                records = [r for r in map(_record, f) if r is not None]
            if records and records[0].get("run", run_id) == run_id:  # else: another run's log, dropped
                self.lines += [json.dumps(r) + "\n" for r in records if r["iter"] <= resume_iter and "run" not in r]
        if not pending:
            self.commit()

    def write(self, record):
        if self.pending:
            self.lines.append(json.dumps(record) + "\n")
        else:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def commit(self):
        """Write the held records over log.jsonl (atomically) and append from now on."""
        if self.f is None:
            with atomic_write(self.path) as f:
                f.writelines(self.lines)
            self.f, self.lines, self.pending = open(self.path, "a", encoding="utf-8"), None, False

    def close(self):
        if self.f is not None:
            self.f.close()


def _record(line):
    """A log line as a dict with an int "iter", or None for a torn or foreign line."""
    try:
        r = json.loads(line)
        return r if isinstance(r, dict) and isinstance(r.get("iter"), int) else None
    except ValueError:
        return None


def end_process_group(timeout_s=60.0, failed=False):
    """Leave torch.distributed: a barrier, then destroy_process_group (without the barrier gloo can abort at exit).
    Both can hang, rarely, once the work is done (a known torch problem, seen here with gloo); after `timeout_s`
    seconds the process exits (status 1 if `failed`, else 0) with a warning, its outputs being complete already."""
    done = threading.Event()

    def watchdog():
        if not done.wait(timeout_s):
            print(f"warning: torch.distributed did not shut down within {timeout_s:g} s; exiting without it "
                  "(every output was written before)", file=sys.stderr, flush=True)
            os._exit(1 if failed else 0)
    threading.Thread(target=watchdog, daemon=True).start()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    done.set()


class AllFinite:
    """all_finite(*tensors): whether every value is finite on every rank (all-reduced under DDP), one host sync."""

    def __init__(self, device, ddp):
        # a persistent flag, because a temporary tensor handed to gloo can hang the exit: gloo's thread then needs
        # the GIL to free it while the main thread, holding it, waits for that thread in the group's teardown
        self.flag, self.ddp = torch.ones((), device=device), ddp

    def __call__(self, *tensors):
        self.flag.copy_(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
        if self.ddp:
            torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MIN)
        return bool(self.flag.item())


# ---------------------------------------------------------------------------------------------- checkpoints
CKPT_KEYS = ("model", "optimizer", "model_config", "train_config", "iter_num")


def save_checkpoint(obj, path):
    """torch.save through atomic_write: a crash leaves the old checkpoint or the new one."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path, classes=()):
    """A checkpoint written by train.py, with a clear ConfigError for a missing, torn or foreign file, or one whose
    stored configs hold keys that the dataclasses `classes` (TrainConfig, GPTConfig) lack."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}: train first, or point out_dir at a run")
    ckpt = read_torch(path, "checkpoint written by train.py", CKPT_KEYS,
                      "point out_dir at a train.py run, or start again with --overwrite=true")
    for cls, key in zip(classes, ("train_config", "model_config")):
        unknown = sorted(set(ckpt[key]) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"{path}: {key} holds unknown keys {unknown}, so another version of this code wrote it: "
                              "use that version, or start a new out_dir")
    return ckpt


def load_state(module, state, what):
    """module.load_state_dict(state), with a ConfigError naming the first missing, extra or misshapen key."""
    ours = module.state_dict()
    for key in sorted(ours.keys() | state.keys()):
        shapes = [tuple(d[key].shape) if key in d else "absent" for d in (state, ours)]
        if shapes[0] != shapes[1]:
            raise ConfigError(f"{what} do not match the model (another config?): {key} is {shapes[0]} there, "
                              f"{shapes[1]} in the model; use the checkpoint of the run itself")
    module.load_state_dict(state)


def model_from_checkpoint(ckpt, device="cpu"):
    """The GPT of a checkpoint, rebuilt from the config stored in it, in eval mode on `device`."""
    from model import GPT, GPTConfig

    try:
        model = GPT(build(GPTConfig, ckpt["model_config"], "the checkpoint's model_config"))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the checkpoint's model_config is invalid ({e}): another version of this code wrote it")
    load_state(model, ckpt["model"], "the checkpoint's weights")
    return model.to(device).eval()


def load_run(out_dir, device):
    """(checkpoint, model) of the run in out_dir, for the tools that read a run (sample, analyze, steer)."""
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    return ckpt, model_from_checkpoint(ckpt, device_of(device))


# ---------------------------------------------------------------------------------------------- token files
def load_tokens(data_dir, block_size, vocab_size):
    """(train, val): data_dir/{train,val}.bin as 1-D uint16 np.memmaps, checked against the model.

    Raises ConfigError for a missing directory or file, a torn meta.json, a tokenizer larger than vocab_size, a
    file shorter than block_size + 1 tokens, or a token id >= vocab_size."""
    if not os.path.isdir(data_dir):
        raise ConfigError(f"dataset={data_dir!r} is not a directory: run data/prepare.py to create it, "
                          "or use dataset=fsm")
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{meta_path} is missing: run data/prepare.py to prepare {data_dir}")
    n_vocab = read_json(meta_path, "dataset metadata", "re-run data/prepare.py").get("vocab_size")
    if not isinstance(n_vocab, int):
        raise ConfigError(f"{meta_path} has no vocab_size (not written by data/prepare.py?): re-run data/prepare.py")
    if n_vocab > vocab_size:
        raise ConfigError(f"{meta_path}: the tokenizer has {n_vocab} tokens but vocab_size={vocab_size}: "
                          f"raise vocab_size (e.g. --vocab_size={-(-n_vocab // 64) * 64})")
    splits = []
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise ConfigError(f"{path} is missing: run data/prepare.py to prepare {data_dir}")
        n = os.path.getsize(path) // 2
        if n < block_size + 1:
            raise ConfigError(f"{path} has {n} tokens, but block_size={block_size} needs at least {block_size + 1}: "
                              "lower block_size or prepare more text")
        data = np.memmap(path, dtype=np.uint16, mode="r")
        top = int(data.max())
        if top >= vocab_size:
            raise ConfigError(f"{path} holds token id {top} >= vocab_size={vocab_size}: "
                              "raise vocab_size or re-run data/prepare.py")
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
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    if path is None:
        return tiktoken.get_encoding("r50k_base")
    ranks = load_tiktoken_bpe(path, expected_hash=GPT2_SHA256)
    return tiktoken.Encoding("r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256})


def neox_tokenizer(path):
    """Pythia's GPT-NeoX-20B BPE from a tokenizer.json, as a tokenizers.Tokenizer (50,277 tokens, eot = 0)."""
    from tokenizers import Tokenizer

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
    if not {"tokenizer", "tokenizer_file"} <= set(meta):
        raise ConfigError(f"{path} names no tokenizer (not written by data/prepare.py?): re-run data/prepare.py")
    return load_codec(meta["tokenizer"], os.path.join(data_dir, meta["tokenizer_file"])), meta


def vocab_strings(decode):
    """A cached token -> text function for a decode(list[int]) -> str callable (or a Codec)."""
    decode = getattr(decode, "decode", decode)
    return functools.lru_cache(maxsize=None)(lambda t: decode([t]))
