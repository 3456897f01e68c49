"""
How an entry point runs and ends (plumbing for every script): `cli(main)` runs it and turns what stops it into one
line and an exit status, never a traceback:

- a ConfigError (bad input), a non-finite loss, a run Stopped by its surroundings (a lost DDP peer, a full disk) or
  an OS error: one `error: ...` line; `-h` / `--help`: the entry point's help (configuration.help_text), status 0;
- a closed pipe on stdout or stderr (`| head`) silences the rest of the output, never the work (QuietPipe); a bad
  environment variable is a ConfigError like a bad flag (configuration.ENVIRONMENT);
- SIGINT and SIGTERM raise Interrupted: one line, status 130 or 143; `uninterrupted` holds them while a checkpoint
  and its log are written together, `hold_signals` while a run stops;
- `require`: an optional package imported with a ConfigError naming what to install.

It imports only configuration.py.
"""

import contextlib
import importlib
import os
import signal
import sys
import threading
import time

from plumbing.configuration import ConfigError, HelpRequested, environment, help_text, torchrun_ranks


class Stopped(RuntimeError):
    """A run stopped by its surroundings, not by its input (a lost DDP peer, a full disk): one `error:` line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised by `cli`'s handlers. `cli` prints its line and exits with 128 + signum (130, 143);
    a run that knows more (train.py: the checkpoint it keeps) raises it again with its own line."""

    def __init__(self, signum, line=None):
        self.signum = signum
        super().__init__(line or f"interrupted by {signal.Signals(signum).name}: no output was left half-written (each "
                                 "is written whole or not at all); run the command again to finish")


def require(module, purpose, package=None):
    """importlib.import_module(module), or a ConfigError naming the package, what needs it (`purpose`) and how to
    install it (package: its pip name, when not the module's own). An ImportError from inside an installed package
    is not caught: that package is broken, not missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != module.split(".")[0]:
            raise
        package = package or e.name
        raise ConfigError(f"the Python package {package}, needed for {purpose}, is not installed: "
                          f"pip install {package} (or pip install -r requirements.txt)") from None


_SIGNALS = {"hold": 0, "held": None}  # hold > 0: a signal is kept in "held" instead of raised


def _on_signal(signum, frame):
    if _SIGNALS["hold"]:
        _SIGNALS["held"] = _SIGNALS["held"] or signum
    else:
        raise Interrupted(signum)


@contextlib.contextmanager
def uninterrupted():
    """Hold SIGINT and SIGTERM within the block (a checkpoint and its log are written together); one received
    meanwhile is raised as Interrupted when the block completes. Without `cli`'s handlers it changes nothing."""
    _SIGNALS["hold"] += 1
    try:
        yield
    finally:
        _SIGNALS["hold"] -= 1
    if not _SIGNALS["hold"] and _SIGNALS["held"]:
        signum, _SIGNALS["held"] = _SIGNALS["held"], None
        raise Interrupted(signum)


def hold_signals():
    """From now on SIGINT and SIGTERM are held, never raised: the process is stopping already, and a second signal
    (torchrun's SIGTERM after a rank was lost) must not cut short the closing of its run directory."""
    _SIGNALS["hold"] += 1


def cli(main, argv=None):
    """Run main(argv or sys.argv[1:]). A ConfigError, a non-finite loss (FloatingPointError), a run Stopped by its
    surroundings or an OS error ends the process with one `error: ...` line; SIGINT and SIGTERM with one line
    (Interrupted) and status 130 or 143. Under torchrun the other ranks of a node wait 5 s before saying a
    ConfigError or FloatingPointError: when every rank fails alike, torchrun stops them once the first rank has
    exited, so the error is said once; an error of their own (the first rank still running) is still said. `-h` or
    `--help` prints the help of main's module (`help_text`) and exits with status 0."""
    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    _SIGNALS.update(hold=0, held=None)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = QuietPipe(sys.stdout), QuietPipe(sys.stderr)
    try:
        torchrun_ranks()  # every environment variable the project reads, checked like a flag
        return main(sys.argv[1:] if argv is None else argv)
    except BaseException as e:
        hold_signals()  # from here on a signal could only replace the line by a traceback
        status = _ending(e, main)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = streams
    sys.exit(status)


class QuietPipe:
    """sys.stdout or sys.stderr as `cli` runs an entry point: when its reader has gone (`python analyze.py | head`,
    a BrokenPipeError), its file descriptor is pointed at /dev/null, so that what is still printed goes nowhere
    instead of stopping the process: the work and its outputs go on, and it ends without a word."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._closed()
        except ValueError:  # closed by its owner
            pass

    def _closed(self):
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture): nothing to silence
            pass

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _ending(e, main):
    """The exit status (or the `error: ...` line) of an exception that ended `cli`'s main; others are raised again."""
    if isinstance(e, HelpRequested):
        print(help_text(sys.modules[main.__module__].__doc__, e.classes))
        return 0
    if isinstance(e, KeyboardInterrupt):  # Interrupted, or a Ctrl-C that came before the handlers
        e = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        print(e, file=sys.stderr, flush=True)
        return 128 + e.signum
    if isinstance(e, Stopped):
        return f"error: {e}"
    if isinstance(e, (ConfigError, FloatingPointError)):
        msg = f"error: {e}"
    elif isinstance(e, OSError):  # a full disk, a file that vanished: say which file and why
        msg = f"error: {e.filename or 'a file'}: {e.strerror or e}: check the path and free space"
    else:
        raise e
    try:
        local_rank = environment("LOCAL_RANK", 0) if torchrun_ranks()[0] is not None else 0
    except ConfigError:  # the error being said may be this very one: said at once
        local_rank = 0
    if local_rank != 0:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's SIGTERM ends this wait, silently
        time.sleep(5)
    return msg
