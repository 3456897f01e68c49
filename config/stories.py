"""The story language (stories.py): a 1-layer model with k=1 codebooks on its attention heads, the paper's
TinyStories setting (Section 5) scaled down to a laptop (20.7 minutes on 2 CPU cores shared with other jobs).

    python data/prepare.py stories            # once: data/stories/{train,val}.bin, val_truth.npz (seconds)
    python train.py config/stories.py
    python analyze.py --out_dir=out-stories   # codes against the truth (topic, mood)
    python topics.py --out_dir=out-stories    # steer each topic and mood with its best code (Table 3)

1 layer, d=128, 4 heads of 32, block 128 (two stories of ~63 words), word-level tokens (227, padded to 256), tied
embeddings. Codebooks on the attention heads as the paper's TinyStories models (the topic is carried by attention
from the sentence that names it), k=1 of 64 codes per head: fewer codes than token types, so that a code can
stand for a latent value rather than a word (RESULTS.md, "The story language": a 256-code run also learned the mood).
Batch 32 x 128 tokens, 1,500 steps (6.1 M tokens, two passes over the 3.1 M of train.bin), the codebooks switched
on at step 200.
"""

config = dict(
    out_dir="out-stories",
    dataset="data/stories",
    n_layer=1,
    n_head=4,
    n_embd=128,
    block_size=128,
    vocab_size=256,
    codebook_sites="attn_heads",
    num_codes=64,
    k=1,
    codebook_start=200,
    batch_size=32,
    learning_rate=3e-3,
    min_lr=3e-4,
    max_iters=1500,
    eval_interval=500,
    eval_iters=10,
    log_interval=100,
)
