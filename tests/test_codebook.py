"""CodebookLayer against a plain, obviously-correct reference, plus its statistics, hooks and errors."""

import pytest
import torch
import torch.nn.functional as F

from codebook import CodebookLayer, sync_counts


class RefCodebook:
    """The paper's equations, written out: full similarity matrix, torch.topk, an explicit sum of code rows,
    straight-through output and MSE reconstruction loss. Holds its own copies of the codes and LayerNorm."""

    def __init__(self, layer):
        self.k, self.G = layer.k, layer.groups
        self.codes = layer.codes.detach().clone().requires_grad_(True)  # (G, M, d)
        self.ln = None
        if layer.ln is not None:
            self.ln = (layer.ln.weight.detach().clone().requires_grad_(True),
                       layer.ln.bias.detach().clone().requires_grad_(True), layer.ln.eps)

    def __call__(self, x):
        G, M, d = self.codes.shape
        a = x.reshape(-1, G, d)  # (N, G, d)
        if self.ln is not None:
            w, b, eps = self.ln
            mu = a.mean(-1, keepdim=True)
            var = a.var(-1, unbiased=False, keepdim=True)
            a = (a - mu) / torch.sqrt(var + eps) * w + b
        sim = torch.einsum("ngd,gmd->ngm", F.normalize(a.detach(), dim=-1), F.normalize(self.codes.detach(), dim=-1))
        idx = sim.topk(self.k, dim=-1).indices  # (N, G, k)
        q = torch.stack([
            torch.stack([sum(self.codes[g, idx[n, g, i]] for i in range(self.k)) for g in range(G)])
            for n in range(a.shape[0])
        ])  # (N, G, d)
        recon = ((q - a.detach()) ** 2).mean()
        out = q + a - a.detach()  # straight-through
        return out.view(x.shape), idx.view(*x.shape[:-1], G, self.k), recon


# (input shape, dim groups, num_codes, k, chunk_size): chunk rows per step = chunk_size // groups
CASES = [
    ((2, 5, 8), 1, 6, 1, 4096),
    ((2, 5, 8), 1, 6, 2, 3),  # 3 rows per step, N=10 not divisible
    ((21, 12), 3, 5, 1, 12),  # 4 rows per step, N=21 not divisible
    ((3, 7, 12), 3, 9, 3, 1),  # one row per step
    ((1, 13, 16), 4, 7, 2, 20),  # 5 rows per step, N=13
    ((4, 6), 2, 4, 4, 8),  # k == num_codes
]


@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("shape,groups,M,k,chunk", CASES)
def test_matches_reference_outputs_indices_grads(shape, groups, M, k, chunk, layernorm):
    layer = CodebookLayer(shape[-1], M, k=k, groups=groups, layernorm=layernorm, chunk_size=chunk)
    if layernorm:  # non-trivial LayerNorm parameters
        with torch.no_grad():
            layer.ln.weight.uniform_(0.5, 1.5)
            layer.ln.bias.normal_(0, 0.1)
    ref = RefCodebook(layer)
    x = torch.randn(shape, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    g = torch.randn(shape)

    out = layer(x)
    out_r, idx_r, recon_r = ref(xr)
    assert torch.equal(layer.last_indices, idx_r)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(layer.recon_loss, recon_r)

    ((out * g).sum() + 0.7 * layer.recon_loss).backward()
    ((out_r * g).sum() + 0.7 * recon_r).backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.codes.grad, ref.codes.grad)
    if layernorm:
        torch.testing.assert_close(layer.ln.weight.grad, ref.ln[0].grad)
        torch.testing.assert_close(layer.ln.bias.grad, ref.ln[1].grad)


def test_output_is_sum_of_selected_codes():
    layer = CodebookLayer(12, 10, k=3, groups=2, layernorm=True)
    x = torch.randn(4, 5, 12)
    out = layer(x)
    idx = layer.last_indices  # (4, 5, 2, 3)
    assert idx.shape == (4, 5, 2, 3)
    codes = layer.codes.detach()
    expected = torch.zeros(4, 5, 2, 6)
    for i in range(3):
        for grp in range(2):
            expected[:, :, grp] += codes[grp][idx[:, :, grp, i]]
    torch.testing.assert_close(out.detach(), expected.view(4, 5, 12))
    # the k indices are distinct and best first
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()


def test_straight_through_gradient_is_identity_without_layernorm():
    layer = CodebookLayer(8, 16, k=2, groups=2, layernorm=False)
    x = torch.randn(3, 4, 8, requires_grad=True)
    g = torch.randn(3, 4, 8)
    layer(x).backward(g)
    assert torch.equal(x.grad, g)


