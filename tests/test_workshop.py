"""workshop.ipynb: each exercise's check passes the answer in workshop_solutions.py and fails, saying why, on a
missing answer and on typical wrong ones; the notebook runs end to end with the answers filled in (nbclient), its
committed copy holds no outputs, and every exercise has its answer cell and its check cell."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import workshop
import workshop_solutions as sol

NOTEBOOK = os.path.join(ROOT, "workshop.ipynb")


def missing(*args):
    raise NotImplementedError


def dot_product(a, codes, k):  # scores without normalising
    idx = (a.detach() @ codes.detach().T).topk(k, dim=-1).indices
    q = codes[idx].sum(1)
    return q + a - a.detach(), idx, F.mse_loss(q, a.detach())


def no_straight_through(a, codes, k):
    out, idx, recon = sol.codebook_forward(a, codes, k)
    return codes[idx].sum(1), idx, recon


def recon_not_detached(a, codes, k):
    out, idx, _ = sol.codebook_forward(a, codes, k)
    return out, idx, F.mse_loss(codes[idx].sum(1), a)


def first_code_only(a, codes, k):  # k codes chosen, one summed
    out, idx, recon = sol.codebook_forward(a, codes, k)
    q = codes[idx[:, 0]]
    return q + a - a.detach(), idx, F.mse_loss(q, a.detach())


@pytest.mark.parametrize("wrong,says", [
    (missing, "not answered yet"), (dot_product, "dot products"), (no_straight_through, "straight-through"),
    (recon_not_detached, "recon = MSE(q, a.detach())"), (first_code_only, "sum of the chosen codes"),
])
def test_codebook_check(wrong, says):
    assert "correct" in workshop.check_codebook(sol.codebook_forward)
    with pytest.raises(AssertionError, match=says.replace("(", r"\(").replace(")", r"\)")):
        workshop.check_codebook(wrong)


def swapped(codes, labels, L, M):
    P, R = sol.precision_recall(codes, labels, L, M)
    return R, P


def counts_only(codes, labels, L, M):
    both = torch.zeros(L, M).index_put_((labels, codes), torch.ones(len(codes)), accumulate=True)
    return both, both


@pytest.mark.parametrize("wrong,says", [(missing, "not answered yet"), (swapped, "divide by how often the code"),
                                        (counts_only, "divide by how often the code")])
def test_precision_recall_check(wrong, says):
    codes, labels = torch.randint(7, (200,)), torch.randint(5, (200,))
    assert "correct" in workshop.check_precision_recall(sol.precision_recall, codes, labels)
    with pytest.raises(AssertionError, match=says):
        workshop.check_precision_recall(wrong, codes, labels)


def in_bits(p, q):
    return sol.jsd(p, q) / torch.log(torch.tensor(2.0))


def naive(p, q):  # 0 * log 0 left as NaN
    m = (p + q) / 2
    return ((p * (p / m).log()).sum(-1) + (q * (q / m).log()).sum(-1)) / 2


def kl_only(p, q):
    return (p * (p.clamp(min=1e-30) / q.clamp(min=1e-30)).log()).sum(-1)


@pytest.mark.parametrize("wrong,says", [(missing, "not answered yet"), (in_bits, "natural log"),
                                        (naive, "0 \\* log 0"), (kl_only, "KL\\(p \\|\\| m\\)")])
def test_jsd_check(wrong, says):
    assert "correct" in workshop.check_jsd(sol.jsd)
    with pytest.raises(AssertionError, match=says):
        workshop.check_jsd(wrong)


def test_committed_notebook_is_clean_and_has_an_answer_and_a_check_per_exercise():
    nb = json.load(open(NOTEBOOK))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "outputs not cleared"
    sources = ["".join(c["source"]) for c in code]
    exercises = [i for i, s in enumerate(sources) if "# YOUR CODE HERE" in s]
    assert len(exercises) == 3
    for i in exercises:
        assert "raise NotImplementedError" in sources[i] and "from workshop_solutions import" in sources[i]
        assert sources[i + 1].startswith("workshop.check_")
    sections = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"
                and "".join(c["source"]).startswith("## ")]
    assert len(sections) == 6 and all("**Learning objectives**" in t for t in sections)
    assert sum("**What you saw.**" in "".join(c["source"]) for c in nb["cells"]) == 6


def test_notebook_runs_end_to_end_with_the_answers(tmp_path):
    """The whole workshop, training included, in a copy of the repository (its runs stay out of the checkout)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "out*", "__pycache__", ".pytest_cache"))
    nb = nbformat.read(repo / "workshop.ipynb", as_version=4)
    old = os.environ.get("WORKSHOP_SOLUTIONS")
    os.environ["WORKSHOP_SOLUTIONS"] = "1"
    try:
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(repo)}}
                                ).execute()
    finally:
        if old is None:
            del os.environ["WORKSHOP_SOLUTIONS"]
        else:
            os.environ["WORKSHOP_SOLUTIONS"] = old
    text = "\n".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert text.count("correct:") == 3 and "states owning a code of h.0.mlp" in text and "forced " in text
    assert (repo / "out-workshop" / "analysis" / "fsm.json").exists()
