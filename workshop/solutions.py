"""
Answers to the exercises of workshop/workshop.ipynb (the notebook imports them when run with WORKSHOP_SOLUTIONS=1, as CI
does, and a learner who is stuck can import one to go on). Try the exercises first: each has a check that says what
is wrong.
"""

import torch
import torch.nn.functional as F

import steer


def codebook_forward(a, codes, k):
    """Exercise 2.1: a (N, d), codes (M, d) -> out (N, d), idx (N, k), recon (): the sum of the k codes with the
    highest cosine similarity, passed straight through to a, and the reconstruction loss that trains the codes."""
    scores = F.normalize(a.detach(), dim=-1) @ F.normalize(codes.detach(), dim=-1).T  # (N, M) cosine similarities
    idx = scores.topk(k, dim=-1).indices  # (N, k), no gradient through the choice
    q = codes[idx].sum(1)  # (N, d): the sum of the chosen codes
    recon = F.mse_loss(q, a.detach())  # mean over N * d coordinates; pulls the codes towards the activations
    out = q + a - a.detach()  # straight-through: the value of q, the gradient of a
    return out, idx, recon


def kmeans_codes(a, init, k, iters):
    """Exercise 2.2: cosine k-means of a (N, d) from init (M, d) -> codes (M, d): `iters` rounds of assigning each
    row to the code of highest cosine similarity and moving each code to the mean of its rows (a code without rows
    keeps its value), then divided by k."""
    codes = init.clone()
    for _ in range(iters):
        best = (F.normalize(a, dim=-1) @ F.normalize(codes, dim=-1).T).argmax(1)  # (N,) each row's code
        n = torch.bincount(best, minlength=len(codes)).unsqueeze(1)  # (M, 1) members per code
        sums = torch.zeros_like(codes).index_add_(0, best, a)  # (M, d)
        codes = torch.where(n > 0, sums / n.clamp(min=1), codes)
    return codes / k  # k codes are summed per token


def layer_forward(layer, x):
    """Exercise 3.1: the forward of a trained CodebookLayer with one group, x (..., d) -> (..., d), written with
    codebook_forward: the layer's LayerNorm, then the codes; the chosen codes and the loss stored as the layer does."""
    a = layer.ln(x.reshape(-1, layer.dim))  # (N, d): the codes live after the LayerNorm
    out, idx, layer.recon_loss = codebook_forward(a, layer.codes[0], layer.k)
    layer.last_indices = idx.view(*x.shape[:-1], 1, layer.k)  # (..., G=1, k)
    return out.view(x.shape)


def precision_recall(codes, labels, num_labels, num_codes):
    """Exercise 4.1: codes (N,) chosen at N positions, labels (N,) -> precision, recall (num_labels, num_codes):
    P[l, c] = #(c fires and label l) / #(c fires), R[l, c] = #(c fires and label l) / #(label l); 0 when undefined."""
    both = torch.zeros(num_labels, num_codes).index_put_((labels, codes), torch.ones(len(codes)), accumulate=True)
    fires = both.sum(0, keepdim=True)  # (1, M)
    occurs = both.sum(1, keepdim=True)  # (L, 1)
    return both / fires.clamp(min=1), both / occurs.clamp(min=1)


def jsd(p, q):
    """Exercise 5.1: Jensen-Shannon divergence in nats between the rows of p and q, (n, K) -> (n,)."""
    m = (p + q) / 2

    def kl(x, y):
        return torch.where(x > 0, x * (x.clamp(min=1e-30) / y.clamp(min=1e-30)).log(), torch.zeros_like(x)).sum(-1)

    return kl(p, m) / 2 + kl(q, m) / 2


def swap(model, fsm, ctx_a, ctx_b, sites):
    """Exercise 5.2: contexts ctx_a, ctx_b (n, T) ending in states A and B -> the next-state distribution (n, S + 1)
    of A's contexts with the codes that B's context chose patched into the codebooks `sites`, at A's digits and the
    next state's digits (positions T - D to T + D - 2)."""
    T, D = ctx_a.shape[1], fsm.digits
    _, _, codes_b = steer.next_state_dist(model, fsm, ctx_b, return_codes=True)  # {site: (rows, T + D - 1, G, k)}
    patch = {}
    for site in sites:
        patch[site] = torch.full_like(codes_b[site], -2)  # -2: the model's own choice
        patch[site][:, T - D : T + D - 1] = codes_b[site][:, T - D : T + D - 1]
    return steer.next_state_dist(model, fsm, ctx_a, patch)[0]


def sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, var):
    """Exercise 6.1: a TopK SAE (Gao et al. 2024; sae.py) on x (N, d) with M latents: W_enc, W_dec (M, d), b_enc
    (M,), b_dec (d,), var () the data's variance -> x_hat (N, d), z (N, M) with at most k non-zero latents per row,
    loss () = MSE(x_hat, x) / var (the FVU)."""
    z_pre = (x - b_dec) @ W_enc.T + b_enc  # (N, M): the decoder's bias is subtracted before encoding
    top = z_pre.topk(k, dim=-1)  # the k largest pre-activations
    z = torch.zeros_like(z_pre).scatter(1, top.indices, F.relu(top.values))  # (N, M), negative ones zeroed
    x_hat = z @ W_dec + b_dec  # (N, d)
    return x_hat, z, (x_hat - x).square().mean() / var


def best_code(codes, labels, where, value, num_values, num_codes):
    """Exercise 7.1: codes (N,) of one head, labels (N,) the story's topic at each token, where (N,) bool the tokens
    where the topic decides the next word -> (code, precision, recall): the code with the highest F1 for `value`,
    counted at those tokens only (Exercise 4.1's precision_recall there)."""
    P, R = precision_recall(codes[where], labels[where], num_values, num_codes)
    p, r = P[value], R[value]  # (M,)
    f1 = torch.where(p + r > 0, 2 * p * r / (p + r), torch.zeros_like(p))
    c = int(f1.argmax())
    return c, p[c].item(), r[c].item()


def code_meaning(analysis_dir, book, code):
    """Exercise 7.2: what code `code` of `book` means, read from analyze.py's stories.json beside the explorer page:
    the topic or mood whose best code (by F1 where it decides the next word) it is, else ""."""
    import json
    import os

    with open(os.path.join(analysis_dir, "stories.json")) as f:
        summary = json.load(f)
    found = [x["value"] for latent in ("topic", "mood") for x in summary[latent]["values"]
             if x["book"] == book and x["code"] == code]
    return found[0] if found else ""