def test_task_gradient_reaches_only_selected_codes():
    layer = CodebookLayer(6, 8, k=2, groups=1, layernorm=False)
    x = torch.randn(5, 6)
    layer(x).sum().backward()
    sel = torch.bincount(layer.last_indices.flatten(), minlength=8).float()  # times each code was summed
    expected = sel.view(8, 1).expand(8, 6).unsqueeze(0)  # d sum(out) / d code = (times selected) * ones
    assert torch.equal(layer.codes.grad, expected)
    assert (layer.codes.grad[0, sel == 0] == 0).all() and (sel == 0).any()


@pytest.mark.parametrize("groups", [1, 2])
def test_recon_gradient_is_analytic_mse(groups):
    layer = CodebookLayer(8, 6, k=1, groups=groups, layernorm=False)
    x = torch.randn(7, 8)
    layer(x)
    layer.recon_loss.backward()
    d = 8 // groups
    a = x.view(7, groups, d)
    idx = layer.last_indices.view(7, groups)
    q = layer.codes.detach()[torch.arange(groups), idx]  # (7, G, d)
    expected = torch.zeros(groups, 6, d)
    for n in range(7):
        for grp in range(groups):
            expected[grp, idx[n, grp]] += 2 * (q[n, grp] - a[n, grp]) / (7 * 8)
    torch.testing.assert_close(layer.codes.grad, expected)
    unused = torch.ones(groups, 6, dtype=torch.bool)
    unused[torch.arange(groups).view(1, -1), idx] = False
    assert (layer.codes.grad[unused] == 0).all()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_scoring_equals_unchunked(chunk):
    big = CodebookLayer(16, 50, k=3, groups=2, chunk_size=10**9)
    small = CodebookLayer(16, 50, k=3, groups=2, chunk_size=chunk)
    small.load_state_dict(big.state_dict())
    x = torch.randn(37, 16)
    out_big, out_small = big(x), small(x)
    assert torch.equal(big.last_indices, small.last_indices)
    assert torch.equal(out_big, out_small)


def test_counts_after_sync_match_bincount_and_only_in_train_mode():
    layer = CodebookLayer(8, 5, k=2, groups=2)
    G, M = 2, 5
    expected = torch.zeros(G, M, dtype=torch.long)
    for _ in range(2):  # pending accumulates over forwards until sync
        layer(torch.randn(6, 8))
        for grp in range(G):
            expected[grp] += torch.bincount(layer.last_indices[:, grp].flatten(), minlength=M)
    assert (layer.counts == 0).all()  # nothing before sync
    sync_counts([layer])
    assert torch.equal(layer.counts, expected)
    assert torch.equal(layer.recent, expected)
    assert expected.sum() == 2 * 6 * G * 2

    layer.eval()
    layer(torch.randn(6, 8))
    sync_counts([layer])
    assert torch.equal(layer.counts, expected)

    layer.train()
    layer(torch.randn(3, 8))
    new = torch.stack([torch.bincount(layer.last_indices[:, grp].flatten(), minlength=M) for grp in range(G)])
    sync_counts([layer])
    assert torch.equal(layer.counts, expected + new)
    assert layer.dead_fraction() == pytest.approx(((expected + new) == 0).float().mean().item())


def test_replace_dead_codes_touches_exactly_dead_rows():
    layer = CodebookLayer(8, 40, k=1, groups=2, layernorm=False)
    layer(torch.randn(10, 8))  # 10 tokens cannot use all 40 codes of a group
    sync_counts([layer])
    dead = layer.recent == 0
    assert dead.any() and (~dead).any()
    before = layer.codes.detach().clone()
    n = layer.replace_dead_codes()
    after = layer.codes.detach()
    assert n == int(dead.sum())
    assert torch.equal(after[~dead], before[~dead])  # bitwise unchanged
    assert (after[dead] != before[dead]).any(-1).all()  # every dead row changed
    assert (layer.recent == 0).all()
    assert layer.counts.sum() == 10 * 2  # counts are not reset


def test_replaced_codes_come_from_activations():
    layer = CodebookLayer(4, 30, k=1, groups=1, layernorm=False)
    x = torch.randn(20, 4) + 5.0  # far from the N(0, 1) initial codes
    layer(x)
    sync_counts([layer])
    dead = layer.recent[0] == 0
    layer.replace_dead_codes(noise=0.0)
    rows = layer.codes.detach()[0, dead]
    assert (rows.unsqueeze(1) == x.unsqueeze(0)).all(-1).any(1).all()  # each new code is a token's activation


def _clustered(n_clusters=6, d=8, n=600, spread=0.05):
    centers = F.normalize(torch.randn(n_clusters, d), dim=-1) * 3
    return centers[torch.arange(n) % n_clusters] + spread * torch.randn(n, d)


