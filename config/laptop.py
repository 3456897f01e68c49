"""The laptop TokFSM recipe: k=1 codebooks on every attention head and every MLP, 98.1 % valid transitions in
~8-9 minutes on 2 CPU cores (README, "Results on TokFSM"). It was the default before the quick recipe became it;
only the values that differ from the defaults (the quick recipe) are here.

    python train.py config/laptop.py
    python train.py config/laptop.py --codebook_sites= --out_dir=out-laptop-nocb   # the same without codebooks
    python train.py config/laptop.py --k=4 --out_dir=out-laptop-k4                 # k = 4

d=128 (4 heads of 32), 1,000 codes per head and per MLP, the switch at step 150 (just as the loss leaves ln 10;
RESULTS.md, "Where to switch"), the codes at lr 1e-2 against the network's 3e-3, 3,000 steps, an evaluation every
500 on 2,048 fixed sequences.
"""

config = dict(
    out_dir="out-laptop",
    n_embd=128,
    num_codes=1000,
    codebook_start=150,
    learning_rate=3e-3,
    codebook_lr=1e-2,
    max_iters=3000,
    eval_interval=500,
    eval_seqs=2048,
)
