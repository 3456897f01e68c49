"""The quick TokFSM recipe under its own name: since it became the default, `python train.py config/quick.py`
is `python train.py --out_dir=out-quick` (README, "Results on TokFSM"; its calibration in RESULTS.md).

    python train.py config/quick.py

k=1 codebooks on every attention head and every MLP, d=64 (4 heads of 16), 256 codes, the switch at step 200,
codes at lr 0.3 against the network's 5e-3, 1,700 steps, one evaluation at the end on 512 sequences: ~95.8 %
valid transitions in ~2 minutes on 2 CPU cores. The slower 98 % recipe is config/laptop.py.
"""

config = dict(
    out_dir="out-quick",
)
