"""
Run directories (plumbing for train.py and the tools that read or write a run):

- `DirLock`: one owner process for a directory;
- `RunLog`: out_dir/log.jsonl, never ahead of the checkpoint it belongs to;
- `staged_dir`: a tool's output directory, replaced as a whole when the tool completes;
- checkpoints: `save_checkpoint`, `load_checkpoint` (a torn or foreign file is one ConfigError), `load_state`;
- `EarlyStop`: the one line of a run that stops early (interrupted, a lost DDP peer, a full disk, a failure).
"""

import contextlib
import dataclasses
import errno
import json
import os
import shlex
import shutil
import signal
import sys
import time

import torch

from configuration import ConfigError, Interrupted, Stopped, hold_signals, uninterrupted
from ddp import lost_peer
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
            print(f"note: {self.path} {_left_by(stale)}: taken over", file=sys.stderr)
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


def _left_by(text):
    """What a lock file that nobody holds says about its writer, truthfully: gone, or alive without the lock."""
    if not text.isascii() or not text.isdecimal():
        return f"holds {text[:20]!r}, not a process id"
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return f"was left by process {text}, which no longer runs"
    except OSError:  # alive, another user's
        pass
    return f"names process {text}, which runs but does not hold it (a copied or left-over file)"


class RunLog:
    """out_dir/log.jsonl: one JSON record per line, the first {"iter": 0, "run": id} naming the run.

    A resumed run (resume_iter = the checkpoint's iteration) keeps its own records up to that iteration (a killed
    run can leave later ones or a torn line) and appends. A run that replaces another (`pending`) holds its records
    in memory and writes the file at commit(), after its first checkpoint: until then the old run stays whole.
    commit() marks the end of the file at each checkpoint; a run that fails closes with rewind=True, which cuts the
    file back to that mark (no space needed, so a full disk too), so log.jsonl never runs ahead of ckpt.pt."""

    def __init__(self, path, run_id=None, resume_iter=None, pending=False):
        self.path, self.pending, self.f, self.mark = path, pending, None, None
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
        line = json.dumps(record) + "\n"
        if self.pending:
            self.lines.append(line)
            return
        try:  # unbuffered: each record reaches the file whole or fails here, with nothing left to flush later
            self.f.write(line.encode())
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None

    def commit(self):
        """A checkpoint is written: the held records go over log.jsonl (atomically, the first time), and a later
        failure cuts the file back to here."""
        if self.f is None:
            with atomic_write(self.path) as f:
                f.writelines(self.lines)
            self.f, self.lines, self.pending = open(self.path, "ab", buffering=0), None, False
        self.mark = os.fstat(self.f.fileno()).st_size

    def close(self, rewind=False):
        if self.f is not None:
            if rewind:
                os.ftruncate(self.f.fileno(), self.mark)
            self.f.close()
            self.f = None


def _record(line):
    """A log line as a dict with an int "iter", or None for a torn or foreign line."""
    try:
        r = json.loads(line)
        return r if isinstance(r, dict) and isinstance(r.get("iter"), int) else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- checkpoints
CKPT_KEYS = ("model", "optimizer", "model_config", "train_config", "iter_num")


def save_checkpoint(obj, path, log=None):
    """torch.save through atomic_write (a crash leaves the old checkpoint or the new one), then log.commit(), with
    SIGINT and SIGTERM held meanwhile, so that an interrupt never parts a checkpoint from its log. A failed write
    (a full disk) is an OSError naming `path`, even where torch reports it as a RuntimeError."""
    with uninterrupted():
        try:
            with atomic_write(path, "wb") as f:
                torch.save(obj, f)
        except (OSError, RuntimeError) as e:
            cause = e
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise OSError(cause.errno, cause.strerror, path) from None
        if log is not None:
            log.commit()


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


# ---------------------------------------------------------------------------------------------- stopping early
class EarlyStop:
    """Where a run stands (`it`: the iterations done; `saved`: the iteration of the checkpoint on disk, or None)
    and the one line it ends with when it stops early. As a context manager around the training loop it turns an
    interrupt (SIGINT, SIGTERM), a lost DDP peer and a failed write (a full disk) into that line (Interrupted or
    Stopped), and holds further signals while the run closes. `abrupt`: the ranks no longer meet (no barrier)."""

    def __init__(self, out_dir, saved, replacing, rank=0, world=1):
        self.out_dir, self.it, self.saved, self.replacing = out_dir, saved or 0, saved, replacing
        self.rank, self.world, self.peers, self.abrupt = rank, world, None, False

    def kept(self, exact=True):
        """Which checkpoint is kept. Rank 0 writes them: another rank stopped abruptly cannot know that its last
        write completed."""
        if self.rank and not exact:
            return f"the last checkpoint rank 0 completed in {self.out_dir} is kept"
        if self.saved is not None:
            return f"the checkpoint of iteration {self.saved} in {self.out_dir} is kept"
        return "this run wrote no checkpoint" + (" (the earlier run in out_dir is kept)" if self.replacing else "")

    def resume(self):
        if self.saved is None and not self.rank:
            return "run the same command again to start over"
        launch = f"torchrun --standalone --nproc_per_node={self.world}" if self.world > 1 else "python"
        return f"resume with `{launch} train.py --init_from=resume --out_dir={shlex.quote(self.out_dir)}`"

    def failure(self, what, fix):
        """The error of a failure the loop found itself (the same on every rank: its checks are all-reduced)."""
        return FloatingPointError(f"{what}; {self.kept()}: {fix}")

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, (ConfigError, FloatingPointError)):
            return False
        hold_signals()
        signum = getattr(exc, "signum", signal.SIGINT) if isinstance(exc, KeyboardInterrupt) else None
        lost = lost_peer(exc, self.peers) if self.peers and signum != signal.SIGINT else None
        at, kept = f"at iteration {self.it}", self.kept(exact=False)
        if signum:
            self.abrupt = True
            after = f" after losing {lost}" if lost else ""  # the SIGTERM of torchrun, which saw a rank end
            raise Interrupted(signum, f"interrupted by {signal.Signals(signum).name} {at}{after}; {kept}; "
                                      f"{self.resume()}") from None
        if lost:
            self.abrupt = True
            raise Stopped(f"lost {lost} {at}; {kept}; {self.resume()}") from None
        if isinstance(exc, OSError):
            free = "free some space, then " if exc.errno == errno.ENOSPC else ""
            raise Stopped(f"{exc.strerror} ({exc.filename or 'a file'}) {at}; {kept}; {free}{self.resume()}") \
                from None
        return False
