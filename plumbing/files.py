"""
Files a user hands us and files we write (plumbing for every entry point):

- `read_json`, `read_torch`: a user's file that is missing, torn or foreign ends in one ConfigError naming it;
- `atomic_write`: an output is written to a temporary name and renamed into place when complete;
- `recorded`, `remove_leftovers`: temporaries that only this project makes, each recorded before it exists, and
  the cleanup of those a killed process left beside an output (nothing else is touched).
"""

import contextlib
import json
import os
import re
import secrets
import shutil

import torch

from plumbing.configuration import ConfigError, read_text


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


# A temporary of this project is `.<output>.codebook-tmp-<pid>-<tag>` (a new file or directory) or
# `.<output>.codebook-old-<pid>-<tag>` (the output it replaces), beside the output; before making one, its writer
# records it in `.<output>.codebook-record-<pid>-<tag>`, a JSON file holding its PID and the start time of its
# process. Only the temporaries that such a record names are ever removed or renamed, and only once their writer
# no longer runs: nothing else beside an output, whatever its name, is touched.
TEMPORARY = re.compile(r"^\.(?P<output>.+)\.codebook-(?P<what>tmp|old|record)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")


def is_temporary(name):
    """Whether `name` (a file name) is one of this project's temporaries or records (TEMPORARY)."""
    return TEMPORARY.match(name) is not None


@contextlib.contextmanager
def recorded(path):
    """Yield {"tmp": path, "old": path} of new temporaries for the output `path`, after writing their record (the
    leftovers of a killed writer of `path` go first: remove_leftovers). The record is removed when the block ends,
    whether it completes or fails: the block itself removes or renames its temporaries. Raises OSError (naming
    `path`) where nothing can be written beside it."""
    remove_leftovers(path)
    folder, output = os.path.split(path)
    pid, tag = os.getpid(), secrets.token_hex(4)
    names = {w: os.path.join(folder, f".{output}.codebook-{w}-{pid}-{tag}") for w in ("tmp", "old", "record")}
    try:
        fd = os.open(names["record"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:  # a full disk, a place that cannot be written: said of the output itself
        raise OSError(e.errno, e.strerror, path) from None
    try:
        os.write(fd, json.dumps({"output": output, "pid": pid, "start": process_start(pid)}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        yield names
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(names["record"])


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Write to a recorded temporary beside `path` (`recorded`) and rename it onto `path` only when the block
    completes: a crash or an error leaves the old file (or none), never a torn one."""
    with recorded(path) as names:
        tmp = names["tmp"]
        try:
            with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def remove_leftovers(path):
    """Clean up after a killed writer of `path`: for each record of a temporary of `path` (TEMPORARY) whose process
    no longer runs, remove the temporaries it names (files or directories), putting an old copy back instead when
    `path` itself is gone (a kill between staged_dir's two renames), then the record. A name without a record, or
    with a record that is not this project's JSON, is left alone."""
    folder, output = os.path.split(path)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return
    for name in names:
        m = TEMPORARY.match(name)
        if not m or m["what"] != "record" or m["output"] != output:
            continue
        record = os.path.join(folder, name)
        try:
            with open(record, encoding="utf-8") as f:
                r = json.load(f)
            ok = isinstance(r, dict) and r.get("output") == output and r.get("pid") == int(m["pid"])
        except (OSError, ValueError):
            ok = False
        if not ok or writer_alive(r["pid"], r.get("start")):
            continue
        tmp, old = (os.path.join(folder, f".{output}.codebook-{w}-{m['pid']}-{m['tag']}") for w in ("tmp", "old"))
        if os.path.lexists(old) and not os.path.lexists(path):
            os.rename(old, path)
        for left in (old, tmp):
            if os.path.isdir(left) and not os.path.islink(left):
                shutil.rmtree(left, ignore_errors=True)
            elif os.path.lexists(left):
                os.remove(left)
        os.remove(record)


def process_start(pid):
    """The start time of process `pid` (/proc/<pid>/stat, clock ticks since boot) as text, or None where unknown:
    with its PID it names one process, even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def writer_alive(pid, start):
    """Whether the process that wrote a record (its PID and `process_start`) still runs."""
    now = process_start(pid) if isinstance(pid, int) else None
    return isinstance(pid, int) and pid_alive(pid) and (start is None or now is None or now == start)


def pid_alive(pid):
    """Whether a process with this PID runs on this machine (one of another user counts; a zombie, dead but not
    yet reaped, does not: it holds no file and no lock)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's, or no PID at all: left alone
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc here: it answered the signal, so it runs
        return True
