"""TinyStories from scratch (Codebook Features, Section 5): a 1-layer model in the shape of
roneneldan/TinyStories-1Layer-21M with per-head attention codebooks (k=8 of 10,000 codes); for a GPU.

    python data/prepare.py tinystories                   # once: data/tinystories/{train,val}.bin, GPT-2 BPE
    python train.py config/tinystories.py
    python train.py config/tinystories.py --codebook_sites=mlp --k=100 --out_dir=out-tinystories-mlp  # MLP codebooks
    torchrun --standalone --nproc_per_node=4 train.py config/tinystories.py
    python sample.py --out_dir=out-tinystories --start="Once upon a time"

On a CPU, scaled down (the TinyStories heads in ../shared/data; RESULTS.md's runs: ~20 min on 2 cores, ~40 on one):

    python data/prepare.py tinystories --train=../shared/data/tinystories/tinystories_train_head.txt \\
        --val=../shared/data/tinystories/tinystories_valid_head.txt \\
        --tokenizer=../shared/data/tokenizers/gpt2/r50k_base.tiktoken
    python train.py config/tinystories.py --device=cpu --n_embd=256 --n_head=8 --block_size=256 --batch_size=8 \\
        --gradient_accumulation_steps=1 --max_iters=600 --warmup_iters=50 --eval_interval=200 --eval_iters=20 \\
        --log_interval=50 --codebook_start=300 --kmeans_init=true --out_dir=out-tinystories-cpu
    # no codebooks: --codebook_sites=   MLP codebooks: --codebook_sites=mlp --k=100
    # block 256 holds a prompt and 200 new tokens, so topic steering (steer.py) generates from the cache

1 layer, d=1024, 16 heads of 64, MLP 4096, block 512, GPT-2 BPE (50,257 tokens), learned positions, tied
embeddings. Batch 128 x 512 tokens, split into micro-batches of 32 (its 50k-way logits are the memory).
"""

config = dict(
    out_dir="out-tinystories",
    dataset="data/tinystories",
    n_layer=1,
    n_head=16,
    n_embd=1024,
    block_size=512,
    vocab_size=50257,
    pos_emb="learned",
    tie_weights=True,
    dropout=0.0,
    codebook_sites="attn_heads",  # MLP variant: --codebook_sites=mlp --k=100
    num_codes=10_000,
    k=8,
    # No LayerNorm before the codes: with it on every head's output, the CPU run above ended 0.33 nats above
    # no codebooks (at block 128); without it, 0.06 (at block 256; RESULTS.md). k-means sets the codes' scale.
    codebook_layernorm=False,
    # codebooks from the first step, initialised by k-means on the first batch; the CPU recipe above warms up
    # without them first (--codebook_start=300)
    codebook_start=0,
    kmeans_init=True,
    replace_after=0,
    codebook_lr=None,
    batch_size=128,
    gradient_accumulation_steps=4,
    learning_rate=1e-3,
    min_lr=1e-4,
    beta2=0.95,
    warmup_iters=1000,
    max_iters=20_000,
    eval_interval=1000,
    eval_iters=50,
    log_interval=100,
)
