"""GPT with codebooks: shapes, causality, the loss terms, cached generation, config checks, optimizer groups."""

import pytest
import torch
import torch.nn.functional as F

from codebook import CodebookLayer
from model import GPT, GPTConfig


def tiny(**kw):
    cfg = dict(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=16, num_codes=8, k=1, codebook_sites="")
    cfg.update(kw)
    return GPTConfig(**cfg)


@pytest.mark.parametrize("sites", ["", "attn_heads,mlp", "attn", "attn_heads,attn,mlp"])
def test_output_shapes(sites):
    model = GPT(tiny(codebook_sites=sites, k=2))
    idx = torch.randint(11, (3, 10))
    logits, loss, terms = model(idx)
    assert logits.shape == (3, 10, 11) and loss is None and terms == {}
    logits, loss, terms = model(idx, idx)
    assert logits.shape == (3, 10, 11) and loss.shape == () and set(terms) == {"ce", "recon"}
    for _, cb in model.codebooks():
        assert cb.last_indices.shape == (3, 10, cb.groups, 2)


def test_too_long_sequence_raises():
    model = GPT(tiny())
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("sites", ["", "attn_heads,mlp", "attn"])
@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
@pytest.mark.parametrize("parallel", [False, True])
def test_causal(sites, pos_emb, parallel):
    model = GPT(tiny(codebook_sites=sites, pos_emb=pos_emb, parallel_residual=parallel, rotary_pct=0.5)).eval()
    idx = torch.randint(11, (2, 12))
    t = 7
    other = idx.clone()
    other[:, t:] = (idx[:, t:] + 1 + torch.randint(9, idx[:, t:].shape)) % 11  # every future token differs
    a, _, _ = model(idx)
    b, _, _ = model(other)
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_rotary_positions_matter():
    model = GPT(tiny(pos_emb="rotary", rotary_pct=1.0)).eval()
    assert model.transformer.wpe is None
    idx = torch.tensor([[3, 5, 3, 5, 3, 5]])
    logits, _, _ = model(idx)
    assert not torch.allclose(logits[0, 2], logits[0, 4])  # same token and history pattern, other position


def test_loss_is_ce_plus_coef_times_recon():
    model = GPT(tiny(codebook_sites="attn_heads,attn,mlp", recon_coef=0.3))
    idx = torch.randint(11, (2, 9))
    y = torch.randint(11, (2, 9))
    y[0, 3] = -1  # ignored
    logits, loss, terms = model(idx, y)
    mask = y != -1
    ce = F.cross_entropy(logits[mask], y[mask])
    recons = [cb.recon_loss for _, cb in model.codebooks()]
    assert len(recons) == 2 * 3
    recon = sum(recons)
    torch.testing.assert_close(terms["ce"], ce.detach())
    torch.testing.assert_close(terms["recon"], recon.detach())
    torch.testing.assert_close(loss, ce + 0.3 * recon)
    assert not terms["ce"].requires_grad and not terms["recon"].requires_grad
    assert recon > 0


def test_loss_without_codebooks_or_bypassed_is_ce():
    model = GPT(tiny(codebook_sites="mlp"))
    idx = torch.randint(11, (2, 9))
    for _, cb in model.codebooks():
        cb.bypass = True
    logits, loss, terms = model(idx, idx)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 11), idx.view(-1)))
    assert terms["recon"] == 0


def greedy_reference(model, idx, n):
    """Greedy decoding recomputing the full (cropped) forward at every step: no cache."""
    for _ in range(n):
        logits, _, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


@pytest.mark.parametrize("sites", ["", "attn_heads,mlp"])
@pytest.mark.parametrize("pos_emb", ["learned", "rotary"])
@pytest.mark.parametrize("n_new", [5, 14])  # 14 runs past block_size=16 from a 4-token prompt
def test_cached_greedy_generation_equals_uncached(sites, pos_emb, n_new):
    model = GPT(tiny(codebook_sites=sites, pos_emb=pos_emb)).eval()
    with torch.no_grad():  # a random tiny model is near-uniform: sharpen it so greedy choices are clear
        model.lm_head.weight.mul_(50)
    prompt = torch.randint(11, (3, 4))
    out = model.generate(prompt, n_new, temperature=0)
    assert out.shape == (3, 4 + n_new)
    assert torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        assert torch.equal(out, greedy_reference(model, prompt, n_new))


