"""sae.train_saes follows Gao et al.'s reference training: every Adam step sees decoder gradients with no component
along their (unit) decoder rows. Without the projection the parallel component is large, and this test says so."""

import pytest
import torch
import torch.nn.functional as F

import sae
from fsm import TokFSM
from model import GPT, GPTConfig


def parallel_share(saes, monkeypatch):
    """Make torch.optim.Adam record, at each step and for each SAE, the largest |grad . row| / |grad| over the
    decoder rows whose gradients the step receives; returns the (growing) list."""
    shares = []

    class Checked(torch.optim.Adam):
        def step(self, closure=None):
            for s in saes:
                g, u = s.codes.grad, F.normalize(s.codes.detach(), dim=-1)  # (G, M, d)
                shares.append(((g * u).sum(-1).abs() / g.norm(dim=-1).clamp(min=1e-30)).max().item())
            return super().step(closure)
    monkeypatch.setattr(torch.optim, "Adam", Checked)
    return shares


@pytest.mark.parametrize("projected", [True, False])
def test_adam_sees_decoder_gradients_orthogonal_to_the_rows(projected, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, codebook_sites="")).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    saes = sae.insert_saes(model, ["mlp", "attn_heads"], 2, 24)
    if not projected:  # what the test must catch: training without the projection
        monkeypatch.setattr(sae.SAELayer, "project_decoder_grad_", lambda self: None)
    shares = parallel_share(saes, monkeypatch)
    cfg = sae.SAEConfig(out_dir=str(tmp_path), steps=4, batch_size=16, num_latents=24, k=2)
    sae.train_saes(model, TokFSM(10, 2), saes, cfg, log_every=1000)
    assert len(shares) == 4 * len(saes)
    if projected:
        assert max(shares) < 1e-5, shares
    else:
        assert min(shares) > 0.1, shares
    for s in saes:  # and the rows stay unit vectors after every step
        assert torch.allclose(s.codes.norm(dim=-1), torch.ones(()), atol=1e-6)
