"""
The codebook layer of Codebook Features (Tamkin, Taufeeque, Goodman, ICML 2024, Section 3).

An activation a (..., dim) is replaced by the sum of the k codes, rows of a learned matrix C
(num_codes, dim), that have the highest cosine similarity with a:

    scores = cos(a, C)                       # (N, num_codes), never held for the whole batch at once
    idx    = topk(scores, k)                 # (N, k), no gradient through the choice
    q      = sum_i C[idx_i]                  # (N, dim)
    out    = q + a - a.detach()              # straight-through estimator: d out / d a = identity
    loss   = lambda * MSE(q, a.detach())     # reconstruction loss, trains the codes (lambda = recon_coef = 1)

The codes also learn from the task loss through the lookup `C[idx]`. Grouped codebooks split `dim` into
G slices, each with its own codes and its own top-k (per-head attention codebooks use G = n_head). These plain
equations, written out without chunks or tricks, are RefCodebook in tests/test_codebook.py; this layer must match
it in outputs, indices and gradients.

Departures from the paper's equations and recipe, each measured on the laptop TokFSM run (RESULTS.md, "What
we learned", gives the numbers and why):
- A learned LayerNorm before the lookup (`layernorm`; the authors' code has one per head, here a site's heads share
  one: one per head left the quick recipe's accuracy as it was, with more dead codes, RESULTS.md): at init raw head
  and MLP outputs have norm ~0.3-0.5 against sqrt(d) for N(0, 1) codes; without it the run collapsed (29.7% valid
  transitions against 96.7%). Off for language models (0.33 nats on TinyStories; it would change a pretrained Pythia).
- Codes divided by k at k-means init and dead-code replacement, so that k summed codes match an activation's
  scale (k=4: 40.5% dead codes against 52.1%).
- A warm start (train.py `codebook_start`), then cosine k-means at the switch: from scratch k=1 runs stalled
  near ln 10 (10-12% valid transitions); switched on at step 150 the run reaches 98.1%.
- A faster learning rate for the codes (train.py `codebook_lr`): +1.0 point.
- Dead-code replacement exists but is off by default: it cost 1.2 points.
- MSE averages over the dims too; the authors' sums them, so their lambda = 1 is lambda = d here (their scale: 94.4 %
  valid transitions against 95.9 % on the quick recipe, 97.9 against 98.1 % on the laptop one; RESULTS.md, "Fidelity").

    python codebook.py        # a tiny demo: fit codes to clustered data and print usage

Everything the layer counts lives in registered buffers, so it is saved, loaded and moved with the module. Codes
are chosen, and statistics computed, in fp32 whatever the autocast; statistics are DDP-safe: `sync_counts` all-reduces
counts; k-means gathers every rank's activations (up to KMEANS_MAX_TOKENS) and, like dead-code replacement, is
computed on rank 0 and broadcast.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from plumbing.ddp import distributed, gather_rows, is_rank0, rank0_broadcast


# k-means reads at most this many activations (over all ranks): 64k rows of d=1024 floats are 256 MiB per group
KMEANS_MAX_TOKENS = 65_536


def _distinct_rows(x, m):
    """m starting codes from x (N, d): rows of distinct directions in random order; with fewer than m distinct
    ones, drawn with replacement and jittered by 1 % of their scale. Returns (m, d)."""
    _, inverse = torch.unique(F.normalize(x, dim=-1), dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), x.shape[0], device=x.device)  # first row of each direction
    first = first.scatter_reduce(0, inverse, torch.arange(x.shape[0], device=x.device), "amin")
    rows = x[first]  # (U, d)
    if len(rows) >= m:
        return rows[torch.randperm(len(rows), device=x.device)[:m]]
    init = rows[torch.randint(len(rows), (m,), device=x.device)]
    return init + 0.01 * (x.std() + x.abs().mean() + 1e-6) * torch.randn_like(init)


class CodebookLayer(nn.Module):
    """A (grouped) codebook bottleneck: the sum of the top-k codes by cosine similarity.

    Args:
        dim: activation size d (the last dimension of the input).
        num_codes: codes per group M (>= 1).
        k: codes summed per token and group (1 <= k <= num_codes).
        groups: G slices of `dim`, each with its own M codes (dim % G == 0).
        layernorm: pass each slice through a learned LayerNorm before the lookup (default True; see the
            departures above). The output and the reconstruction target then live in the normalised space.
        chunk_size: (token, group) rows scored at once; the scores of a chunk take chunk_size * M * 4
            bytes. 0 (default) sizes chunks to 32 MiB of scores on CPU (cache-resident: measured faster than
            one big matmul, README) and 256 MiB on GPU.
    Attributes:
        codes: (G, M, d/G) parameter.
        counts: (G, M) int64 buffer, tokens that selected each code in training since creation.
        recent: (G, M) int64 buffer, the same since the last dead-code replacement.
        hook: None or a callable (indices (N, G, k) long) -> indices, applied after the top-k and before
            the output is formed; an index of -1 contributes nothing (used to force or remove codes).
        banned: None or a (G, M) bool tensor of codes that cannot be chosen: their scores are -inf before the
            top-k, so the next best code takes their place (steer.py's "ablate, then take the next best").
        last_indices: (..., G, k) indices chosen by the latest forward.
        recon_loss: scalar reconstruction loss of the latest forward (before lambda).
        bypass: when True the quantization is skipped and the (normalised) activation passes unchanged:
            the same weights without codebooks, and the warm-up phase of training (train.py's codebook_start).
    Raises:
        ValueError for num_codes < 1, k outside [1, num_codes], or dim not divisible by groups.
    """

    def __init__(self, dim, num_codes, k=1, groups=1, layernorm=True, chunk_size=0):
        super().__init__()
        if num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {num_codes}")
        if not 1 <= k <= num_codes:
            raise ValueError(f"k must be in [1, num_codes={num_codes}], got k={k}: lower k or raise num_codes")
        if groups < 1 or dim % groups:
            raise ValueError(f"dim={dim} is not divisible by groups={groups}: pick a divisor of dim")
        self.dim, self.num_codes, self.k, self.groups = dim, num_codes, k, groups
        self.chunk_size = chunk_size
        d = dim // groups
        self.codes = nn.Parameter(torch.randn(groups, num_codes, d))
        self.ln = nn.LayerNorm(d) if layernorm else None  # shared by a site's groups (the authors': one per group)
        self.register_buffer("counts", torch.zeros(groups, num_codes, dtype=torch.long))
        self.register_buffer("recent", torch.zeros(groups, num_codes, dtype=torch.long))
        self.register_buffer("pending", torch.zeros(groups, num_codes, dtype=torch.long), persistent=False)
        self.hook = None
        self.banned = None  # a plain attribute, not a buffer: interventions are not saved with the model
        self.bypass = False  # True: skip the quantization (the LayerNorm, if any, still applies)
        self.kmeans_pending = False  # set by `request_kmeans_init`; runs on the next training forward
        self.kmeans_iters = 10
        self.last_indices = None
        self.recon_loss = None
        self._last_a = None  # the latest training activations, (N, G, d), for dead-code replacement

    def extra_repr(self):
        return f"dim={self.dim}, num_codes={self.num_codes}, k={self.k}, groups={self.groups}"

    @torch.no_grad()
    def topk_codes(self, a, k=None):
        """Indices of the k codes with the highest cosine similarity, scored in chunks, in fp32 whatever the autocast.

        Args:
            a: (N, G, d) activations. k: defaults to self.k.
        Returns:
            (N, G, k) long, best code first.
        """
        k = k or self.k
        N, G, _ = a.shape
        c = F.normalize(self.codes.detach().float(), dim=-1).transpose(1, 2)  # (G, d, M), once per call
        a = a.detach().float().transpose(0, 1).contiguous()  # (G, N, d); |a| does not change a row's ranking
        idx = torch.empty(N, G, k, dtype=torch.long, device=a.device)
        rows = self.chunk_size or (2**23 if a.device.type == "cpu" else 2**26) // self.num_codes
        step = max(1, rows // G)
        # fp32 whatever the autocast (bf16 mm/bmm resolve cosines near 1 to 0.004, coarser than top-2 gaps)
        with torch.autocast(a.device.type, enabled=False):
            for s in range(0, N, step):
                # (G, n, M) scores of one chunk only; one group is a plain matmul (faster than bmm on CPU)
                scores = torch.mm(a[0, s : s + step], c[0]).unsqueeze(0) if G == 1 else torch.bmm(a[:, s : s + step], c)
                if self.banned is not None:  # steering: banned codes lose, the next best take their place
                    scores = scores.masked_fill(self.banned.unsqueeze(1), float("-inf"))
                best = scores.argmax(-1, keepdim=True) if k == 1 else scores.topk(k, dim=-1).indices  # (G, n, k)
                idx[s : s + step] = best.transpose(0, 1)  # (n, G, k)
        return idx

    def flat_indices(self, idx):
        """(N, G, k) code ids -> the same shape as rows of codes.view(G * M, d) (group g's codes start at
        g * M). An index of -1 maps to its group's row 0; callers mask it where it matters."""
        return idx.clamp(min=0) + torch.arange(self.groups, device=idx.device).view(1, -1, 1) * self.num_codes

    def lookup(self, idx, masked=False):
        """Sum of the selected codes: (N, G, k) long -> (N, G, d). With `masked`, index -1 adds nothing."""
        N, G, k = idx.shape
        flat = self.flat_indices(idx).view(N * G, k)
        w = (idx >= 0).to(self.codes.dtype).view(N * G, k) if masked else None
        q = F.embedding_bag(flat, self.codes.view(G * self.num_codes, -1), mode="sum", per_sample_weights=w)
        return q.view(N, G, -1)

    def forward(self, x):
        """x: (..., dim) -> (..., dim), the sum of the top-k codes, straight-through to x."""
        G = self.groups
        a = x.reshape(-1, G, self.dim // G)  # (N, G, d)
        if self.ln is not None:
            a = self.ln(a)
        if self.bypass:
            self.recon_loss = self.last_indices = None
            return a.view(x.shape)
        if self.training and self.kmeans_pending:
            self.kmeans_init(a)
        idx = self.topk_codes(a)  # (N, G, k)
        if self.hook is not None:
            idx = self.hook(idx)
        q = self.lookup(idx, masked=self.hook is not None)  # (N, G, d)
        self.recon_loss = F.mse_loss(q, a.detach())  # trains the codes towards the activations
        out = q + (a - a.detach())  # straight-through: forward value q, gradient identity to a
        self.last_indices = idx.view(*x.shape[:-1], G, idx.shape[-1])
        if self.training:
            self._last_a = a.detach().float()  # statistics in fp32 whatever the autocast
            with torch.no_grad():  # usage counts; -1 (removed by a hook) adds 0 to row 0
                self.pending.view(-1).index_add_(0, self.flat_indices(idx).flatten(), (idx >= 0).long().flatten())
        return out.view(x.shape)

    # ------------------------------------------------------------------ code statistics
    def dead_fraction(self, counts=None):
        """Fraction of codes (over all groups) with zero count; `counts` defaults to self.counts."""
        counts = self.counts if counts is None else counts
        return (counts == 0).float().mean().item()

    # ------------------------------------------------------------------ initialisation and dead codes
    def request_kmeans_init(self, iters=10):
        """Initialise the codes by cosine k-means on the activations of the next training forward."""
        self.kmeans_pending, self.kmeans_iters = True, iters

    @torch.no_grad()
    def kmeans_init(self, a, max_tokens=None):
        """Spherical (cosine) k-means of a (N, G, d) into the codes, in fp32 whatever the autocast.

        Under torch.distributed every rank's activations are gathered (each rank sends at most
        max_tokens // world rows, drawn at random; max_tokens defaults to KMEANS_MAX_TOKENS), rank 0 computes and
        broadcasts. Starting codes are distinct activations (distinct directions: two identical rows, such as the
        BOS position of every sequence, would tie in every argmax and one of them would never win a token); with
        fewer distinct rows than codes they are drawn with replacement and jittered. Centroids are means of their
        members, divided by k: the output sums k codes, so k codes near an activation then add up to its scale
        (cosine scores ignore the factor).
        """
        self.kmeans_pending = False
        with torch.autocast(a.device.type, enabled=False):  # scores and means in fp32, not the autocast dtype
            self._kmeans(gather_rows(a.detach().float(), max_tokens or KMEANS_MAX_TOKENS))  # (N, G, d), every rank

    def _kmeans(self, a):
        """Cosine k-means of a (N, G, d), fp32, into the codes: computed on rank 0 and broadcast."""
        N, G, d = a.shape
        codes = self.codes.data
        if is_rank0():
            codes.copy_(torch.stack([_distinct_rows(a[:, g], self.num_codes) for g in range(G)]))  # (G, M, d)
            for _ in range(self.kmeans_iters):
                flat = self.flat_indices(self.topk_codes(a, k=1)).squeeze(-1)  # (N, G) nearest code's row
                sums = torch.zeros(G * self.num_codes, d, device=a.device)
                sums.index_add_(0, flat.flatten(), a.reshape(N * G, d))
                n = torch.bincount(flat.flatten(), minlength=G * self.num_codes).view(G, -1, 1)
                codes.copy_(torch.where(n > 0, sums.view_as(codes) / n.clamp(min=1), codes))
            codes.div_(self.k)
        rank0_broadcast(codes)

    @torch.no_grad()
    def replace_dead_codes(self, noise=0.1):
        """Replace codes unused since the last call by noisy activations of the latest training batch,
        divided by k (as kmeans_init: k summed codes make one activation).

        Dead codes are those with `recent == 0` (identical on all ranks after `sync_counts`). New vectors
        are drawn on rank 0 and broadcast. Resets `recent`. Returns the number of codes replaced.
        """
        if self._last_a is None:  # no training batch seen yet: nothing to draw from
            return 0
        dead = self.recent == 0  # (G, M)
        n_dead = int(dead.sum())
        if n_dead:
            codes = self.codes.data
            if is_rank0():
                a = self._last_a.transpose(0, 1)  # (G, N, d)
                pick = torch.randint(a.shape[1], (self.groups, self.num_codes), device=a.device)
                new = a.gather(1, pick.unsqueeze(-1).expand(-1, -1, a.shape[-1]))  # (G, M, d)
                new = (new + noise * new.std() * torch.randn_like(new)) / self.k
                codes.copy_(torch.where(dead.unsqueeze(-1), new, codes))
            rank0_broadcast(codes)
        self.recent.zero_()
        return n_dead


@torch.no_grad()
def sync_counts(layers):
    """Fold each layer's pending usage counts into `counts` and `recent`, all-reduced across ranks.

    Call once per optimizer step (train.py does): one collective for all layers, outside the forward.
    """
    layers = list(layers)
    if not layers:
        return
    flat = torch.cat([l.pending.flatten() for l in layers])
    if distributed():
        dist.all_reduce(flat)
    for l, c in zip(layers, flat.split([l.pending.numel() for l in layers])):
        l.counts += c.view_as(l.counts)
        l.recent += c.view_as(l.recent)
        l.pending.zero_()


if __name__ == "__main__":
    torch.manual_seed(0)
    centers = F.normalize(torch.randn(8, 16), dim=-1) * 4  # 8 clusters in 16 dims
    data = centers[torch.randint(8, (4096,))] + 0.1 * torch.randn(4096, 16)
    cb = CodebookLayer(16, num_codes=32, k=1, layernorm=False)
    opt = torch.optim.Adam(cb.parameters(), lr=1e-2)
    for step in range(200):
        cb(data)
        cb.recon_loss.backward()
        opt.step()
        opt.zero_grad()
        sync_counts([cb])
    print(f"reconstruction MSE {cb.recon_loss.item():.4f} (data variance {data.var().item():.2f})")
    print(f"codes used: {int((cb.counts > 0).sum())} of {cb.num_codes}; dead fraction {cb.dead_fraction():.2f}")