@pytest.mark.parametrize("k", [1, 3])
def test_kmeans_init_codes_are_means_of_assigned_points(k):
    x = _clustered()
    layer = CodebookLayer(8, 6, k=k, layernorm=False)
    layer.eval()
    layer.request_kmeans_init(iters=20)
    layer(x)
    assert layer.kmeans_pending  # only a training forward runs it
    layer.train()
    layer(x)
    assert not layer.kmeans_pending
    codes = layer.codes.detach()[0]
    assign = layer.topk_codes(x.view(-1, 1, 8), k=1).view(-1)
    for m in assign.unique().tolist():  # divided by k, the number of codes the output sums
        torch.testing.assert_close(k * codes[m], x[assign == m].mean(0), atol=1e-5, rtol=1e-5)


def test_kmeans_init_k_codes_sum_to_the_activation_scale():
    """One tight cluster and k = num_codes = 4: every token sums all 4 codes, which add up to the token."""
    x = _clustered(n_clusters=1, spread=0.01)
    layer = CodebookLayer(8, 4, k=4, layernorm=False)
    layer.request_kmeans_init()
    out = layer(x)
    assert layer.recon_loss < 1e-3 * x.pow(2).mean()
    torch.testing.assert_close(out.detach(), x, atol=0.05, rtol=0)


def test_kmeans_init_reduces_recon_error_vs_random_init():
    x = _clustered()
    rand = CodebookLayer(8, 12, k=1, layernorm=False)
    km = CodebookLayer(8, 12, k=1, layernorm=False)
    km.load_state_dict(rand.state_dict())
    rand(x)
    km.request_kmeans_init()
    km(x)
    assert km.recon_loss < 0.2 * rand.recon_loss


def test_hook_forcing_a_code():
    layer = CodebookLayer(8, 10, k=1, groups=2)
    x = torch.randn(5, 8)
    plain = layer(x).detach()
    j = 7
    layer.hook = lambda idx: torch.full_like(idx, j)
    out = layer(x).detach()
    assert (layer.last_indices == j).all()
    assert not torch.equal(out, plain)
    torch.testing.assert_close(out, layer.codes.detach()[:, j].reshape(1, 8).expand(5, 8))


def test_hook_returning_minus_one_removes_contribution():
    layer = CodebookLayer(8, 10, k=2, groups=1, layernorm=False)
    x = torch.randn(5, 8)

    def drop_second(idx):
        idx = idx.clone()
        idx[..., 1] = -1
        return idx

    layer.hook = drop_second
    out = layer(x).detach()
    first = layer.last_indices[:, 0, 0]
    torch.testing.assert_close(out, layer.codes.detach()[0, first])

    sync_counts([layer])
    assert layer.counts.sum() == 5  # only the first code of each token was counted
    layer.counts.zero_()
    layer.hook = lambda idx: torch.full_like(idx, -1)
    out = layer(x).detach()
    assert torch.equal(out, torch.zeros_like(out))
    sync_counts([layer])
    assert (layer.counts == 0).all()  # removed codes are not counted (not even as code 0)


def test_bypass_skips_only_the_quantization():
    x = torch.randn(3, 8)
    plain = CodebookLayer(8, 10, layernorm=False)
    plain.bypass = True
    assert torch.equal(plain(x), x)  # without a LayerNorm: the identity
    assert plain.recon_loss is None and plain.last_indices is None
    normed = CodebookLayer(8, 10, groups=2, layernorm=True)
    with torch.no_grad():
        normed.ln.weight.uniform_(0.5, 2.0)
        normed.ln.bias.normal_()
    normed.bypass = True
    expected = normed.ln(x.view(3, 2, 4)).view(3, 8)  # the LayerNorm still applies, per group
    assert torch.equal(normed(x), expected)


@pytest.mark.parametrize("kwargs", [
    dict(dim=8, num_codes=0), dict(dim=8, num_codes=4, k=5), dict(dim=8, num_codes=4, k=0),
    dict(dim=10, num_codes=4, groups=3),
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        CodebookLayer(**kwargs)


def test_state_dict_holds_counts_and_recent_and_to_moves_them():
    layer = CodebookLayer(8, 6, groups=2)
    layer(torch.randn(9, 8))
    sync_counts([layer])
    sd = layer.state_dict()
    assert {"codes", "counts", "recent"} <= set(sd)
    other = CodebookLayer(8, 6, groups=2)
    other.load_state_dict(sd)
    assert torch.equal(other.counts, layer.counts) and torch.equal(other.recent, layer.recent)
    layer.to("meta")
    assert layer.counts.device.type == "meta" and layer.recent.device.type == "meta"
    assert layer.codes.device.type == "meta"


def test_small_chunk_bounds_score_memory():
    N, M, chunk = 4096, 2048, 256
    layer = CodebookLayer(16, M, k=1, layernorm=False, chunk_size=chunk).eval()
    x = torch.randn(N, 16)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        out = layer(x)
    assert out.shape == (N, 16)
    largest = max(e.cpu_memory_usage for e in prof.events())  # the biggest allocation of any one op
    assert largest > 0  # the profiler did record allocations
    assert largest <= 2 * chunk * M * 4 < N * M * 4 // 4
