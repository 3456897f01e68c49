"""Write a Pythia-shaped checkpoint with random weights, through transformers, to exercise the
init_from=<Pythia directory> path (GPT.from_pythia, finetuning, sampling) where no weights can be downloaded.

    python scripts/random_pythia.py --out=/tmp/pythia-70m-random            # pythia-70m's shape
    python scripts/random_pythia.py --out=/tmp/pythia-tiny --size=tiny      # 2 layers, d=128: seconds on a CPU
    python train.py config/wikitext.py --init_from=/tmp/pythia-70m-random ...

The directory holds config.json, model.safetensors and a copy of the GPT-NeoX tokenizer.json (if given with
--tokenizer), like a download. transformers is needed here only (requirements-test.txt); the weights are
random, so losses start at about ln(50,304) = 10.8 and say nothing about Pythia itself.
"""

import os
import shutil
import sys
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from a config: no hub
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing.configuration import is_out_dir, parse_config, spec, validate  # noqa: E402
from plumbing.entry import cli  # noqa: E402
from plumbing.rundir import claim, mark  # noqa: E402

# hidden size, layers, heads of the two shapes this script writes
SIZES = {"70m": (512, 6, 8), "tiny": (128, 2, 4)}


def _no_file_or_a_file(path):
    return None if not path or os.path.isfile(path) else "is not a file: check the path"


@dataclass
class RandomPythiaConfig:
    """A random GPT-NeoX; --out is required."""

    out: str = spec("", check=is_out_dir)  # directory to write (created)
    size: str = spec("70m", tuple(sorted(SIZES)))  # the shape: hidden size, layers and heads of SIZES
    tokenizer: str = spec("", check=_no_file_or_a_file)  # a GPT-NeoX tokenizer.json to copy next to the weights
    seed: int = spec(0, ">= 0")

    def __post_init__(self):
        validate(self)
        claim(self.out, "pythia", "out")  # no other kind, no user's folder


def main(argv):
    args = parse_config(argv, RandomPythiaConfig)
    import torch
    import transformers

    torch.manual_seed(args.seed)
    d, n_layer, n_head = SIZES[args.size]
    cfg = transformers.GPTNeoXConfig(
        vocab_size=50304,  # Pythia's padded embedding
        hidden_size=d,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        intermediate_size=4 * d,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.GPTNeoXForCausalLM(cfg).save_pretrained(args.out)
    if args.tokenizer:
        shutil.copy(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    mark(args.out, "pythia")
    print(f"wrote a random {args.size}-shaped GPT-NeoX to {args.out}")


if __name__ == "__main__":
    cli(main)
