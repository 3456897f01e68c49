"""workshop/workshop.ipynb: each exercise's check passes the answer in workshop/solutions.py and fails, saying why, on a
missing answer and on typical wrong ones; the notebook runs end to end with the answers filled in (nbclient), its
committed copy holds no outputs, and every exercise has its tags, two hints, its stuck line, its answer cell and its
check cell."""

import ast
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import steer
import workshop
import workshop.solutions as sol
from fsm import TokFSM
from model import GPT, GPTConfig

NOTEBOOK = os.path.join(ROOT, "workshop", "workshop.ipynb")


def missing(*args):
    raise NotImplementedError


def raises(check, wrong, says):
    with pytest.raises(AssertionError, match=re.escape(says)):
        check(wrong)


# ---------------------------------------------------------------------------------------------- 2.1 codebook forward
def dot_product(a, codes, k):  # scores without normalising
    idx = (a.detach() @ codes.detach().T).topk(k, dim=-1).indices
    q = codes[idx].sum(1)
    return q + a - a.detach(), idx, F.mse_loss(q, a.detach())


def no_straight_through(a, codes, k):
    out, idx, recon = sol.codebook_forward(a, codes, k)
    return codes[idx].sum(1), idx, recon


def vqvae_straight_through(a, codes, k):  # VQ-VAE's form: a + (q - a).detach() sends no task gradient to the codes
    out, idx, recon = sol.codebook_forward(a, codes, k)
    q = codes[idx].sum(1)
    return a + (q - a).detach(), idx, recon


def recon_not_detached(a, codes, k):
    out, idx, _ = sol.codebook_forward(a, codes, k)
    return out, idx, F.mse_loss(codes[idx].sum(1), a)


def recon_squared_norm(a, codes, k):  # |q - a|^2 per row, averaged over rows: d times the MSE
    out, idx, _ = sol.codebook_forward(a, codes, k)
    return out, idx, (codes[idx].sum(1) - a.detach()).square().sum(-1).mean()


def recon_as_float(a, codes, k):
    out, idx, recon = sol.codebook_forward(a, codes, k)
    return out, idx, recon.item()


def recon_of_out(a, codes, k):  # the output compared with a: its value is q's, its gradient a's
    out, idx, _ = sol.codebook_forward(a, codes, k)
    return out, idx, F.mse_loss(out, a.detach())


def numpy_out(a, codes, k):
    out, idx, recon = sol.codebook_forward(a, codes, k)
    return out.detach().numpy(), idx, recon


def test_codebook_check_accepts_the_authors_recon():
    """Summed over the d dimensions and averaged over tokens (the authors' form) is the layer's loss times d: right,
    with a note on recon_coef."""
    said = workshop.check_codebook(recon_squared_norm)
    assert said.startswith("correct") and "recon_coef = lambda * d" in said
    assert "recon_coef" not in workshop.check_codebook(sol.codebook_forward)


def first_code_only(a, codes, k):  # k codes chosen, one summed
    out, idx, recon = sol.codebook_forward(a, codes, k)
    q = codes[idx[:, 0]]
    return q + a - a.detach(), idx, F.mse_loss(q, a.detach())


def mean_of_codes(a, codes, k):
    out, idx, recon = sol.codebook_forward(a, codes, k)
    q = codes[idx].mean(1)
    return q + a - a.detach(), idx, F.mse_loss(q, a.detach())


@pytest.mark.parametrize("wrong,says", [
    (missing, "not answered yet"), (dot_product, "dot products"), (no_straight_through, "straight-through"),
    (vqvae_straight_through, "VQ-VAE's form"), (recon_not_detached, "recon = MSE(q, a.detach())"),
    (first_code_only, "sum of the chosen codes"), (mean_of_codes, "sum of the chosen codes"),
    (recon_as_float, "recon is a Python float: return the tensor itself"), (recon_of_out, "recon compares out with a"),
    (lambda a, codes, k: None, "returned None (does your function end with `return`?)"),
    (numpy_out, "out is a numpy array"),
    (lambda a, codes, k: sol.codebook_forward(a, codes, k)[:2], "returned 2 values"),
])
def test_codebook_check(wrong, says):
    assert "correct" in workshop.check_codebook(sol.codebook_forward)
    raises(workshop.check_codebook, wrong, says)


# ---------------------------------------------------------------------------------------------- 2.2 k-means
def kmeans_variant(assign="cosine", divide=True, unit=False, empty="keep", extra=0, minlength=True):
    def fn(a, init, k, iters):
        codes = init.clone()
        for _ in range(iters + extra):
            if assign == "cosine":
                scores = F.normalize(a, dim=-1) @ F.normalize(codes, dim=-1).T
            else:
                scores = a @ codes.T if assign == "dot" else -torch.cdist(a, codes)
            best = scores.argmax(1)
            n = (torch.bincount(best, minlength=len(codes)) if minlength else torch.bincount(best)).unsqueeze(1)
            sums = torch.zeros_like(codes).index_add_(0, best, a)
            new = {"keep": torch.where(n > 0, sums / n.clamp(min=1), codes), "nan": sums / n,
                   "zero": sums / n.clamp(min=1), "init": torch.where(n > 0, sums / n.clamp(min=1), init)}[empty]
            codes = F.normalize(new, dim=-1) if unit else new
        return codes / k if divide else codes
    return fn


