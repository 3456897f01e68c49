"""sae.py: the TopK SAE against a plain reference (outputs, chosen latents, gradients), AuxK, training on a tiny
TokFSM model, splicing (bypassed = the model itself), the latent swap, and the CLI end to end."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import sae
from fsm import TokFSM
from model import GPT, GPTConfig


def reference(layer, x):
    """Gao et al.'s TopK SAE written out token by token: (x_hat (N, G, d), fired ids [[set]] per token and group)."""
    G, M, d = layer.codes.shape
    a = x.reshape(-1, G, d)
    out, fired = [], []
    for n in range(a.shape[0]):
        rows, ids = [], []
        for g in range(G):
            pre = torch.stack([(a[n, g] - layer.b_dec[g]) @ layer.W_enc[g, m] + layer.b_enc[g, m] for m in range(M)])
            order = sorted(range(M), key=lambda m: -pre[m].item())[: layer.k]  # the k largest
            rows.append(sum(F.relu(pre[m]) * layer.codes[g, m] for m in order) + layer.b_dec[g])
            ids.append({m for m in order if pre[m] > 0})
        out.append(torch.stack(rows))
        fired.append(ids)
    return torch.stack(out), fired


@pytest.mark.parametrize("k,groups", [(1, 1), (3, 1), (2, 4)])
def test_sae_matches_the_plain_reference(k, groups):
    torch.manual_seed(0)
    layer = sae.SAELayer(16, num_latents=12, k=k, groups=groups)
    with torch.no_grad():
        layer.b_enc.normal_(0, 0.3)
        layer.b_dec.normal_(0, 0.3)
        layer.W_enc.add_(0.2 * torch.randn_like(layer.W_enc))
    layer.bypass = False
    x = torch.randn(2, 5, 16)
    out = layer(x)
    ref, fired = reference(layer, x)
    assert torch.allclose(out, ref.view_as(out), atol=1e-5)
    ids = layer.last_indices.view(-1, groups, k)
    for n, per_group in enumerate(fired):
        for g, want in enumerate(per_group):
            assert {int(i) for i in ids[n, g] if i >= 0} == want
    # gradients of the same loss through both, for every parameter
    params = [layer.codes, layer.W_enc, layer.b_enc, layer.b_dec]
    g1 = torch.autograd.grad(out.square().sum(), params)
    g2 = torch.autograd.grad(reference(layer, x)[0].square().sum(), params)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-4)


def test_loss_is_the_reconstruction_mse_and_auxk_reaches_dead_latents():
    torch.manual_seed(0)
    layer = sae.SAELayer(8, num_latents=6, k=1)
    a = torch.randn(32, 1, 8)
    loss, fired = layer.loss(a)
    idx, vals, _ = layer.encode(a)
    assert torch.allclose(loss, F.mse_loss(layer.decode(idx, vals), a))
    assert torch.equal(fired, torch.where(vals > 0, idx, -1))
    dead = torch.ones(1, 6, dtype=torch.bool)
    dead[0, fired[fired >= 0].unique()] = False
    if dead.any():
        layer.zero_grad()
        layer.loss(a, dead, aux_coef=1.0)[0].backward()
        with_aux = layer.W_enc.grad[0, dead[0]].abs().sum()
        layer.zero_grad()
        layer.loss(a)[0].backward()
        assert with_aux > 0 and layer.W_enc.grad[0, dead[0]].abs().sum() == 0  # only AuxK trains dead latents


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny TokFSM model (10 states, 2 successors) without codebooks and k=1 SAEs trained on its MLP outputs."""
    torch.manual_seed(0)
    fsm = TokFSM(10, 2)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, codebook_sites=""))
    opt = model.configure_optimizers(0.0, 3e-3, (0.9, 0.99))
    for step in range(300):
        x, y = fsm.batch(64, 16, torch.Generator().manual_seed(step))
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    saes = sae.insert_saes(model, ["mlp"], 1, 32)
    cfg = sae.SAEConfig(steps=300, batch_size=64, num_latents=32, pairs=40, num_seqs=128)
    x, y = fsm.eval_set(cfg.num_seqs, 16)  # the readouts' eval set
    plain, _, _ = model(x, y)
    sae.train_saes(model, fsm, saes, cfg, log_every=1000)
    return model, fsm, saes, cfg, (x, y, plain)


def test_bypassed_saes_leave_the_model_untouched_and_spliced_ones_reconstruct(trained):
    model, fsm, saes, cfg, (x, y, plain) = trained
    assert all(s.bypass for s in saes)
    assert torch.equal(model(x, y)[0], plain)
    for s in saes:
        s.bypass = False
    res = sae.readouts(model, fsm, saes, cfg)
    d = res["dictionary"]
    assert set(d) == {"h.0.mlp", "h.1.mlp", "total"} and 0 <= d["total"]["fvu"] < 0.5  # trained: most variance kept
    assert d["total"]["recovered"] > 0.5 and d["total"]["loss_bypass"] == pytest.approx(
        F.cross_entropy(plain.view(-1, plain.size(-1)), y.reshape(-1)).item(), rel=1e-4)
    assert res["states"]["mlp"]["of"] == 10 and "neurons" in res["states"]
    swap = res["swap"]["state"]
    assert swap["none"]["jsd_token"] == pytest.approx(1.0) and swap["B"]["jsd_token"] == pytest.approx(0.0, abs=1e-6)
    assert swap["all"]["success"] > swap["none"]["success"]  # B's latents move A's next state towards B's
    for s in saes:
        s.bypass = True


def test_patched_latents_are_decoded(trained):
    """Inside patched_latents the SAE decodes the kept latents at the chosen positions and its own elsewhere."""
    model, fsm, saes, cfg, _ = trained
    s = saes[0]
    s.bypass = False
    try:
        x = torch.randn(3, 5, 32)
        own = s(x)
        kept_idx = torch.full((3, 5, 1, 1), 7)
        kept_val = torch.full((3, 5, 1, 1), 2.0)
        with sae.patched_latents([s], {s: (kept_idx, kept_val)}, [4]):
            out = s(x)
        assert torch.allclose(out[:, :4], own[:, :4])
        assert torch.allclose(out[:, 4], (2.0 * s.codes[0, 7] + s.b_dec[0]).expand(3, 32))
    finally:
        s.bypass = True


def test_cli_on_a_run_without_codebooks(tmp_path):
    out = tmp_path / "nocb"
    args = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=16", "--eval_seqs=16",
            "--eval_samples=8", "--codebook_sites=", "--device=cpu", "--max_iters=20", "--eval_interval=20",
            "--num_states=10", "--num_edges=2", f"--out_dir={out}"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    assert subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True).returncode == 0
    r = subprocess.run([sys.executable, "sae.py", f"--out_dir={out}", "--steps=20", "--num_latents=16", "--k=2",
                        "--num_seqs=32", "--pairs=10", "--batch_size=16"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "sae-mlp-k2" / "results.json").read_text())
    assert res["config"]["k"] == 2 and res["dictionary"]["total"]["L0"] is None
    assert res["dictionary"]["h.0.mlp"]["L0"] == 2 and "state+next" in res["swap"]
    r = subprocess.run([sys.executable, "sae.py", f"--out_dir={out}/sae-mlp-k2"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
