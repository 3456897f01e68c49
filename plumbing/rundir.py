"""
Run directories (plumbing for train.py and the tools that read or write a run):

- kinds: every directory the project writes carries a marker naming its kind (`KINDS`); `claim` refuses, before
  any work, a directory that a tool may not write (another kind, a user's folder, a file);
- `DirLock`: one owner process for a directory;
- `RunLog`: out_dir/log.jsonl, never ahead of the checkpoint it belongs to;
- `staged_dir`: a tool's output directory, replaced as a whole when the tool completes;
- checkpoints: `save_checkpoint`, `load_checkpoint` (a torn or foreign file is one ConfigError), `load_state`;
- `EarlyStop`: the one line of a run that stops early (interrupted, a lost DDP peer, a full disk, a failure);
  `close_run` ends a run.

A training run's out_dir holds ckpt.pt (written atomically) and log.jsonl (one JSON object per log line and per
evaluation). A run that replaces another (--overwrite=true) leaves it whole until its own first checkpoint. A run
that stops early names the checkpoint kept and the command that resumes, and cuts log.jsonl back to it.
"""

import contextlib
import dataclasses
import errno
import fnmatch
import json
import os
import shlex
import shutil
import signal
import sys
import time
import zipfile

import torch
import torch.distributed as dist

from plumbing.configuration import ConfigError, is_out_dir
from plumbing.ddp import end_process_group, lost_peer
from plumbing.entry import Interrupted, Stopped, hold_signals, uninterrupted
from plumbing.files import atomic_write, is_temporary, pid_alive, read_torch, recorded, remove_leftovers  # noqa: F401

# ---------------------------------------------------------------------------------------------- kinds
MARKER = ".codebook-kind.json"  # {"kind", "argv", "cwd", "time", "format"}: what wrote the directory, and how
# kind: (what it is, in words; the files it writes; the directories it writes). A directory without a marker (or
# with a torn one), written before markers existed, is known by its files where they are in this project's own
# format (`_evidence`): a training run by ckpt.pt or log.jsonl (it also holds the tools' outputs), any other kind
# when it holds one of its files in that format and nothing else than its files.
KINDS = {
    "train": ("a training run", ("ckpt.pt", "log.jsonl"), ()),
    "analysis": ("analyze.py's analysis", ("codes.pt", "stats.json", "freq.png", "browser.html", "concepts.json",
                                            "fsm.json", "fsm_tables.pt", "heatmap.png", "neurons.png", "stories.json"), ()),
    "topics": ("topics.py's topic codes", ("topic_codes.json", "concepts.json", "steering.json", "stories.json"), ()),
    "sae": ("sae.py's SAEs", ("sae.pt", "results.json"), ()),
    "dataset": ("data/prepare.py's dataset", ("meta.json", "train.bin", "val.bin", "test.bin", "tokenizer.json",
                                              "tokenizer.tiktoken", "val_truth.npz"), ()),
    "pythia": ("a Pythia model directory", ("config.json", "*.safetensors", "*.bin", "*.json", "*.part"), ()),
    "fsm-table": ("scripts/fsm_table.py's results table", (), ("quick", "k1", "k4", "nocb")),
    "gpu-check": ("scripts/gpu_check.py's runs", ("table.md", "*.txt"), ("eager", "compiled", "ddp", "resumed")),
}
CONTAINERS = ("train", "fsm-table", "gpu-check")  # kinds that hold other kinds' directories (tables: runs only)
RUN_CONTAINERS = ("fsm-table", "gpu-check")  # where a new training run may lie
STAGED = ("analysis", "topics", "sae", "dataset")  # written by staged_dir: replaced as a whole


def _torch_file(path):
    """Whether `path` is a torch.save zip archive (its data.pkl), read without unpickling anything."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _json(path, test, limit=1 << 20):
    """Whether `path` holds JSON (its first line only, for a .jsonl) of which test(value) holds."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.readline(limit) if path.endswith(".jsonl") else f.read(limit)
        return bool(test(json.loads(text)))
    except (OSError, ValueError):
        return False


def _dict_with(*keys):
    return lambda v: isinstance(v, dict) and all(k in v for k in keys)


def _run_log(v):
    return isinstance(v, dict) and v.get("iter") == 0 and "run" in v


# kind: {file: check}: a file that shows, by its contents, that this project wrote the directory
_EVIDENCE = {
    "train": {"ckpt.pt": _torch_file, "log.jsonl": lambda p: _json(p, _run_log)},
    "analysis": {"codes.pt": _torch_file, "fsm_tables.pt": _torch_file},
    "topics": {"topic_codes.json": lambda p: _json(p, lambda v: isinstance(v, (dict, list)))},
    "sae": {"sae.pt": _torch_file},
    "dataset": {"meta.json": lambda p: _json(p, _dict_with("vocab_size"))},
    "pythia": {"config.json": lambda p: _json(p, lambda v: isinstance(v, dict) and v.get("model_type") == "gpt_neox")},
}


