"""
Files a user hands us and files we write (plumbing for every entry point):

- `read_json`, `read_torch`: a user's file that is missing, torn or foreign ends in one ConfigError naming it;
- `atomic_write`: an output is written to a temporary name and renamed into place when complete;
- `remove_leftovers`: the temporary names that a killed process left beside an output.
"""

import contextlib
import glob
import json
import os
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


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Write to `path.tmp.<pid>` and rename it onto `path` only when the block completes: a crash or an error
    leaves the old file (or none), never a torn one. Leftovers of a killed writer go first (remove_leftovers)."""
    remove_leftovers(path)
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


def remove_leftovers(path):
    """Remove `path.tmp.<pid>` and `path.old.<pid>` (files or directories) whose process no longer runs: what a
    killed atomic_write or staged_dir left. An old copy is put back instead when `path` itself is gone (a kill
    between staged_dir's two renames)."""
    for left in glob.glob(glob.escape(path) + ".old.*") + glob.glob(glob.escape(path) + ".tmp.*"):
        pid = left.rsplit(".", 1)[1]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        if ".old." in left[len(path):] and not os.path.exists(path):
            os.rename(left, path)
        elif os.path.isdir(left) and not os.path.islink(left):
            shutil.rmtree(left, ignore_errors=True)
        else:
            os.remove(left)


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