@pytest.mark.parametrize("wrong,says", [
    (missing, "not answered yet"), (kmeans_variant(assign="dot"), "by dot product"),
    (kmeans_variant(assign="distance"), "by distance"), (kmeans_variant(divide=False), "divide the means by k"),
    (kmeans_variant(unit=True), "not its direction"), (kmeans_variant(empty="nan"), "became NaN"),
    (kmeans_variant(empty="zero"), "became 0"), (kmeans_variant(extra=1), "those of 6 rounds"),
    (kmeans_variant(extra=-1), "those of 4 rounds"), (lambda a, init, k, iters: init / k, "codes differ"),
    (kmeans_variant(empty="init"), "went back to its starting value"), (kmeans_variant(minlength=False), "minlength=M"),
    (lambda a, init, k, iters: sol.kmeans_codes(a, init, k, iters).numpy(), "the codes is a numpy array"),
    (lambda a, init, k, iters: float(iters), "a Python float"),
])
def test_kmeans_check(wrong, says):
    assert "correct" in workshop.check_kmeans(sol.kmeans_codes)
    raises(workshop.check_kmeans, wrong, says)


def test_emptied_data_empties_a_code_after_the_first_round():
    """The check's last case: a code wins rows in round 1 and none in rounds 2 and 3, so "keep the starting value"
    and "keep the current value" differ there."""
    a, init = workshop.emptied_data()
    codes, counts = init.clone(), []
    for _ in range(3):
        best = (F.normalize(a, dim=-1) @ F.normalize(codes, dim=-1).T).argmax(1)
        counts.append(torch.bincount(best, minlength=len(codes)))
        codes = workshop.kmeans_reference(a, codes, 1, 1)
    assert counts[0][9] > 0 and counts[1][9] == 0 and counts[2][9] == 0
    assert not torch.allclose(workshop.kmeans_reference(a, init, 1, 3),
                              workshop.kmeans_reference(a, init, 1, 3, empty="init"), atol=1e-3)


def test_kmeans_reference_is_codebook_layers():
    """The check's alternative answers start from its reference: with cosine, it is CodebookLayer.kmeans_init."""
    a, init = workshop.kmeans_data()
    assert torch.allclose(workshop.kmeans_reference(a, init, 2, 5), sol.kmeans_codes(a, init, 2, 5), atol=1e-6)


# ---------------------------------------------------------------------------------------------- 4.1 precision, recall
def swapped(codes, labels, L, M):
    P, R = sol.precision_recall(codes, labels, L, M)
    return R, P


def counts_only(codes, labels, L, M):
    both = torch.zeros(L, M).index_put_((labels, codes), torch.ones(len(codes)), accumulate=True)
    return both, both


def sized_from_data(codes, labels, L, M):
    return sol.precision_recall(codes, labels, int(labels.max()) + 1, int(codes.max()) + 1)


def nan_when_undefined(codes, labels, L, M):
    both = torch.zeros(L, M).index_put_((labels, codes), torch.ones(len(codes)), accumulate=True)
    return both / both.sum(0, keepdim=True), both / both.sum(1, keepdim=True)


@pytest.mark.parametrize("wrong,says", [(missing, "not answered yet"), (swapped, "divide by how often the code"),
                                        (counts_only, "divide by how often the code"),
                                        (sized_from_data, "sized from the data (max() + 1)"),
                                        (nan_when_undefined, "0 when undefined"),
                                        (lambda c, y, L, M: None, "returned None"),
                                        (lambda c, y, L, M: tuple(t.numpy() for t in sol.precision_recall(c, y, L, M)),
                                         "precision is a numpy array")])
def test_precision_recall_check(wrong, says):
    codes, labels = torch.randint(7, (200,)), torch.randint(5, (200,))
    assert "correct" in workshop.check_precision_recall(sol.precision_recall, codes, labels, 6, 9)
    raises(lambda fn: workshop.check_precision_recall(fn, codes, labels, 6, 9), wrong, says)


# ---------------------------------------------------------------------------------------------- 5.1 JSD
def in_bits(p, q):
    return sol.jsd(p, q) / torch.log(torch.tensor(2.0))


def naive(p, q):  # 0 * log 0 left as NaN
    m = (p + q) / 2
    return ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1)) / 2


def symmetric_kl(p, q):  # KL against the other distribution, not the mixture: infinite where q = 0 < p
    kl = lambda x, y: torch.where(x > 0, x * (x / y).log(), torch.zeros_like(x)).sum(-1)  # noqa: E731
    return (kl(p, q) + kl(q, p)) / 2


def kl_only(p, q):
    return (p * (p.clamp(min=1e-30) / q.clamp(min=1e-30)).log()).sum(-1)


@pytest.mark.parametrize("wrong,says", [(missing, "not answered yet"), (in_bits, "natural log"),
                                        (naive, "0 * log 0"), (kl_only, "KL(p || m)"),
                                        (lambda p, q: float(sol.jsd(p, q).sum()), "a Python float"),
                                        (symmetric_kl, "compares with the mixture m = (p + q) / 2")])
def test_jsd_check(wrong, says):
    assert "correct" in workshop.check_jsd(sol.jsd)
    raises(workshop.check_jsd, wrong, says)