def _evidence(path, kind, names):
    """Whether one of `names` in the directory `path` is a file of `kind` in this project's own format."""
    return any(n in names and os.path.isfile(os.path.join(path, n)) and check(os.path.join(path, n))
               for n, check in _EVIDENCE.get(kind, {}).items())


def _marker(path):
    """The kind the marker file of the directory `path` names, or None where it is missing, torn or foreign."""
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            kind = json.load(f)["kind"]
        return kind if isinstance(kind, str) and kind else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kind_of(path):
    """(kind, names) of the directory `path`: "train" when it holds a run in this project's format (ckpt.pt or
    log.jsonl: the files win over a marker that names another kind), else the kind its marker names (one this
    version does not know included: refused by every tool), else the one its files show (KINDS, `_evidence`; a
    torn marker is ignored); "" for a directory holding anything else, None for a missing or empty one. names: its
    entries, the kind's own first, without the marker file, a lock and this project's temporaries
    (files.TEMPORARY), which do not count (a marker that is not a file does: it is not this project's)."""
    try:
        names = os.listdir(path)
    except OSError:
        return None, []
    marker = MARKER in names and os.path.isfile(os.path.join(path, MARKER))
    rest = [n for n in names if n != ".lock" and (n != MARKER or not marker) and not is_temporary(n)]
    marked = _marker(path) if marker else None
    if _evidence(path, "train", rest):
        kind = "train"
    elif marked:
        kind = marked
    elif not rest:  # a lock alone: a run that has just started (DirLock)
        kind = "train" if ".lock" in names else None
    else:
        kind = next((k for k, (_, files, dirs) in KINDS.items() if _known(k, path, rest, files + dirs)), "")
    return kind, sorted(rest, key=lambda n: (not _own(kind, n), n))


def _own(kind, name):
    """Whether `name` is one of the files or directories that `kind` writes."""
    return any(fnmatch.fnmatch(name, p) for p in sum(KINDS.get(kind, ("", (), ()))[1:], ()))


def _known(kind, path, names, own):
    named = bool(set(names) & set(own))  # one of its names itself, not only a pattern's match
    if kind == "fsm-table":  # its rows, each a training run
        return named and all(n in own and kind_of(os.path.join(path, n))[0] == "train" for n in names)
    if kind == "gpu-check":  # known by its marker only
        return False
    return named and _evidence(path, kind, names) and \
        (kind == "train" or all(any(fnmatch.fnmatch(n, p) for p in own) for n in names))


def _what(kind):
    if kind in KINDS:
        return KINDS[kind][0]
    return "files this project did not write" if kind == "" else f"a directory of unknown kind {kind!r} ({MARKER})"


def dir_problem(path, kind):
    """None if `kind` may write the directory `path`, else what is wrong, in words. It may when `path` is of that
    kind (with its own files as files and its directories as directories), or is missing or empty and lies in no
    directory of another kind than a training run or a results table (a training run: a results table only)."""
    problem = is_out_dir(path)
    if problem:
        return problem
    there, names = kind_of(path)
    if there is not None and there != kind:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"holds {_what(there)} ({shown}), not {_what(kind)}: choose a new or empty directory"
    what, files, dirs = KINDS[kind]
    for name in files + dirs:
        p = os.path.join(path, name)
        if os.path.lexists(p) and os.path.isdir(p) != (name in dirs):
            want, got = ("directory", "file") if name in dirs else ("file", "directory")
            return f"holds {name} as a {got}, where {what} keeps a {want}: move it away, or choose another directory"
    foreign = [n for n in names if not _own(kind, n)] if there == kind and kind in STAGED else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        return f"holds {shown}, which {what} does not write and replacing it would delete: move them out, or " \
            "choose another directory"
    if there == kind:  # written before: where it lies was checked then (or it predates the check)
        return None
    return _inside(os.path.dirname(os.path.abspath(path)), RUN_CONTAINERS if kind == "train" else CONTAINERS)


def _inside(up, allowed):
    """The problem of a place in the directory `up`: `up` or a directory above it is of a kind not in `allowed`."""
    while True:
        there = kind_of(up)[0]
        if there and there not in allowed:
            return f"lies inside {up}, which holds {_what(there)}: choose a place outside it"
        if up == os.path.dirname(up):
            return None
        up = os.path.dirname(up)


