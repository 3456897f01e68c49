"""sae.py: the TopK SAE against a plain reference (outputs, chosen latents, gradients), the normalised loss and AuxK,
decoder gradients orthogonal to the rows, training on a tiny TokFSM model, splicing (bypassed = the model itself),
the neuron baselines read on the model itself, the latent swap, and the CLI end to end."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import analyze
import sae
from analyze import fsm_readouts
from evaluate import mlp_neurons, neuron_baseline
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


def test_loss_is_the_normalised_mse_and_auxk_reaches_dead_latents():
    """Gao et al.'s reference: per group, MSE / the data's variance, plus aux_coef * AuxK's MSE / the residual's
    variance, written out here with explicit sums over a known input."""
    torch.manual_seed(0)
    layer = sae.SAELayer(8, num_latents=6, k=1, groups=2)
    layer.var.copy_(torch.tensor([0.5, 2.0]))
    a = torch.randn(32, 2, 4)
    idx, vals, z_pre = layer.encode(a)
    x_hat = layer.decode(idx, vals)
    loss, fired = layer.loss(a)
    want = sum(((x_hat[:, g] - a[:, g]) ** 2).sum() / (32 * 4) / layer.var[g] for g in range(2)) / 2
    assert torch.allclose(loss, want) and torch.equal(fired, torch.where(vals > 0, idx, -1))
    dead = torch.zeros(2, 6, dtype=torch.bool)
    dead[0, 1:3] = dead[1, 5] = True
    aux = []
    for g, ids in enumerate([[1, 2], [5]]):
        r = (a[:, g] - x_hat[:, g]).detach()
        # k_aux = 32 is more than the dead latents: every one of them decodes
        e = torch.stack([sum(F.relu(z_pre[n, g, m]) * layer.codes[g, m] for m in ids) for n in range(32)])
        aux.append(((e - r) ** 2).sum() / ((r - r.mean(0)) ** 2).sum())
    assert torch.allclose(layer.loss(a, dead, aux_coef=0.25)[0], want + 0.25 * (aux[0] + aux[1]) / 2, rtol=1e-5)
    layer.zero_grad()
    layer.loss(a, dead, aux_coef=1.0)[0].backward()
    with_aux = layer.W_enc.grad[dead].abs().sum(-1)
    layer.zero_grad()
    layer.loss(a)[0].backward()
    unfired = dead.clone()
    unfired.view(-1)[layer.flat_indices(fired)[fired >= 0]] = False
    assert (with_aux > 0).all() and layer.W_enc.grad[unfired].abs().sum() == 0  # only AuxK trains dead latents


def test_decoder_gradient_is_orthogonal_to_each_row():
    torch.manual_seed(0)
    layer = sae.SAELayer(8, num_latents=6, k=2, groups=2)
    layer.loss(torch.randn(64, 2, 4))[0].backward()
    raw = layer.codes.grad.clone()
    layer.project_decoder_grad_()
    g = layer.codes.grad
    assert (layer.codes.norm(dim=-1) - 1).abs().max() < 1e-6
    assert (g * layer.codes).sum(-1).abs().max() < 1e-6 < (raw * layer.codes).sum(-1).abs().max()
    assert torch.allclose(raw - g, (raw * layer.codes).sum(-1, keepdim=True) * layer.codes, atol=1e-7)


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


@pytest.mark.slow
def test_training_sets_the_variance_and_keeps_unit_decoder_rows(trained):
    model, fsm, saes, cfg, _ = trained
    x, _ = fsm.batch(cfg.batch_size, 16, torch.Generator().manual_seed(cfg.seed))  # train_saes' first batch
    model(x)  # the bypassed SAEs record their inputs
    for s in saes:
        a = s.last_input
        assert torch.allclose(s.var, (a - a.mean(0)).square().mean((0, 2)))
        assert torch.allclose(s.codes.norm(dim=-1), torch.ones(()), atol=1e-6)


@pytest.fixture(scope="module")
def read(trained):
    """The readouts of the trained SAEs spliced in (and taken out again afterwards), and for each reading of the MLP
    neurons whether every SAE was bypassed then."""
    model, fsm, saes, cfg, _ = trained
    seen, real = [], analyze.mlp_neurons

    def spy(*args, **kwargs):
        seen.append(all(s.bypass for s in saes))
        return real(*args, **kwargs)
    for s in saes:
        s.bypass = False
    analyze.mlp_neurons = sae.mlp_neurons = spy
    try:
        return sae.readouts(model, fsm, saes, cfg), seen
    finally:
        analyze.mlp_neurons = sae.mlp_neurons = real
        for s in saes:
            s.bypass = True


@pytest.mark.slow
def test_bypassed_saes_leave_the_model_untouched_and_spliced_ones_reconstruct(trained, read):
    model, fsm, saes, cfg, (x, y, plain) = trained
    assert all(s.bypass for s in saes)
    assert torch.equal(model(x, y)[0], plain)
    res = read[0]
    d = res["dictionary"]
    assert set(d) == {"h.0.mlp", "h.1.mlp", "total"} and 0 <= d["total"]["fvu"] < 0.5  # trained: most variance kept
    assert d["total"]["recovered"] > 0.5 and d["total"]["loss_bypass"] == pytest.approx(
        F.cross_entropy(plain.view(-1, plain.size(-1)), y.reshape(-1)).item(), rel=1e-4)
    assert res["states"]["mlp"]["of"] == 10 and "neurons" in res["states"]
    swap = res["swap"]["state"]
    assert swap["none"]["jsd_token"] == pytest.approx(1.0) and swap["B"]["jsd_token"] == pytest.approx(0.0, abs=1e-6)
    assert swap["all"]["success"] > swap["none"]["success"]  # B's latents move A's next state towards B's


@pytest.mark.slow
def test_neurons_are_read_on_the_model_without_saes(trained, read):
    """Both neuron baselines of readouts (at each state's latent recall, and at recall 0.9) are the neurons of the
    model itself, here a copy with the SAEs deleted, not of the model with layer 0's SAE spliced in."""
    model, fsm, saes, cfg, _ = trained
    plain = copy.deepcopy(model)
    for block in plain.transformer.h:
        block.codebooks = torch.nn.ModuleDict()
    res, seen = read
    assert seen == [True, True]  # both baselines read the neurons with every SAE out
    x, _ = fsm.eval_set(cfg.num_seqs, 16)
    rows, cols, labels = fsm_readouts(x, fsm)["state"]
    acts = mlp_neurons(plain, x, rows, cols)
    per_state = res["states"]["mlp"]["per_state"]
    recall = torch.zeros(fsm.num_states)
    for e in per_state:
        recall[e["state"]] = e["recall"]
    want = neuron_baseline(acts, labels, recall)[0]
    assert res["states"]["neurons"]["per_state"] == pytest.approx([want[e["state"]].item() for e in per_state])
    at_09 = neuron_baseline(acts, labels, torch.full((fsm.num_states,), 0.9))[0]
    assert res["neurons_at_recall_0.9"]["mean_precision"] == pytest.approx(at_09.mean().item())


@pytest.mark.slow
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


@pytest.mark.slow
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
