"""steer.py: forced codes appear and change the output, removed codes never appear (next best or nothing), the
FSM swap moves the successor distribution of a briefly trained model, topic steering and ablation mechanics,
one-line errors for codes that do not exist."""

import json
import os
import subprocess
import sys

import pytest
import torch

import steer
from fsm import TokFSM
from model import GPT, GPTConfig
from model import model_from_checkpoint
from plumbing.rundir import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def tiny(k=2, vocab=11, num_codes=16, tie=True):
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=vocab, codebook_sites="attn_heads,mlp",
                    num_codes=num_codes, k=k, tie_weights=tie)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def fsm_run(tmp_path_factory):
    """A TokFSM model (10 states, 2 successors each, 1 digit) trained for 300 steps (~5 s): warm start, then
    k=1 codebooks on the heads and the MLP. Returns (out_dir, model, fsm)."""
    out = tmp_path_factory.mktemp("fsm_run")
    args = ["--num_states=10", "--num_edges=2", "--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16",
            "--codebook_sites=attn_heads,mlp", "--num_codes=32", "--batch_size=64", "--max_iters=300",
            "--codebook_start=150", "--warmup_iters=20", "--eval_interval=300", "--eval_seqs=64", "--eval_samples=64",
            "--learning_rate=3e-3", "--codebook_lr=1e-2", "--log_interval=100", "--device=cpu", f"--out_dir={out}"]
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    model = model_from_checkpoint(load_checkpoint(os.path.join(out, "ckpt.pt"))).eval()
    return out, model, TokFSM(10, 2)


def codes_of(model, x):
    model(x)
    return {s: cb.last_indices.clone() for s, cb in model.codebooks()}


# ---------------------------------------------------------------------------------------------- forcing
def test_force_codes_on_hand_made_indices():
    idx = torch.tensor([[[5, 3]], [[3, 5]]])  # (N=2, G=1, k=2), best first
    assert steer.force_codes(idx, {0: [3]}).tolist() == idx.tolist()  # already active: unchanged
    assert steer.force_codes(idx, {0: [7]}).tolist() == [[[5, 7]], [[3, 7]]]  # replaces the lowest-scoring
    assert steer.force_codes(idx, {0: [7, 8]}).tolist() == [[[8, 7]], [[8, 7]]]
    assert steer.force_codes(idx, {0: [5, 7]}).tolist() == [[[5, 7]], [[7, 5]]]  # keeps the forced 5
    assert steer.force_codes(idx, {0: [7]}, mode="all").tolist() == [[[7, -1]], [[7, -1]]]


@pytest.mark.parametrize("mode", ["one", "all"])
def test_forced_code_appears_in_chosen_indices_and_changes_output(mode):
    model = tiny(k=2)
    x = torch.randint(11, (3, 16))
    plain_logits, _, _ = model(x)
    plain = codes_of(model, x)
    c = int(torch.bincount(plain["h.1.mlp"].flatten(), minlength=16).argmin())  # a code rarely chosen
    with steer.intervene(model, force=[("h.1.mlp", 0, c)], mode=mode):
        logits, _, _ = model(x)
        got = codes_of(model, x)
    idx = got["h.1.mlp"]  # (3, 16, 1, 2)
    assert (idx == c).any(-1).all()  # at every token
    if mode == "one":
        keep = plain["h.1.mlp"][..., 0] != c
        assert torch.equal(idx[..., 0][keep], plain["h.1.mlp"][..., 0][keep])  # the best code stays
    else:
        assert (idx[..., 0] == c).all() and (idx[..., 1] == -1).all()
    assert not torch.allclose(logits, plain_logits)
    assert torch.equal(got["h.0.mlp"], plain["h.0.mlp"])  # upstream sites untouched
    assert all(cb.hook is None and cb.banned is None for _, cb in model.codebooks())  # restored


def test_forcing_holds_at_every_generated_token():
    model = tiny(k=1)
    cb = dict(model.codebooks())["h.0.attn_heads"]
    seen = []
    h = cb.register_forward_hook(lambda m, i, o: seen.append(m.last_indices[..., 1, 0].clone()))
    steer.generate(model, [10, 3], 2, 6, force=[("h.0.attn_heads", 1, 9)])
    h.remove()
    assert len(seen) == 7 and all((s == 9).all() for s in seen)  # the prompt, then each cached step


