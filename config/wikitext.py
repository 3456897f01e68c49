"""Pythia finetuned on WikiText-103 with codebooks (Codebook Features, Section 5): per-head attention
codebooks in every layer, k=8 of 10,000 codes, block 1024, lr 5e-4; for a GPU.

init_from must name a local Pythia/GPT-NeoX download (config.json + model.safetensors or pytorch_model.bin);
the placeholder below stops with a clear error until it does. Its tokenizer.json is the one to prepare with.
Without network, scripts/random_pythia.py writes a random-weight directory of pythia-70m's shape, which
exercises this whole path (RESULTS.md's run) but learns nothing about Pythia.

    python data/prepare.py pythia --model=EleutherAI/pythia-70m-deduped      # once: data/pythia-70m-deduped
    python data/prepare.py wikitext --tokenizer=data/pythia-70m-deduped/tokenizer.json   # once
    python train.py config/wikitext.py --init_from=data/pythia-70m-deduped
    torchrun --standalone --nproc_per_node=4 train.py config/wikitext.py --init_from=PATH/TO/pythia-410m
    python sample.py --out_dir=out-wikitext --start=" The history of"

On a CPU, scaled down (the WikiText-103 valid/test copies in ../shared/data, a small Pythia):

    python data/prepare.py wikitext --valid=../shared/data/wikitext/wikitext-103/wiki.valid.tokens \\
        --test=../shared/data/wikitext/wikitext-103/wiki.test.tokens \\
        --tokenizer=../shared/data/tokenizers/gpt-neox/tokenizer.json
    python train.py config/wikitext.py --init_from=data/pythia-70m-deduped --device=cpu --block_size=128 \\
        --num_codes=256 --batch_size=4 --gradient_accumulation_steps=1 --max_iters=50 --warmup_iters=5 \\
        --eval_interval=25 --eval_iters=4 --log_interval=5 --out_dir=out-wikitext-cpu

The architecture comes from the checkpoint's config.json; only the codebook settings and block_size may be
set (block_size below Pythia's 2048 shortens the context; rotary positions need no new weights).
"""

config = dict(
    out_dir="out-wikitext",
    init_from="PATH/TO/pythia",  # placeholder: pass --init_from=<local Pythia directory>
    dataset="data/wikitext",
    block_size=1024,
    codebook_sites="attn_heads",  # one codebook per head, on the heads' outputs before attn.c_proj
    codebook_layers="",  # every layer
    num_codes=10_000,
    k=8,
    # No LayerNorm before the codes: it would change the pretrained function even with the codebooks
    # bypassed (and make dloss relative to that changed model). k-means on the first batch instead puts
    # the codes at the activations' scale.
    codebook_layernorm=False,
    codebook_start=0,
    kmeans_init=True,
    # codes and weights both at 5e-4; the authors' config trained the weights at 0.1x:
    # --learning_rate=5e-5 --codebook_lr=5e-4
    learning_rate=5e-4,
    codebook_lr=None,
    min_lr=5e-5,
    warmup_iters=1500,
    max_iters=15_000,
    batch_size=32,
    gradient_accumulation_steps=4,
    eval_interval=500,
    eval_iters=50,
    log_interval=100,
)
