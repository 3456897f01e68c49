"""evaluate.py: FVU and CE loss recovered on hand-made codebooks (codes equal to the activations: FVU 0 and all the
loss recovered; one code at the mean: FVU 1), FVU against a direct computation, zeroed and bypassed sites, loss
recovered against a reference model, and the evaluations leaving the model's mode and usage counts as they were."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluate import Recorder, bypassed, dictionary_metrics, evaluate_fsm, evaluate_lm, mean_ce, recovered, zeroed
from fsm import TokFSM
from model import GPT, GPTConfig


def tiny(sites="mlp", num_codes=64, k=1, layernorm=True):
    return GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, block_size=8, codebook_sites=sites, num_codes=num_codes, k=k,
                         codebook_layernorm=layernorm)).eval()


def site_input(model, x):
    """What the MLP codebook sees, (N, d) after its LayerNorm."""
    cb = model.transformer.h[0].codebooks["mlp"]
    seen = {}
    h = cb.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0]))
    model(x)
    h.remove()
    a = seen["x"].reshape(-1, 16)
    return cb, (cb.ln(a) if cb.ln is not None else a).detach()


def test_recovered_formula():
    assert recovered(2.0, 1.5, 3.0) == pytest.approx(2 / 3)
    assert recovered(1.5, 1.5, 3.0) == 1.0 and recovered(3.0, 1.5, 3.0) == 0.0


def test_codes_equal_to_the_activations_lose_nothing():
    """One code per distinct activation: q = a exactly, so FVU = 0 and the loss is the bypassed loss (recovered 1)."""
    torch.manual_seed(0)
    model = tiny(num_codes=64)
    x = torch.randint(11, (4, 8))
    batches = [(x, torch.randint(11, (4, 8)))]
    cb, a = site_input(model, x)
    with torch.no_grad():
        cb.codes[0, :32] = a  # 32 tokens, 32 codes; the other codes point elsewhere
        cb.codes[0, 32:] = -10 * a.mean(0)
    d = dictionary_metrics(model, batches)
    assert d["h.0.mlp"]["fvu"] == pytest.approx(0.0, abs=1e-10) and d["total"]["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert d["h.0.mlp"]["loss"] == pytest.approx(d["h.0.mlp"]["loss_bypass"], abs=1e-6)
    assert d["h.0.mlp"]["recovered"] == pytest.approx(1.0, abs=1e-4) and d["h.0.mlp"]["L0"] == 1
    assert d["h.0.mlp"]["dead_pct"] == pytest.approx(100 * 32 / 64) and d["h.0.mlp"]["alive_pct"] == 50


def test_one_code_at_the_mean_explains_no_variance():
    torch.manual_seed(0)
    model = tiny(num_codes=1, layernorm=False)
    x = torch.randint(11, (4, 8))
    cb, a = site_input(model, x)
    with torch.no_grad():
        cb.codes[0, 0] = a.mean(0)
    with Recorder(model) as rec:
        model(x)
    assert rec.fvu("h.0.mlp") == pytest.approx(1.0, abs=1e-6)


def test_fvu_matches_a_direct_computation_over_several_batches():
    torch.manual_seed(1)
    model = tiny(sites="attn_heads,mlp", num_codes=8, k=2)
    xs = [torch.randint(11, (3, 8)) for _ in range(2)]
    with Recorder(model) as rec:
        for x in xs:
            model(x)
    cb = model.transformer.h[0].codebooks["mlp"]
    a, q = [], []

    def keep(m, i, o):
        a.append(m.ln(i[0].reshape(-1, 1, 16)).reshape(-1, 16))
        q.append(o.reshape(-1, 16))
    h = cb.register_forward_hook(keep)
    for x in xs:
        model(x)
    h.remove()
    a, q = torch.cat(a).double(), torch.cat(q).double()
    want = ((q - a) ** 2).sum() / ((a - a.mean(0)) ** 2).sum()
    assert rec.fvu("h.0.mlp") == pytest.approx(want.item(), rel=1e-6)


def test_zeroed_and_bypassed_sites():
    torch.manual_seed(0)
    model = tiny(sites="mlp")
    x = torch.randint(11, (2, 8))
    plain = model(x)[0]
    with bypassed(model):
        byp = model(x)[0]
    with zeroed(model):
        zero = model(x)[0]
    model.transformer.h[0].codebooks = torch.nn.ModuleDict()  # the same weights with the MLP deleted by hand
    block = model.transformer.h[0]
    h = block.mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    assert torch.allclose(zero, model(x)[0], atol=1e-6)
    h.remove()
    assert not torch.allclose(plain, byp) and not torch.allclose(zero, byp)
    loss, acc = mean_ce(model, [(x, x)])
    assert loss == pytest.approx(F.cross_entropy(model(x)[0].view(-1, 11), x.view(-1)).item(), rel=1e-6)


def test_loss_recovered_against_a_reference_model():
    """recovered_vs_ref swaps L_bypass for the reference's loss; given the bypassed loss itself it equals recovered."""
    torch.manual_seed(0)
    model = tiny(sites="attn_heads,mlp", num_codes=8)
    batches = [(torch.randint(11, (3, 8)), torch.randint(11, (3, 8)))]
    d = dictionary_metrics(model, batches)["total"]
    assert "recovered_vs_ref" not in d
    t = dictionary_metrics(model, batches, loss_ref=d["loss_bypass"])["total"]
    assert t["recovered_vs_ref"] == pytest.approx(t["recovered"], rel=1e-12)
    t = dictionary_metrics(model, batches, loss_ref=0.5)["total"]
    assert t["loss_ref"] == 0.5 and t["recovered_vs_ref"] == pytest.approx((t["loss_zero"] - t["loss"]) /
                                                                          (t["loss_zero"] - 0.5), rel=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_evaluations_keep_the_models_mode_and_usage_counts(training):
    """evaluate_fsm and evaluate_lm run in eval mode and give the model back as it came, also when they fail; no
    usage count moves."""
    torch.manual_seed(0)
    fsm = TokFSM(10, 2)
    model = tiny(sites="attn_heads,mlp", num_codes=8).train(training)
    books = [cb for _, cb in model.codebooks()]
    before = [(cb.counts.clone(), cb.pending.clone()) for cb in books]
    x, y = fsm.eval_set(8, 8)
    m = evaluate_fsm(model, fsm, x, y, samples=4)
    assert model.training == training and all(mod.training == training for mod in model.modules())
    assert math.isfinite(m["loss"]) and math.isfinite(m["recovered"])
    val = np.arange(200, dtype=np.uint16) % 11
    assert math.isfinite(evaluate_lm(model, val, torch.arange(4) * 8, 2)["recovered"])
    assert model.training == training
    with pytest.raises(IndexError):
        evaluate_fsm(model, fsm, x + 100, y, samples=4)  # tokens outside the vocabulary
    assert model.training == training
    assert all(torch.equal(c, cb.counts) and torch.equal(p, cb.pending) for (c, p), cb in zip(before, books))
