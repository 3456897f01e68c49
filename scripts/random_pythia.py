"""Write a Pythia-shaped checkpoint with random weights, through transformers, to exercise the
init_from=<Pythia directory> path (GPT.from_pythia, finetuning, sampling) where no weights can be downloaded.

    python scripts/random_pythia.py --out=/tmp/pythia-70m-random            # pythia-70m's shape
    python scripts/random_pythia.py --out=/tmp/pythia-tiny --size=tiny      # 2 layers, d=128: seconds on a CPU
    python train.py config/wikitext.py --init_from=/tmp/pythia-70m-random ...

The directory holds config.json, model.safetensors and a copy of the GPT-NeoX tokenizer.json (if given with
--tokenizer), like a download. transformers is needed here only (requirements-test.txt); the weights are
random, so losses start at about ln(50,304) = 10.8 and say nothing about Pythia itself.
"""

import argparse
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # build from a config: no hub

# hidden size, layers, heads of the two shapes this script writes
SIZES = {"70m": (512, 6, 8), "tiny": (128, 2, 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write (created)")
    p.add_argument("--size", choices=sorted(SIZES), default="70m")
    p.add_argument("--tokenizer", default="", help="a GPT-NeoX tokenizer.json to copy next to the weights")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
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
    print(f"wrote a random {args.size}-shaped GPT-NeoX to {args.out}")


if __name__ == "__main__":
    main()
