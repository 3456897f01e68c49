"""The paper's TokFSM run (Codebook Features, arXiv 2310.17230, Section 4.1 and Appendix): for a GPU.

    python train.py config/fsm.py
    torchrun --standalone --nproc_per_node=4 train.py config/fsm.py

4 layers, d=128, 4 heads, MLP 512, block 128; per-head attention and MLP codebooks in every layer,
k=1 from 10,000 codes; batch 512, lr 1e-3, 20k steps.

Sources, cited beside each value: [yaml] the authors' training config, codebook_features/config/fsm_main.yaml in
github.com/taufeeque9/codebook-features; [tut] their tutorials/tokfsm.ipynb, which loads their released model
(taufeeque/TokFSM_k1_codebook_model) into a GPTNeoXConfig of these sizes; [hf] a default of transformers'
TrainingArguments or GPTNeoXConfig that the yaml leaves unset. Every departure from them says so beside the value
("departs:"). Not set here, and equal to theirs: the vocabulary (11), no dropout, biases, LayerNorm eps 1e-5,
gradient clipping at 1.0 [hf], the FSM's sizes, 100 states with 10 successors each, fsm_seed 42 [yaml] (the
transition table is drawn by fsm.py's own generator, so it is another machine of the same sizes than theirs).
"""

config = dict(
    out_dir="out-fsm",
    # the model [yaml model_config_args, tut]: GPT-NeoX, hidden 128, intermediate 512, 4 layers, 4 heads, seq_len 128
    n_layer=4,
    n_head=4,
    n_embd=128,
    n_inner=512,
    block_size=128,
    pos_emb="learned",  # departs: GPT-NeoX rotates 25 % of each head's dims (rotary base 1e4); "rotary" is here too
    parallel_residual=False,  # departs: GPT-NeoX adds attention and MLP in parallel [hf use_parallel_residual]
    tie_weights=True,  # departs: GPT-NeoX unties the output layer from the embedding [hf tie_word_embeddings]
    # the codebooks [yaml codebook_args]: "group" codebooks at attn_preproj, one per head, and one at the mlp
    codebook_sites="attn_heads,mlp",
    num_codes=10_000,  # departs: the yaml has num_codes 1000; 10,000 is this preset's since it was written
    k=1,  # [yaml k_codebook: [1, 1]]
    codebook_layernorm=True,  # [yaml] the authors' codebook layer always normalises its input (see codebook.py)
    recon_coef=1.0,  # departs in scale: their aeloss sums the squared error over dims, so theirs is 128 here
    # the paper trains with its codebooks from the first step; the laptop recipe (README) instead warms up
    # without them until the loss starts to leave ln 10 (step 150 there): add --codebook_start=N
    # --kmeans_init=true --codebook_lr=1e-2, N the step where this run's loss starts to fall below ln 10
    codebook_start=0,
    kmeans_init=False,  # [yaml kmeans_init: False]
    replace_after=0,  # [yaml replace_after_steps: 0]
    codebook_lr=None,  # the network's rate [yaml: one learning_rate, model_lr_factor 1]
    # optimisation [yaml training_args]
    batch_size=512,  # [yaml per_device_train_batch_size: 512] global here: on N GPUs theirs is N x 512
    learning_rate=1e-3,  # [yaml]
    lr_schedule="cosine",  # departs: the yaml's is constant, no warmup (lr_scheduler_type, warmup_ratio 0)
    min_lr=1e-4,  # departs with the cosine: its floor
    warmup_iters=500,  # departs: no warmup in the yaml
    weight_decay=0.1,  # departs: 0 in theirs [hf weight_decay]; here on weight matrices only, never codes
    beta2=0.99,  # departs: 0.999 in theirs [hf adam_beta2]
    max_iters=20_000,  # [yaml max_steps]
    eval_interval=1000,  # departs: theirs evaluates every 500 and keeps the best checkpoint; here the last
    eval_seqs=2048,  # [yaml max_eval_samples]
    log_interval=100,
)