# ---------------------------------------------------------------------------------------------- a model for 3.1, 5.2
@pytest.fixture(scope="module")
def tiny():
    """An untrained 2-layer TokFSM model with k=1 codebooks on every head and MLP (the workshop's sites), its
    codebooks' LayerNorms randomised so that forgetting them changes the chosen codes. The checks compare answers
    with references on the same model, so it need not be trained."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=32, n_head=2, num_codes=16)).eval()
    with torch.no_grad():
        for _, cb in model.codebooks():
            cb.ln.weight.uniform_(0.5, 2.0)
            cb.ln.bias.normal_(0, 1.0)
    return model, TokFSM()


# ---------------------------------------------------------------------------------------------- 3.1 your layer
def no_layernorm(layer, x):
    a = x.reshape(-1, layer.dim)
    out, idx, layer.recon_loss = sol.codebook_forward(a, layer.codes[0], layer.k)
    layer.last_indices = idx.view(*x.shape[:-1], 1, layer.k)
    return out.view(x.shape)


def flat_output(layer, x):  # (N, d) returned where the model expects (B, T, d)
    a = layer.ln(x.reshape(-1, layer.dim))
    out, idx, layer.recon_loss = sol.codebook_forward(a, layer.codes[0], layer.k)
    layer.last_indices = idx.view(*x.shape[:-1], 1, layer.k)
    return out


def no_indices(layer, x):
    a = layer.ln(x.reshape(-1, layer.dim))
    out, idx, layer.recon_loss = sol.codebook_forward(a, layer.codes[0], layer.k)
    return out.view(x.shape)


def the_input(layer, x):  # the layer "works" but quantizes nothing
    sol.layer_forward(layer, x)
    return layer.ln(x)


def test_helpers_name_odd_arguments(tiny, tmp_path):
    """A model without codebooks, zero pairs, a training run without an output directory: one line each."""
    model, fsm = tiny
    plain = GPT(GPTConfig(n_embd=32, n_head=2, codebook_sites="")).eval()
    for call in (lambda: workshop.check_your_layer(sol.layer_forward, plain, fsm),
                 lambda: workshop.check_swap(sol.swap, plain, fsm),
                 lambda: workshop.swap_table(sol.swap, plain, fsm, sol.jsd)):
        with pytest.raises(ValueError, match="this model has no codebooks .*pass `model`"):
            call()
    x, y = fsm.eval_set(4, plain.config.block_size)
    with pytest.raises(ValueError, match="this model has no dictionary: splice SAEs"):
        workshop.dictionary_row(plain, fsm, x, y)
    with pytest.raises(ValueError, match=re.escape("no codebook 'h.7.mlp' in this model")):
        workshop.check_your_layer(sol.layer_forward, model, fsm, "h.7.mlp")
    for call in (lambda: workshop.check_swap(sol.swap, model, fsm, pairs=0),
                 lambda: workshop.swap_table(sol.swap, model, fsm, sol.jsd, pairs=0)):
        with pytest.raises(ValueError, match="pairs=0: the .* needs at least one pair"):
            call()
    with pytest.raises(ValueError, match="each run needs --out_dir=..."):
        workshop.train_live({"codebooks": ["--max_iters=10"]})
    with pytest.raises(ValueError, match="no runs"):
        workshop.train_live({})
    with pytest.raises(ValueError, match="waits for 'nocb', which is not among the runs"):
        workshop.train_live({"a": [f"--out_dir={tmp_path}"]}, then={"SAE": ("nocb", ["sae.py"])})


def test_your_layer_runs_the_model(tiny):
    model, fsm = tiny
    said = workshop.check_your_layer(sol.layer_forward, model, fsm, "h.0.mlp", eval_seqs=32, samples=20)
    assert said.startswith("correct: the model with your layer at h.0.mlp: eval loss")


def no_recon(layer, x):  # the loss computed and dropped: training would stop moving the codes
    a = layer.ln(x.reshape(-1, layer.dim))
    out, idx, _ = sol.codebook_forward(a, layer.codes[0], layer.k)
    layer.last_indices = idx.view(*x.shape[:-1], 1, layer.k)
    return out.view(x.shape)


def all_codes(layer, x):  # layer.codes (1, M, d) passed whole
    a = layer.ln(x.reshape(-1, layer.dim))
    out, idx, layer.recon_loss = sol.codebook_forward(a, layer.codes, layer.k)
    layer.last_indices = idx.view(*x.shape[:-1], 1, layer.k)
    return out.view(x.shape)


@pytest.mark.parametrize("wrong,says", [(missing, "not answered yet"), (no_layernorm, "a = layer.ln(x) first"),
                                        (flat_output, "the output has shape"), (no_indices, "last_indices"),
                                        (the_input, "sum of the chosen codes"),
                                        (no_recon, "layer.recon_loss is not set"), (all_codes, "layer.codes[0]"),
                                        (lambda layer, x: None, "the output is None")])
def test_your_layer_check(tiny, wrong, says):
    model, fsm = tiny
    raises(lambda fn: workshop.check_your_layer(fn, model, fsm, "h.0.mlp", eval_seqs=32, samples=20), wrong, says)
    assert "forward" not in vars(dict(model.codebooks())["h.0.mlp"])  # the trained layer is itself again


# ---------------------------------------------------------------------------------------------- 5.2 the swap
def swap_variant(**kw):
    def fn(model, fsm, ctx_a, ctx_b, sites):
        return workshop.swap_reference(model, fsm, ctx_a, ctx_b, **{"sites": sites, **kw})
    return fn


def every_site(model, fsm, ctx_a, ctx_b, sites):
    return sol.swap(model, fsm, ctx_a, ctx_b, [n for n, _ in model.codebooks()])


def shifted(model, fsm, ctx_a, ctx_b, sites):  # one position late
    T, D = ctx_a.shape[1], fsm.digits
    _, _, codes_b = steer.next_state_dist(model, fsm, ctx_b, return_codes=True)
    patch = {s: torch.full_like(codes_b[s], -2) for s in sites}
    for s in sites:
        patch[s][:, T - D + 1 :] = codes_b[s][:, T - D + 1 :]
    return steer.next_state_dist(model, fsm, ctx_a, patch)[0]


def no_malformed(model, fsm, ctx_a, ctx_b, sites):  # the malformed column dropped: success unchanged
    p = sol.swap(model, fsm, ctx_a, ctx_b, sites)
    return torch.cat([p[:, :-1], torch.zeros(len(p), 1)], 1)


def test_swap_contexts_differ_before_a_and_b():
    """The check's contexts: BOS, a predecessor, then A (B); the predecessors differ, so that "B's codes at every
    position" is a different answer (test_swap_check) from the right one."""
    fsm = TokFSM()
    A, B, ctx_a, ctx_b = workshop.swap_contexts(fsm, 40)
    assert ctx_a.shape == ctx_b.shape == (40, 1 + 2 * fsm.digits)
    states_a, states_b = fsm.tokens_to_states(ctx_a[:, 1:]), fsm.tokens_to_states(ctx_b[:, 1:])
    assert torch.equal(states_a[:, 1], A) and torch.equal(states_b[:, 1], B)
    assert fsm.adj[states_a[:, 0], A].all() and fsm.adj[states_b[:, 0], B].all()
    assert (states_a[:, 0] != states_b[:, 0]).all()