# ---------------------------------------------------------------------------------------------- removal
def test_ablated_code_never_appears_next_best_or_zero():
    model = tiny(k=1)
    x = torch.randint(11, (8, 16))
    cb = dict(model.codebooks())["h.0.mlp"]
    inp = {}
    h = cb.register_forward_pre_hook(lambda m, i: inp.__setitem__("x", i[0]))
    plain = codes_of(model, x)["h.0.mlp"]
    c = int(torch.bincount(plain.flatten(), minlength=16).argmax())  # the most used code
    top2 = cb.topk_codes(cb.ln(inp["x"].reshape(-1, 1, 32)), k=2).view(8, 16, 1, 2)
    h.remove()
    with steer.intervene(model, ablate=[("h.0.mlp", 0, c)], ablate_to="next"):
        nxt = codes_of(model, x)["h.0.mlp"]
    assert not (nxt == c).any()
    hit = plain[..., 0] == c
    assert hit.any() and torch.equal(nxt[..., 0][hit], top2[..., 1][hit])  # the runner-up took its place
    with steer.intervene(model, ablate=[("h.0.mlp", 0, c)], ablate_to="zero"):
        zero = codes_of(model, x)["h.0.mlp"]
    assert not (zero == c).any() and torch.equal(zero[..., 0] == -1, hit)


@pytest.mark.slow
def test_ablation_reports_deltas(fsm_run):
    out, model, fsm = fsm_run
    x, y = fsm.eval_set(64, 16)
    col = codes_of(model, x)["h.0.mlp"]
    used = torch.bincount(col.flatten(), minlength=32).topk(3).indices.tolist()
    from evaluate import evaluate_fsm

    res = steer.ablation(model, lambda m: evaluate_fsm(m, fsm, x, y, 64, 0),
                         ablate=[("h.0.mlp", 0, c) for c in used], ablate_to="zero")
    model.eval()
    assert res["loss"]["delta"] > 0 and res["valid"]["delta"] < 0
    assert res["loss"]["delta"] == pytest.approx(res["loss"]["ablated"] - res["loss"]["base"])


# ---------------------------------------------------------------------------------------------- the FSM swap
def test_next_state_dist_is_exact():
    fsm = TokFSM(num_states=100, num_edges=10)
    model = tiny(k=1)
    ctx = torch.tensor([[10, 4, 2], [10, 9, 9]])
    p, tok = steer.next_state_dist(model, fsm, ctx)
    assert p.shape == (2, 101) and torch.allclose(p.sum(1), torch.ones(2))
    logits, _, _ = model(torch.tensor([[10, 4, 2, 3]]))  # p(state 37 | context 42) by hand
    lp = logits[0].log_softmax(-1)
    assert p[0, 37].item() == pytest.approx((lp[2, 3] + lp[3, 7]).exp().item(), rel=1e-5)
    assert torch.allclose(tok[0], lp[2].exp(), atol=1e-6)  # the next-token distribution after "42"


def hand_jsd(p, q):
    """Jensen-Shannon divergence in nats of two distributions (lists), by its definition."""
    import math

    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x, y: sum(a * math.log(a / b) for a, b in zip(x, y) if a > 0)  # noqa: E731
    return kl(p, m) / 2 + kl(q, m) / 2


def test_next_token_jsd_equals_a_hand_computation(fsm_run):
    """The paper's metric on one pair: B's codes written into A's state positions at every codebook; the next-token
    JSD to B, over the JSD of A to B, computed here from three plain forwards."""
    out, model, fsm = fsm_run
    A, B, ctx_a, ctx_b = steer.swap_pairs(fsm, 1, seed=3)
    res = steer.fsm_swap(model, fsm, pairs=1, patch="state", seed=3)
    codes_b = {}
    model(ctx_b)
    for name, cb in model.codebooks():
        codes_b[name] = cb.last_indices.clone()  # (1, T, G, k), every position is a state position or BOS
    def dist(x, patch=False):
        for name, cb in model.codebooks():
            if patch:  # positions 1.. hold the state (1 digit): take B's codes there
                keep = codes_b[name].flatten(0, 1)
                cb.hook = lambda idx, keep=keep: torch.cat([idx[:1], keep[1:]])
        logits, _, _ = model(x)
        for _, cb in model.codebooks():
            cb.hook = None
        return logits[0, -1].softmax(-1).tolist()
    p_a, p_b, p_x = dist(ctx_a), dist(ctx_b), dist(ctx_a, patch=True)
    assert res["all"]["jsd_token"] == pytest.approx(hand_jsd(p_x, p_b) / hand_jsd(p_a, p_b), rel=1e-4, abs=1e-6)
    assert res["none"]["jsd_token"] == pytest.approx(1.0) and res["B"]["jsd_token"] == pytest.approx(0.0, abs=1e-7)


