"""
Answers to the exercises of workshop.ipynb (the notebook imports them when run with WORKSHOP_SOLUTIONS=1, as CI
does). Try the exercises first: each has a check that says what is wrong.
"""

import torch
import torch.nn.functional as F


def codebook_forward(a, codes, k):
    """Exercise 2: a (N, d), codes (M, d) -> out (N, d), idx (N, k), recon (): the sum of the k codes with the
    highest cosine similarity, passed straight through to a, and the reconstruction loss that trains the codes."""
    scores = F.normalize(a.detach(), dim=-1) @ F.normalize(codes.detach(), dim=-1).T  # (N, M) cosine similarities
    idx = scores.topk(k, dim=-1).indices  # (N, k), no gradient through the choice
    q = codes[idx].sum(1)  # (N, d): the sum of the chosen codes
    recon = F.mse_loss(q, a.detach())  # pulls the codes towards the activations
    out = q + a - a.detach()  # straight-through: the value of q, the gradient of a
    return out, idx, recon


def precision_recall(codes, labels, num_labels, num_codes):
    """Exercise 4: codes (N,) chosen at N positions, labels (N,) -> precision, recall (num_labels, num_codes):
    P[l, c] = #(c fires and label l) / #(c fires), R[l, c] = #(c fires and label l) / #(label l); 0 when undefined."""
    both = torch.zeros(num_labels, num_codes).index_put_((labels, codes), torch.ones(len(codes)), accumulate=True)
    fires = both.sum(0, keepdim=True)  # (1, M)
    occurs = both.sum(1, keepdim=True)  # (L, 1)
    return both / fires.clamp(min=1), both / occurs.clamp(min=1)


def jsd(p, q):
    """Exercise 5: Jensen-Shannon divergence in nats between the rows of p and q, (n, K) -> (n,)."""
    m = (p + q) / 2

    def kl(x, y):
        return torch.where(x > 0, x * (x.clamp(min=1e-30) / y.clamp(min=1e-30)).log(), torch.zeros_like(x)).sum(-1)

    return kl(p, m) / 2 + kl(q, m) / 2
