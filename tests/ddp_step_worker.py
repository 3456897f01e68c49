"""Run the real train.py loop under torchrun and record, on each rank, a hash of its training state after every
optimizer step and its own training losses, for test_reliability.test_ddp_ranks_agree_after_every_step.

    torchrun --standalone --nproc_per_node=2 tests/ddp_step_worker.py DUMP_DIR --key=value ...

train.main is run unchanged. GPT is subclassed to keep a handle on the model and its optimizer and to record the
loss terms of each training forward; train.get_lr, which the loop calls at the top of every iteration (after the
previous step, its count sync and any dead-code replacement), is wrapped to hash the state there; the state after
the last step is hashed once main returns. Each rank writes DUMP_DIR/rank{RANK}.json:
{"hashes": [{"iter", "params", "codes", "counts", "buffers", "optimizer"}, ...], "losses": [[loss, ce, recon], ...]}.
"""

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402

built, optimizers, losses, hashes = [], [], [], []


class RecordingGPT(train.GPT):
    def __init__(self, config):
        super().__init__(config)
        built.append(self)

    def configure_optimizers(self, *args, **kwargs):
        optimizers.append(super().configure_optimizers(*args, **kwargs))
        return optimizers[-1]

    def forward(self, idx, targets=None, cache=None, last_only=False):
        logits, loss, terms = super().forward(idx, targets, cache, last_only)
        if self.training and targets is not None:
            losses.append([loss.item(), terms["ce"].item(), terms["recon"].item()])
        return logits, loss, terms


def digest(tensors):
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def state_hashes(it):
    model, opt = built[0], optimizers[0]
    params = sorted(model.named_parameters())
    buffers = sorted(model.named_buffers())  # counts, recent and the (synced, zeroed) pending counts
    opt_state = sorted((f"{i}.{k}", v) for i, s in opt.state_dict()["state"].items() for k, v in s.items())
    return {"iter": it, "params": digest(params), "codes": digest([p for p in params if p[0].endswith(".codes")]),
            "counts": digest([b for b in buffers if b[0].endswith((".counts", ".recent"))]),
            "buffers": digest(buffers), "optimizer": digest(opt_state)}


def get_lr(it, cfg, _get_lr=train.get_lr):
    hashes.append(state_hashes(it))
    return _get_lr(it, cfg)


if __name__ == "__main__":
    dump_dir, argv = sys.argv[1], sys.argv[2:]
    train.GPT, train.get_lr = RecordingGPT, get_lr
    train.main(argv)  # ends with dist.barrier() and dist.destroy_process_group() on every rank
    hashes.append(state_hashes(hashes[-1]["iter"] + 1))
    with open(os.path.join(dump_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"hashes": hashes, "losses": losses}, f)