@pytest.mark.parametrize("wrong,says", [
    (missing, "not answered yet"), (swap_variant(positions="state"), "only move the first digit"),
    (swap_variant(positions="last"), "at the last position only"), (swap_variant(fill=-1), "-1 removes a code"),
    (swap_variant(source="A"), "A's own codes"), (every_site, "you patched every codebook"),
    (lambda model, fsm, a, b, sites: steer.next_state_dist(model, fsm, a)[0], "A's own codes"),
    (shifted, "patch B's codes at positions T - D to T + D - 2"),
    (swap_variant(positions="all"), "B's codes at every position"),
    (no_malformed, "as it should be, but the distribution differs"), (lambda *a: None, "p is None"),
])
def test_swap_check(tiny, wrong, says):
    model, fsm = tiny
    raises(lambda fn: workshop.check_swap(fn, model, fsm, pairs=8), wrong, says)


def test_swap_check_passes_the_answer(tiny):
    model, fsm = tiny
    assert "correct" in workshop.check_swap(sol.swap, model, fsm, pairs=8)


def test_swap_reference_is_steers(tiny):
    """The check's reference is steer.fsm_swap's swap: the same success for one site group."""
    model, fsm = tiny
    A, B, ctx_a, ctx_b = steer.swap_pairs(fsm, 10, seed=0)
    ours = workshop.success(fsm, workshop.swap_reference(model, fsm, ctx_a, ctx_b, ["h.0.mlp"]), B)
    theirs = steer.fsm_swap(model, fsm, 10, "state+next", {"g": ["h.0.mlp"]}, seed=0)["g"]["success"]
    assert abs(ours - theirs) < 1e-5
    table = workshop.swap_table(sol.swap, model, fsm, sol.jsd, pairs=10)
    assert abs(table["h.0.mlp"][0] - theirs) < 1e-5 and table["none"][1] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- the notebook
def test_committed_notebook_is_clean_and_every_exercise_is_complete():
    nb = json.load(open(NOTEBOOK))
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "outputs not cleared"
    src = ["".join(c["source"]) for c in cells]
    exercises = [i for i, s in enumerate(src) if "# YOUR CODE HERE" in s and cells[i]["cell_type"] == "code"]
    assert len(exercises) >= 6
    assert len(exercises) >= 7
    for i in exercises:
        assert "raise NotImplementedError" in src[i]
        assert "if SOLUTIONS:" in src[i] and "from workshop.solutions import" in src[i]
        assert src[i].startswith("@workshop.exercise"), "an import above the def must still stand in for the stub"
        assert src[i + 1].startswith("workshop.check_") or "workshop.check_" in src[i + 1]
        text = src[i - 1]  # the exercise's statement, just above
        assert re.search(r"Difficulty.*Importance.*minutes", text, re.S), text[:80]
        assert text.count("<details>") == 3 and text.count("</details>") == 3, "two collapsed hints and a solution"
        assert "<summary>Hint 1</summary>" in text and "<summary>Hint 2</summary>" in text
        name = re.search(r"def (\w+)\(", src[i]).group(1)
        assert f"from workshop.solutions import {name}" in text, "the stuck? line"
        shown = text.split("<summary>Solution</summary>")[1].split("```python\n")[1].split("\n```")[0]
        answer = inspect.getsource(getattr(sol, name))
        doc = ast.parse(answer).body[0].body[0]
        lines = answer.splitlines()
        assert shown == "\n".join(lines[: doc.lineno - 1] + lines[doc.end_lineno:]), f"{name}: solution shown differs"
    sections = [s for c, s in zip(cells, src) if c["cell_type"] == "markdown" and s.startswith("## ")]
    assert len(sections) >= 8 and all("**Learning objectives**" in t for t in sections[:-1])
    assert sum("**Predict, then run.**" in s for s in src) >= 4
    assert sum("**What you saw.**" in s for s in src) >= 6
    refs = src[-1]
    for link in ("2310.17230", "toy_model", "monosemantic-features", "2406.04093", "1711.00937", "1308.3432"):
        assert link in refs, link


