"""How a script runs, kept apart from the method: configuration and `--help` (configuration.py), how a script
ends (entry.py), users' files and atomic outputs (files.py), run directories and checkpoints (rundir.py), memory
estimates (memory.py), torch.distributed (ddp.py), token files and tokenizers (tokens.py), progress bars
(progress.py). Nothing here imports a concept file.

Every entry point imports plumbing before torch: a Ctrl-C while torch is still loading (before entry.cli holds the
signals) then ends in one line too, by the hook below, instead of a traceback through the import machinery. The
hook is set only where the script running is one of this repository's (not in a notebook or a test runner)."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _starting_interrupted(kind, value, tb, default=sys.excepthook):
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted by SIGINT while starting: nothing was written; run the command again", file=sys.stderr)
    else:
        default(kind, value, tb)


_main = os.path.abspath(getattr(sys.modules.get("__main__"), "__file__", None) or os.devnull)
if os.path.dirname(_main) in (_ROOT, os.path.join(_ROOT, "scripts"), os.path.join(_ROOT, "data")):
    sys.excepthook = _starting_interrupted