def test_cached_logits_equal_full_forward():
    model = GPT(tiny(codebook_sites="attn_heads,mlp", pos_emb="rotary")).eval()
    idx = torch.randint(11, (2, 10))
    with torch.no_grad():
        full, _, _ = model(idx)
        cache = [dict() for _ in model.transformer.h]
        steps = [model(idx[:, :4], cache=cache)[0]]
        for t in range(4, 10):
            steps.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_last_only_logits_are_the_last_position_of_the_full_forward():
    model = GPT(tiny(codebook_sites="attn_heads,mlp")).eval()
    idx = torch.randint(11, (3, 9))
    with torch.no_grad():
        full, _, _ = model(idx)
        last, _, _ = model(idx, last_only=True)
    assert last.shape == (3, 1, 11)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="takes no targets"):
        model(idx, targets=idx, last_only=True)


def test_generate_top_k_one_equals_greedy():
    model = GPT(tiny(codebook_sites="mlp")).eval()
    prompt = torch.randint(11, (4, 3))
    greedy = model.generate(prompt, 8, temperature=0)
    sampled = model.generate(prompt, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled, greedy)


def test_generate_respects_top_k():
    model = GPT(tiny()).eval()
    prompt = torch.full((16, 1), 10)
    out = model.generate(prompt, 10, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (16, 11)
    with torch.no_grad():
        logits, _, _ = model(out[:, :-1])
    top3 = logits.topk(3, dim=-1).indices  # (16, 10, 3)
    assert (top3 == out[:, 1:].unsqueeze(-1)).any(-1).all()
    assert len(out[:, 1:].unique()) > 1  # it did sample, not just argmax


def test_generate_is_reproducible_with_generator():
    model = GPT(tiny()).eval()
    prompt = torch.full((4, 1), 10)
    a = model.generate(prompt, 6, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_codebook_sites_and_layers():
    model = GPT(tiny(n_layer=3, n_head=4, codebook_sites="attn_heads,mlp", codebook_layers="1", codebook_groups=2))
    cbs = model.codebooks()
    assert [n for n, _ in cbs] == ["h.1.attn_heads", "h.1.mlp"]
    assert all(isinstance(cb, CodebookLayer) for _, cb in cbs)
    assert cbs[0][1].groups == 4 and cbs[1][1].groups == 2
    assert all(cb.num_codes == 8 and cb.dim == 16 for _, cb in cbs)

    model = GPT(tiny(codebook_sites=" attn , mlp"))
    assert [n for n, _ in model.codebooks()] == ["h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp"]
    assert GPT(tiny()).codebooks() == []


@pytest.mark.parametrize("kw", [
    dict(codebook_sites="attn_head"), dict(codebook_sites="mlp,resid"),
    dict(codebook_sites="mlp", codebook_layers="2"), dict(codebook_sites="mlp", codebook_layers="-1"),
    dict(codebook_sites="mlp", codebook_layers="0,x"), dict(n_embd=18, n_head=4), dict(pos_emb="alibi"),
])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        tiny(**kw)


@pytest.mark.parametrize("codebook_lr", [None, 1e-2])
def test_configure_optimizers_groups(codebook_lr):
    model = GPT(tiny(codebook_sites="attn_heads,mlp"))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), codebook_lr=codebook_lr)
    params = dict(model.named_parameters())
    group_of = {}
    for i, g in enumerate(opt.param_groups):
        for p in g["params"]:
            assert id(p) not in group_of  # each parameter in one group
            group_of[id(p)] = g
    assert set(group_of) == {id(p) for p in params.values()}  # and every parameter in some group
    for name, p in params.items():
        g = group_of[id(p)]
        is_code = name.endswith("codes")
        is_matrix = name.endswith("weight") and p.dim() == 2
        if is_code:
            assert g["weight_decay"] == 0.0
            assert g["lr"] == (codebook_lr or 1e-3)
            assert g["lr_scale"] == pytest.approx((codebook_lr or 1e-3) / 1e-3)
        elif is_matrix:
            assert g["weight_decay"] == 0.1, name
            assert g["lr"] == 1e-3 and g["lr_scale"] == 1.0
        else:  # LayerNorm weights and biases (codebook LayerNorms too), Linear biases
            assert p.dim() == 1, name
            assert g["weight_decay"] == 0.0, name
    assert any(n.endswith("codes") for n in params) and any(n.endswith("ln.weight") for n in params)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_tied_weights():
    model = GPT(tiny())
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = GPT(tiny(tie_weights=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
