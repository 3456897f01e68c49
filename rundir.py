"""
Run directories (plumbing for train.py and the tools that read or write a run):

- `DirLock`: one owner process for a directory;
- `RunLog`: out_dir/log.jsonl, never ahead of the run it belongs to;
- `staged_dir`: a tool's output directory, replaced as a whole when the tool completes;
- checkpoints: `save_checkpoint`, `load_checkpoint` (a torn or foreign file is one ConfigError), `load_state`.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time

import torch

from configuration import ConfigError
from files import atomic_write, read_torch


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