@pytest.mark.slow
def test_train_live_runs_at_once_and_names_a_failure(tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    import matplotlib

    matplotlib.use("Agg")
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda fig: shown.append(fig))
    tiny = ["--n_embd=16", "--n_head=2", "--num_codes=8", "--batch_size=8", "--max_iters=12", "--codebook_start=4",
            "--eval_interval=6", "--eval_seqs=8", "--eval_samples=8", "--log_interval=2"]
    ckpt_b = str(tmp_path / "b" / "ckpt.pt")
    after_b = ["-c", f"import os; print('step 1: b done' if os.path.isfile({ckpt_b!r}) else 'early')"]
    logs = workshop.train_live({"a": [*tiny, f"--out_dir={tmp_path / 'a'}"],
                                "b": [*tiny, "--codebook_sites=", f"--out_dir={tmp_path / 'b'}"]}, switch=4, every=0.2,
                               then={"after b": ("b", after_b)})
    assert logs["after b"] == ["step 1: b done"]  # started once b had finished; its printed lines come back
    assert [r["iter"] for r in logs["a"] if "eval" in r] == [6, 12] == [r["iter"] for r in logs["b"] if "eval" in r]
    with pytest.raises(RuntimeError, match="after a: -c failed: .*error: no SAE"):
        workshop.train_live({"a": [*tiny, f"--out_dir={tmp_path / 'd'}"]}, every=0.2,
                            then={"after a": ("a", ["-c", "raise SystemExit('error: no SAE')"])})
    assert logs["a"][-1]["eval"]["fvu"] >= 0 and len(shown) >= 1
    with pytest.raises(RuntimeError, match=r"b: train.py failed: .*error: .*max_iterz"):
        workshop.train_live({"a": [*tiny, f"--out_dir={tmp_path / 'c'}"], "b": ["--max_iterz=3", "--out_dir=x"]},
                            every=0.2)


def colab_setup(url=None):
    """The first cell's set-up lines (up to the imports of the repository), REPO_URL set to `url` when given."""
    src = "".join(json.load(open(NOTEBOOK))["cells"][1]["source"])
    end = "sys.path.insert(0, ROOT)\n"
    src = src[: src.index(end) + len(end)]
    return src if url is None else src.replace('"https://github.com/YOUR-ORG/codebook-features"', repr(url))


@pytest.fixture
def colab(tmp_path, monkeypatch):
    """A simulated Colab runtime in tmp_path/content: google.colab importable, git clone copying this repository's
    files, pip recorded and not run. Yields the list of commands the cell ran."""
    calls = []

    def run(cmd, check=False, **kw):
        calls.append(list(cmd))
        if cmd[:2] == ["git", "clone"]:
            os.makedirs(cmd[-1])
            for f in ("requirements.txt", "codebook.py", "workshop/__init__.py"):
                os.makedirs(os.path.dirname(os.path.join(cmd[-1], f)), exist_ok=True)
                shutil.copy(os.path.join(ROOT, f), os.path.join(cmd[-1], f))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "content").mkdir()
    monkeypatch.chdir(tmp_path / "content")
    yield calls


def test_colab_cell_clones_once_and_keeps_colabs_torch(colab, tmp_path):
    url = "https://example.org/teacher/codebook-features.git"
    exec(colab_setup(url), {})  # a fresh runtime
    clone = tmp_path / "content" / "codebook-features"
    assert colab[0] == ["git", "clone", "-q", url, "codebook-features"]
    pip = colab[1]
    assert pip[:5] == [sys.executable, "-m", "pip", "install", "-q"] and len(colab) == 2
    wanted = [r.strip() for r in open(os.path.join(ROOT, "requirements.txt")) if r.strip() and r[0] != "#"]
    assert pip[5:] == [r for r in wanted if not r.startswith("torch=")] and len(pip[5:]) == len(wanted) - 1
    assert os.getcwd() == str(clone) and sys.path[0] == str(clone)
    os.chdir(tmp_path / "content")  # "Restart session": a new kernel, in /content again, the clone still there
    colab.clear()
    exec(colab_setup(url), {})
    assert [c[:4] for c in colab] == [[sys.executable, "-m", "pip", "install"]] and colab[0] == pip
    assert os.getcwd() == str(clone)
    colab.clear()
    exec(colab_setup(url), {})  # a cell run twice: already in the clone, nothing to do
    assert colab == [] and os.getcwd() == str(clone)


def test_colab_cell_asks_for_the_repository_url(colab, tmp_path):
    with pytest.raises(SystemExit, match="error: set REPO_URL in this cell"):
        exec(colab_setup(), {})
    assert colab == [] and os.listdir(tmp_path / "content") == []


def test_outside_colab_the_cell_finds_the_repository_from_workshop(colab, monkeypatch, tmp_path):
    """Jupyter started in the repository or in its workshop/ folder: the cell makes the repository root the working
    directory and sys.path[0]; started elsewhere, it says where to start in one line."""
    monkeypatch.delitem(sys.modules, "google.colab")
    repo = tmp_path / "content" / "repo"
    (repo / "workshop").mkdir(parents=True)
    (repo / "codebook.py").write_text("")
    for start in (repo / "workshop", repo):
        os.chdir(start)
        exec(colab_setup(), {})
        assert colab == [] and os.getcwd() == str(repo) and sys.path[0] == str(repo)
    os.chdir(tmp_path / "content")
    with pytest.raises(SystemExit, match="error: start Jupyter in the repository or in its workshop/ folder"):
        exec(colab_setup(), {})


