"""How a script runs, kept apart from the method: configuration and `--help` (configuration.py), how a script
ends (entry.py), users' files and atomic outputs (files.py), run directories and checkpoints (rundir.py), memory
estimates (memory.py), torch.distributed (ddp.py), token files and tokenizers (tokens.py), progress bars
(progress.py). Nothing here imports a concept file."""