def is_out_file(path):
    """None if an output file may be written at `path` ("" = none), else the problem: a directory there, a file
    above it, a file that a run or a dataset holds (ckpt.pt, meta.json, ...), a place inside another tool's output."""
    if not path:
        return None
    if os.path.isdir(path):
        return "is a directory, not a file: name a file"
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(parent):
        return f"lies under {parent}, which is a file, not a directory: name a file in a directory"
    kind = kind_of(parent)[0]
    if kind in KINDS and any(fnmatch.fnmatch(os.path.basename(path), p) for p in KINDS[kind][1]):
        return f"is a file of {_what(kind)} ({parent}): name another file"
    return is_out_dir(parent) or _inside(parent, CONTAINERS)


def claim(path, kind, flag):
    """Check, before any work, that `kind` may write the directory `path` (dir_problem): a ConfigError naming
    `flag`, `path` and what is there if not."""
    problem = dir_problem(path, kind)
    if problem:
        raise ConfigError(f"{flag}={path!r} {problem}")


def mark(path, kind):
    """Write the marker of the directory `path`: its kind, the command that wrote it, when (atomically). Where
    something not a file holds its name, it is left alone: the directory stays known by its files."""
    if os.path.lexists(os.path.join(path, MARKER)) and not os.path.isfile(os.path.join(path, MARKER)):
        return
    with atomic_write(os.path.join(path, MARKER)) as f:
        json.dump({"kind": kind, "argv": sys.argv, "cwd": os.getcwd(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "format": 1}, f)


@contextlib.contextmanager
def staged_dir(path, kind):
    """Yield a fresh temporary directory beside `path` (files.recorded); when the block completes, it gets the
    marker of `kind` and replaces `path` as a whole. On an error it is removed and `path` stays as it was: a
    half-written result never looks like a finished one. Raises ConfigError before the block when `kind` may not
    write `path` (claim: a directory of another kind, or one holding files `kind` does not write) or it cannot be
    created, and after it, leaving `path` as it was, when such files appeared there meanwhile. Leftovers of a
    killed run of a tool are cleaned up first (files.remove_leftovers)."""
    path = os.path.normpath(path)
    remove_leftovers(path)  # first: it may put back the output itself
    claim(path, kind, "output directory")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{path} cannot be written ({e.strerror}): choose a writable place") from None
    with recorded(path) as names:
        tmp, old = names["tmp"], names["old"]
        os.makedirs(tmp)
        try:
            yield tmp
            mark(tmp, kind)
            claim(path, kind, "output directory")  # again: nothing of a user's may have come in meanwhile
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
    if not pid_alive(int(text)):
        return f"was left by process {text}, which no longer runs"
    return f"names process {text}, which runs but does not hold it (a copied or left-over file)"


class RunLog:
    """out_dir/log.jsonl: one JSON record per line, the first {"iter": 0, "run": id} naming the run.

    A resumed run (resume_iter = the checkpoint's iteration) keeps its own records up to that iteration (a killed
    run can leave later ones or a torn line) and appends. A run that replaces another (`pending`) holds its records
    in memory and writes the file at commit(), after its first checkpoint: until then the old run stays whole.
    commit() marks the end of the file at each checkpoint; a run that fails closes with rewind=True, which cuts the
    file back to that mark (no space needed, so a full disk too), so log.jsonl never runs ahead of ckpt.pt."""

    def __init__(self, path, run_id=None, resume_iter=None, pending=False):
        self.path, self.pending, self.f, self.at_ckpt, self.new = path, pending, None, None, resume_iter is None
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
        """A checkpoint is written: the held records go over log.jsonl (atomically, the first time; a new run also
        writes the directory's marker, a resumed one keeps the marker of the command that started it), and a later
        failure cuts the file back to here."""
        if self.f is None:
            with atomic_write(self.path) as f:
                f.writelines(self.lines)
            if self.new:
                mark(os.path.dirname(self.path) or ".", "train")
            self.f, self.lines, self.pending = open(self.path, "ab", buffering=0), None, False
        self.at_ckpt = os.fstat(self.f.fileno()).st_size

    def close(self, rewind=False):
        if self.f is not None:
            if rewind:
                os.ftruncate(self.f.fileno(), self.at_ckpt)
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
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory, not a checkpoint file: move it away, or point out_dir at a run")
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


def close_run(run, failed=True):
    """The end of train.py's run (a namespace with log, lock, ddp and stop): close the log (cut back to the last
    checkpoint if the run failed), free out_dir, then leave the process group (ddp.end_process_group; without its
    barrier when the ranks no longer meet)."""
    if run.log is not None:
        run.log.close(rewind=failed)
    if run.lock is not None:
        run.lock.release()
    if run.ddp and dist.is_initialized():
        end_process_group(failed=failed, barrier=not run.stop.abrupt)