@pytest.mark.parametrize("has", ["download", "shared", "network", "nothing", "network, HF_HUB_OFFLINE=1"])
def test_language_model_section_finds_text_or_says_what_to_run(tmp_path, monkeypatch, has):
    import socket

    import data.prepare

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if "OFFLINE" in has else "0")
    root = tmp_path / "repo"
    raw = root / "data" / "tinystories-raw"
    raw.mkdir(parents=True)
    if has == "download":
        (raw / "TinyStories-valid.txt").write_text("Once upon a time a dragon.")
    if has == "shared":
        (tmp_path / "shared" / "data" / "tinystories").mkdir(parents=True)
        (tmp_path / "shared" / "data" / "tinystories" / "tinystories_train_head.txt").write_text("A girl and her mom.")

    def connect(addr, timeout):
        if not has.startswith("network"):
            raise OSError("Network is unreachable")
        return socket.socket()

    def hf_file(repo, filename, kind, out_dir):
        assert (repo, filename, kind, out_dir) == ("roneneldan/TinyStories", "TinyStories-valid.txt", "dataset", str(raw))
        (raw / filename).write_text("Lily saw a slide.")
        return str(raw / filename)

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(data.prepare, "hf_file", hf_file)
    text, said = workshop.tinystories_text(str(root))
    want = {"download": "Once upon a time a dragon.", "shared": "A girl and her mom.", "network": "Lily saw a slide.",
            "nothing": None, "network, HF_HUB_OFFLINE=1": None}[has]
    assert text == want
    if want is None:
        assert not (raw / "TinyStories-valid.txt").exists()
        why = "HF_HUB_OFFLINE=1" if "OFFLINE" in has else "huggingface.co did not answer"
        assert f"no download ({why})" in said and "Error" not in said  # the notebook test refuses "Error" lines
        assert said.startswith("no TinyStories text here") and "python data/prepare.py tinystories" in said
    else:
        assert os.path.isfile(said)


