"""k-means under torch.distributed, for test_train_paths.test_kmeans_gathers_every_rank.

    torchrun --standalone --nproc_per_node=2 tests/ddp_kmeans_worker.py OUT_DIR

Each rank makes its own activations (seeded by its rank), saves them as OUT_DIR/a{RANK}.pt, runs
CodebookLayer.kmeans_init on them with rank 0's RNG seeded 0, and saves its codes as OUT_DIR/codes{RANK}.pt.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from codebook import CodebookLayer  # noqa: E402

if __name__ == "__main__":
    out, rank = sys.argv[1], int(os.environ["RANK"])
    dist.init_process_group("gloo")
    a = torch.randn(40, 1, 8, generator=torch.Generator().manual_seed(100 + rank))
    torch.save(a, os.path.join(out, f"a{rank}.pt"))
    torch.manual_seed(0)
    cb = CodebookLayer(8, num_codes=16, layernorm=False)
    cb.kmeans_iters = 4
    cb.kmeans_init(a)
    torch.save(cb.codes.data, os.path.join(out, f"codes{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