def test_single_code_steering_forces_bs_own_code(fsm_run):
    """With each state's own code given, the "code" run forces B's code in its MLP codebook at the state's
    last position, and only there; a code that is B's own moves the next state towards B's successors."""
    out, model, fsm = fsm_run
    x = fsm.eval_set(512, 16)[0]
    model(x)
    codes = dict(model.codebooks())["h.0.mlp"].last_indices[:, 1:, 0, 0]  # (512, 15) at the state positions
    states = x[:, 1:]  # one digit per state
    own = {s: ("h.0.mlp", 0, int(torch.bincount(codes[states == s]).argmax())) for s in range(10)}
    res = steer.fsm_swap(model, fsm, pairs=60, patch="state", seed=0, state_codes=own)
    assert {"code", "all", "none", "B"} <= set(res)
    assert res["code"]["success"] > res["none"]["success"] + 0.3 and res["code"]["jsd_token"] < 0.7
    A, B, ctx_a, _ = steer.swap_pairs(fsm, 4, seed=0)
    _, _, codes_b = steer.next_state_dist(model, fsm, ctx_a, return_codes=True)
    new = steer.own_code(model, B, own, codes_b, ctx_a.shape[1])
    written = new["h.0.mlp"] != -2
    assert written.sum() == 4 and (written.nonzero()[:, 1] == ctx_a.shape[1] - 1).all()
    assert (new["h.0.attn_heads"] == -2).all()


def test_jsd():
    p, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert steer.jsd(p, q).item() == pytest.approx(0.6931, abs=1e-4) and steer.jsd(p, p).item() == 0


def test_fsm_swap_moves_the_successor_distribution(fsm_run):
    out, model, fsm = fsm_run
    res = steer.fsm_swap(model, fsm, pairs=60, seed=0)
    assert res["none"]["jsd"] == pytest.approx(1.0) and res["B"]["jsd"] == pytest.approx(0.0, abs=1e-6)
    assert res["none"]["success"] < 0.2 and res["B"]["success"] > 0.8  # the model knows the FSM
    assert res["all"]["success"] > 0.8 and res["all"]["jsd"] < 0.3  # patched, A's context behaves as B
    assert res["all"]["stay"] < 0.2


# ---------------------------------------------------------------------------------------------- CLI
def run(args):
    return subprocess.run([sys.executable, "steer.py", *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=120)


def test_cli_fsm_generate_ablate(fsm_run, tmp_path, capsys):
    out = fsm_run[0]
    steer.main([f"--out_dir={out}", "--pairs=20", "--device=cpu", f"--save={tmp_path / 'swap.json'}"])
    assert "layer0" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "swap.json").read_text())["results"]) >= {"none", "B", "all", "mlp", "attn"}
    steer.main([f"--out_dir={out}", "--task=generate", "--start=4", "--force=h.0.mlp:3", "--device=cpu"])
    assert "valid transitions" in capsys.readouterr().out
    steer.main([f"--out_dir={out}", "--task=ablate", "--ablate=h.0.attn_heads:1:2", "--eval_seqs=32", "--device=cpu"])
    assert "loss" in capsys.readouterr().out


@pytest.mark.parametrize("spec, needles", [
    ("h.9.mlp:1", ["no codebook 'h.9.mlp'", "h.0.mlp", "h.0.attn_heads (2 heads"]),
    ("h.0.mlp:32", ["no code '32' at h.0.mlp", "0-31"]),
    ("h.0.mlp:x", ["no code 'x' at h.0.mlp"]),
    ("h.0.attn_heads:5", ["has 2 heads"]),
    ("h.0.attn_heads:7:3", ["no codebook 'h.0.attn_heads:7'"]),
])
def test_unknown_site_or_code_names_it_and_lists_what_exists(fsm_run, spec, needles):
    with pytest.raises(steer.ConfigError) as e:
        steer.parse_codes(fsm_run[1], spec)
    assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)


def test_unknown_code_is_a_one_line_error_on_the_command_line(fsm_run):
    r = run([f"--out_dir={fsm_run[0]}", "--task=generate", "--ablate=h.0.mlp:1,h.3.mlp:2", "--device=cpu"])
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no codebook 'h.3.mlp'"), r.stderr