@pytest.mark.slow
def test_notebook_runs_end_to_end_with_the_answers(tmp_path):
    """The whole workshop, training included, in a copy of the repository (its runs stay out of the checkout), with
    Jupyter started in workshop/. A cell may take 1,500 s: the training cell (two models at once, then the SAE) took
    943 s on this project's 2 cores while other work loaded them (load average 10 to 13)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    repo = tmp_path / "repo"
    skip = shutil.ignore_patterns(".git", "out*", "__pycache__", ".pytest_cache")

    def ignore(d, names):  # and prepared datasets (data/<name>/): the notebook must say what to run without them
        here = os.path.samefile(d, os.path.join(ROOT, "data"))
        prepared = [n for n in names if here and os.path.isdir(os.path.join(d, n))]
        return set(skip(d, names)) | set(prepared)

    shutil.copytree(ROOT, repo, ignore=ignore)
    shared = os.path.join(ROOT, "..", "shared")
    if os.path.isdir(shared):  # Section 7 reads its text there, as in a checkout with ../shared beside it
        os.symlink(os.path.abspath(shared), tmp_path / "shared")
    nb = nbformat.read(repo / "workshop" / "workshop.ipynb", as_version=4)
    old = {k: os.environ.get(k) for k in ("WORKSHOP_SOLUTIONS", "HF_HUB_OFFLINE")}
    os.environ.update(WORKSHOP_SOLUTIONS="1", HF_HUB_OFFLINE="1")  # the kernel's: the answers, and never the hub
    try:
        nbclient.NotebookClient(nb, timeout=1500, kernel_name="python3",
                                resources={"metadata": {"path": str(repo / "workshop")}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert text.count("correct:") == 10, text
    for said in ("entropy floor", "states owning a code of h.0.mlp", "with your layer", "h.0.attn_heads", "forced",
                 "TopK SAE", "single neurons", "TinyStories", "topic dragon", "begun as a cake story"):
        assert said in text, said
    assert "Error" not in text and "Traceback" not in text


# ---------------------------------------------------------------------------------------------- "stuck?" fallback
STUB = '''
import workshop
{above}
@workshop.exercise
def jsd(p, q):
    # YOUR CODE HERE
    raise NotImplementedError
{below}
'''


@pytest.mark.parametrize("where", ["above", "below", "nowhere", "above, then answered"])
def test_the_solution_import_works_above_or_below_the_stub(where):
    """`from workshop.solutions import jsd` typed above the stub's def (which would replace it) or below it: the
    check and the later cells get the answer; without it the check says "not answered yet"; a learner's own
    answer below an earlier import is theirs."""
    line = "from workshop.solutions import jsd"
    src = STUB.format(above=line if where.startswith("above") else "", below=line if where == "below" else "")
    if where == "above, then answered":
        src = src.replace("raise NotImplementedError", "return sol.jsd(p, q) * 0 + 0.5")
    scope = {"sol": sol}
    exec(compile(src, "<cell>", "exec"), scope)
    p = torch.tensor([[0.5, 0.5]])
    if where == "nowhere":
        raises(workshop.check_jsd, scope["jsd"], "not answered yet")
    elif where == "above, then answered":
        assert scope["jsd"](p, p).tolist() == [0.5]  # the learner's own function, not the imported answer
    else:
        assert "correct" in workshop.check_jsd(scope["jsd"])
        assert scope["jsd"](p, p).tolist() == [0.0]


# ---------------------------------------------------------------------------------------------- 6.1 the TopK SAE
@pytest.mark.parametrize("mistake", [kw for kw, _ in workshop.SAE_MISTAKES], ids=str)
def test_sae_check_names_each_mistake(mistake):
    says = dict((tuple(kw.items()), s) for kw, s in workshop.SAE_MISTAKES)[tuple(mistake.items())]
    raises(workshop.check_sae, lambda *a: workshop.sae_reference(*a, **mistake), says[:60])


def detached_values(x, W_enc, b_enc, W_dec, b_dec, k, var):  # the encoder gets no gradient
    x_hat, z, _ = sol.sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, var)
    z = z.detach()
    x_hat = z @ W_dec + b_dec
    return x_hat, z, (x_hat - x).square().mean() / var


@pytest.mark.parametrize("wrong,says", [(missing, "not answered yet"), (detached_values, "the gradient to W_enc"),
                                        (lambda *a: sol.sae_forward(*a)[:2], "returned 2 values"),
                                        (lambda *a: (*sol.sae_forward(*a)[:2], 0.5), "loss is a Python float")])
def test_sae_check(wrong, says):
    raises(workshop.check_sae, wrong, says)


def test_sae_reference_is_sae_py():
    """The check's mistakes start from its reference: without a mistake it is sae.py's SAELayer, loss included."""
    for k in (1, 3):
        case = workshop.sae_case(k)
        ref = workshop.sae_reference(*case[:5], k, case[5])
        layer = workshop.sae_layer_reference(*case[:5], k, case[5])[:3]
        assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(ref, layer))


def test_sae_check_on_trained_saes_and_loading_them(tmp_path):
    """On SAEs that sae.py trained and saved (a few steps on an untrained model without codebooks): load_saes puts
    them back, and the check compares the learner's SAE with them on the model's activations."""
    import sae

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=32, n_head=2, codebook_sites="")).eval()
    fsm = TokFSM()
    saes = sae.insert_saes(model, ["mlp"], 1, 16)
    cfg = sae.SAEConfig(out_dir=str(tmp_path), save_dir=str(tmp_path / "sae"), steps=3, batch_size=4, num_latents=16,
                        device="cpu")
    sae.train_saes(model, fsm, saes, cfg, log_every=3)
    (tmp_path / "sae").mkdir()
    torch.save({"saes": {n: s.state_dict() for n, s in model.codebooks()}, "config": {"sites": "mlp", "k": 1,
                "num_latents": 16}}, tmp_path / "sae" / "sae.pt")
    (tmp_path / "sae" / "results.json").write_text('{"train_s": 1.5}')
    fresh = GPT(GPTConfig(n_embd=32, n_head=2, codebook_sites="")).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "codebooks" not in k})
    loaded, res = workshop.load_saes(fresh, str(tmp_path / "sae"))
    assert res == {"train_s": 1.5} and all(not s.bypass for s in loaded)
    assert torch.equal(loaded[0].W_enc, saes[0].W_enc)
    assert "correct" in workshop.check_sae(sol.sae_forward, loaded, fsm, fresh)
    def off(x, *w):  # right on the check's 64 rows, off on the model's
        x_hat, z, loss = sol.sae_forward(x, *w)
        return x_hat + (x.shape[0] != 64) * 0.1, z, loss
    raises(lambda fn: workshop.check_sae(fn, loaded, fsm, fresh), off, "wrong on the trained SAE's")
    with pytest.raises(ValueError, match="no .*sae.pt: run Section 3's training cell"):
        workshop.load_saes(fresh, str(tmp_path / "nothing"))


def test_train_live_pins_the_runs_to_cpu_float32(monkeypatch, tmp_path):
    """The notebook's numbers were measured on the CPU in fp32: every train.py run gets --device=cpu --dtype=float32
    (on a GPU runtime train.py would pick CUDA and bf16), and a `then` script starts after its run."""
    pytest.importorskip("IPython")
    import matplotlib

    matplotlib.use("Agg")
    started = []

    class Done:
        returncode = 0

        def __init__(self, cmd, **kw):
            started.append(cmd[1:])

        def poll(self):
            return 0

    monkeypatch.setattr(workshop.subprocess, "Popen", Done)
    monkeypatch.setattr("IPython.display.display", lambda fig: None)
    logs = workshop.train_live({"a": [f"--out_dir={tmp_path}"]}, every=0, then={"s": ("a", ["sae.py", "--steps=1"])})
    assert started == [["train.py", "--device=cpu", "--dtype=float32", f"--out_dir={tmp_path}"],
                       ["sae.py", "--steps=1"]]
    assert logs == {"a": [], "s": []}


# ---------------------------------------------------------------------------------------------- 7.1, 7.2 the story language
@pytest.mark.parametrize("mistake", [kw for kw, _ in workshop.BEST_CODE_MISTAKES], ids=str)
def test_best_code_check_names_each_mistake(mistake):
    says = dict((tuple(kw.items()), s) for kw, s in workshop.BEST_CODE_MISTAKES)[tuple(mistake.items())]
    raises(workshop.check_best_code, lambda *a: workshop.best_code_reference(*a, **mistake), says[:60])


def swapped_pr(*a):
    c, p, r = sol.best_code(*a)
    return c, r, p


@pytest.mark.parametrize("wrong,says", [
    (missing, "not answered yet"),
    (swapped_pr, "in the order (code, precision, recall)"),
    (lambda *a: sol.best_code(*a)[0], "returned one number; expected the 3 values"),
    (lambda *a: None, "returned None"),
    (lambda *a: (torch.tensor([0, 1]), 1.0, 1.0), "the code is a tensor of shape (2,)"),
    (lambda *a: (5, 0.0, 0.0), "code 5 has F1 0.000 for value 1; code 0 has 0.556"),
])
def test_best_code_check(wrong, says):
    raises(workshop.check_best_code, wrong, says)


def test_best_code_answer_and_tensor_numbers():
    assert workshop.best_code_reference(*workshop.best_code_case()) == pytest.approx((0, 5 / 6, 5 / 12))
    assert "correct" in workshop.check_best_code(lambda *a: tuple(torch.tensor(x) for x in sol.best_code(*a)))


def story_run():
    """A story-language 'model's' codes and truth as story_codes returns them, made by hand: head 0's code t + 1
    fires for topic t where the topic decides the next word, code 0 elsewhere; head 1 fires code 0 everywhere."""
    g = torch.Generator().manual_seed(0)
    N = 4000
    topic = torch.randint(16, (N,), generator=g)
    where = torch.rand(N, generator=g) < 0.3
    h0 = torch.where(where, topic + 1, torch.zeros_like(topic))
    h0[:20] = torch.where(where[:20], 40, h0[:20])  # a few misses
    return {"codes": {"h.0.attn_heads:0": h0, "h.0.attn_heads:1": torch.zeros(N, dtype=torch.long)},
            "topic": topic, "mood": torch.randint(4, (N,), generator=g), "topic_where": where,
            "mood_where": torch.rand(N, generator=g) < 0.1, "N": N,
            "num_codes": {"h.0.attn_heads:0": 64, "h.0.attn_heads:1": 64}}


def test_best_code_on_a_story_run_and_best_codes():
    run = story_run()
    assert "correct" in workshop.check_best_code(sol.best_code, run, 3)
    off = lambda codes, *a: sol.best_code(codes, *a) if codes.max() > 0 else (1, 0.0, 0.0)  # noqa: E731
    raises(lambda fn: workshop.check_best_code(fn, run, 3), off, "code 1 of h.0.attn_heads:1 has F1")
    found = workshop.best_codes(sol.best_code, run)
    assert [(b, c) for _, b, c, _, _ in found] == [("h.0.attn_heads:0", t + 1) for t in range(16)]
    assert found[0][0] == "dragon" and all(p == 1.0 for *_, p, _ in found)


@pytest.mark.parametrize("answer,says", [("", "not answered yet"), (None, "not answered yet"),
                                         ("unicorn", "'unicorn' is not a topic or mood"),
                                         ("pirate", "'pirate' is not what h.0.attn_heads:0:4 detects")])
def test_code_meaning_check(answer, says):
    with pytest.raises(AssertionError, match=re.escape(says)):
        workshop.check_code_meaning(answer, story_run(), "h.0.attn_heads:0", 4)


def test_code_meaning_right_answer_and_solution(tmp_path):
    run = story_run()  # code 4 of head 0 fires for topic 3 (rocket)
    assert "correct: h.0.attn_heads:0:4 is topic rocket" in workshop.check_code_meaning("topic rocket", run,
                                                                                          "h.0.attn_heads:0", 4)
    (tmp_path / "stories.json").write_text(json.dumps({"topic": {"values": [{"value": "rocket", "book":
                                                     "h.0.attn_heads:0", "code": 4}]}, "mood": {"values": []}}))
    assert sol.code_meaning(str(tmp_path), "h.0.attn_heads:0", 4) == "rocket"
    assert sol.code_meaning(str(tmp_path), "h.0.attn_heads:0", 5) == ""


def test_story_codes_reads_a_story_model(tmp_path):
    """story_codes on an untrained story-shaped model: every head's codes and the truth, aligned with val.bin."""
    import stories
    from plumbing.tokens import lm_batches, load_tokens

    data = tmp_path / "stories"
    r = subprocess.run([sys.executable, "data/prepare.py", "stories", f"--out={data}", "--train_stories=50",
                        "--val_stories=40"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=32, vocab_size=256, num_codes=8,
                          codebook_sites="attn_heads")).eval()
    run = workshop.story_codes(model, str(data), max_tokens=512, batch_size=4)
    assert set(run["codes"]) == {"h.0.attn_heads:0", "h.0.attn_heads:1"} and run["N"] == 512
    truth = stories.load_truth(str(data))
    assert torch.equal(run["topic"], torch.from_numpy(truth["topic"][:512].astype("int64")))
    assert run["topic_where"].any() and not run["topic_where"].all()
    x = torch.cat([b for b, _ in lm_batches(load_tokens(str(data), 32, 256)[1], 32, 512, 4)])
    model(x)  # all 16 windows at once: the codes of head 1, in the same order
    cb = dict(model.codebooks())["h.0.attn_heads"]
    assert torch.equal(run["codes"]["h.0.attn_heads:1"], cb.last_indices[:, :, 1, 0].reshape(-1).long())
    with pytest.raises(ValueError, match="no codebooks"):
        workshop.story_codes(GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, codebook_sites="")), str(data))


def test_training_plot_of_a_language_model_shows_accuracy():
    """A story run's evaluations have no valid transitions: the third panel is its next-token accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    recs = [{"iter": 100, "ce": 3.0}, {"iter": 400, "eval": {"loss": 0.8, "acc": 0.7, "fvu": 0.15}}]
    fig = workshop.plot_training({"story model": recs}, switch=200, floor=0.5)
    ax3 = fig.axes[2]
    assert ax3.get_title() == "next-token accuracy" and list(ax3.lines[0].get_ydata()) == [70.0]
