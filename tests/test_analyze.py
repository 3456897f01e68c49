"""analyze.py: collected codes are the forward's choices, precision/recall and the neuron baseline on hand-made
arrays, FSM readouts and state codes, regex concepts and topic codes, the HTML browser, and the CLI end to end."""

import json
import os
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from conftest import write_lm_dataset
import torch

import analyze
import report
from fsm import TokFSM
from model import GPT, GPTConfig
from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(k=1, sites="attn_heads,mlp", vocab=11, layers=2):
    cfg = GPTConfig(n_layer=layers, n_embd=32, n_head=2, block_size=16, vocab_size=vocab, codebook_sites=sites,
                    num_codes=16, k=k)
    return GPT(cfg).eval()


def save_ckpt(model, path, **train):
    os.makedirs(path, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "train_config": asdict(TrainConfig(**train)), "iter_num": 0, "optimizer": {},
                "rng": {}}, os.path.join(path, "ckpt.pt"))


# ---------------------------------------------------------------------------------------------- collecting
@pytest.mark.parametrize("k", [1, 3])
def test_collected_codes_are_the_ids_the_forward_chose(k):
    model = tiny(k)
    x = torch.randint(11, (6, 16))
    seen = {}  # reference: score each codebook's input ourselves
    hooks = [cb.register_forward_pre_hook(lambda m, inp, s=s: seen.__setitem__(s, inp[0]))
             for s, cb in model.codebooks()]
    col = analyze.collect_codes(model, x.split(4))  # two batches, streamed
    for h in hooks:
        h.remove()
    assert torch.equal(col["tokens"], x.to(torch.int32))
    model(x[4:])  # `seen` now holds the inputs of the second batch only: check it against the recorded rows
    for s, cb in model.codebooks():
        a = cb.ln(seen[s].reshape(-1, cb.groups, 32 // cb.groups))
        want = cb.topk_codes(a).view(2, 16, cb.groups, k)
        assert col["codes"][s].dtype == torch.int16 and col["codes"][s].shape == (6, 16, cb.groups, k)
        assert torch.equal(col["codes"][s][4:].long(), want)
    full = analyze.collect_codes(model, [x])  # batching does not change the ids
    assert all(torch.equal(full["codes"][s], col["codes"][s]) for s in col["codes"])


def test_code_stats():
    st = analyze.code_stats(torch.tensor([[0], [0], [1], [1], [-1]]), 4)
    assert st["counts"].tolist() == [2, 2, 0, 0]
    assert st["dead_pct"] == 50 and st["entropy_bits"] == pytest.approx(1.0) and st["effective"] == pytest.approx(2)


# ---------------------------------------------------------------------------------------------- precision / recall
def test_precision_recall_hand_made():
    codes = torch.tensor([[0], [0], [1], [1], [2], [-1]])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    counts, P, R = analyze.precision_recall(codes, labels, 2, 3)
    assert counts.tolist() == [[2, 1, 0], [0, 1, 1]]
    torch.testing.assert_close(P, torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0]]))
    torch.testing.assert_close(R, torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 1 / 3]]))
    code, p, r = analyze.best_codes(P, R)
    assert code.tolist() == [0, 2]  # F1 0.8 for label 0; for label 1 code 2 (0.5) beats code 1 (0.4)
    # k = 2: each position fires two codes
    counts, P, R = analyze.precision_recall(torch.tensor([[0, 1], [1, 2]]), torch.tensor([0, 1]), 2, 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 1]]
    assert P[0, 1] == 0.5 and R[0, 0] == 1 and R[1, 1] == 1


def test_neuron_baseline_hand_made():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    acts = torch.tensor([[5.0, 1], [6, 2], [7, 3], [8, 9],  # neuron 0 separates label 0 perfectly
                         [1, 8], [2, 7], [3, 6], [4, 0.5]])
    prec, neuron, thr = analyze.neuron_baseline(acts, labels, torch.tensor([1.0, 0.75]))
    assert neuron[0] == 0 and prec[0] == 1.0 and thr[0] == 5.0
    # label 1 at recall 0.75: neuron 1 at threshold 6 fires on 6, 7, 8, 9 -> 3 of 4 correct; neuron 0 worse
    assert neuron[1] == 1 and prec[1] == pytest.approx(0.75) and thr[1] == 6.0


# ---------------------------------------------------------------------------------------------- TokFSM
def test_fsm_readouts_positions_and_labels():
    fsm = TokFSM(num_states=100, num_edges=10)
    x = fsm.sample_tokens(3, 12, torch.Generator().manual_seed(0))  # BOS + 5 states + 1 digit
    states = fsm.tokens_to_states(x[:, 1:])
    reads = analyze.fsm_readouts(x, fsm)
    rows, cols, labels = reads["state"]
    assert cols[:5].tolist() == [2, 4, 6, 8, 10] and torch.equal(labels.view(3, 5), states)
    rows, cols, labels = reads["state_digit"]
    assert cols[:5].tolist() == [3, 5, 7, 9, 11]
    assert labels[0].item() == states[0, 0].item() * 10 + x[0, 3].item()


def test_fsm_analysis_finds_perfect_state_codes():
    """A hand-made codebook that chooses code = state at every position owns every state, P = R = 1."""
    fsm = TokFSM(num_states=20, num_edges=3)
    x = fsm.sample_tokens(64, 17, torch.Generator().manual_seed(0))
    states = fsm.tokens_to_states(x[:, 1:])  # (64, 8)
    codes = torch.zeros(64, 17, 1, 1, dtype=torch.int16)
    codes[:, 2::2, 0, 0] = states
    codes[:, 1::2, 0, 0] = 40  # first digits: an unrelated code
    cb = SimpleNamespace(num_codes=50, k=1)
    col = {"tokens": x, "codes": {"h.0.mlp": codes}, "books": [("h.0.mlp", "h.0.mlp", 0, cb)]}
    summary, tables, concepts = analyze.fsm_analysis(col, fsm)
    seen = states.unique().tolist()  # a state without predecessors may not occur
    assert len(seen) >= 18 and summary["mlp"]["states_owning_code"] == summary["mlp"]["of"] == len(seen)
    assert summary["mlp"]["mean_precision"] == 1 and summary["mlp"]["mean_recall"] == 1
    assert [s["code"] for s in summary["mlp"]["per_state"]] == seen
    assert concepts["h.0.mlp"][7][0] == ("state 7", 1.0, 1.0)
    assert summary["books"]["h.0.mlp"]["state_digit"]["owned"] == 0  # one code per state, not per digit


def test_fsm_analysis_first_state_readout_ignores_a_split_by_position():
    """Codes that name the state but change with position (code = state at positions 2-8, state + 20 after):
    at every state no code reaches recall 0.9; at the first state (the authors' protocol) every state owns one."""
    fsm = TokFSM(num_states=20, num_edges=3)
    x = fsm.sample_tokens(256, 17, torch.Generator().manual_seed(0))
    states = fsm.tokens_to_states(x[:, 1:])  # (256, 8): last digits at positions 2, 4, ..., 16
    codes = torch.full((256, 17, 1, 1), 45, dtype=torch.int16)
    codes[:, 2:9:2, 0, 0] = states[:, :4]
    codes[:, 10::2, 0, 0] = states[:, 4:] + 20
    cb = SimpleNamespace(num_codes=50, k=1)
    col = {"tokens": x, "codes": {"h.0.mlp": codes}, "books": [("h.0.mlp", "h.0.mlp", 0, cb)]}
    m = analyze.fsm_analysis(col, fsm)[0]["mlp"]
    first = states[:, 0].unique()
    assert m["states_owning_code_first"] == m["of_first"] == len(first) >= 18
    early = torch.bincount(states[:, :4].flatten(), minlength=20).float()
    late = torch.bincount(states[:, 4:].flatten(), minlength=20).float()
    share = torch.maximum(early, late) / (early + late).clamp(min=1)  # recall of the state's better code
    want = int(((share >= 0.9) & (early + late > 0)).sum())  # only states that hardly occur late (or early)
    assert m["states_owning_code"] == want < len(first) - 10 and m["mean_precision"] == 1


# ---------------------------------------------------------------------------------------------- language
VOCAB = ["Once", " upon", " a", " dra", "gon", " cat", ".", " fire"]


def tok(t):
    return VOCAB[t]


def test_regex_marks_tokens_and_concept_search_ranks_the_detector():
    x = torch.tensor([[0, 1, 2, 3, 4, 6], [2, 5, 6, 3, 4, 7]])
    mask = analyze.regex_mask(x, tok, "dragon")
    assert mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0]]
    codes = torch.where(mask, 3, 1).view(2, 6, 1, 1).to(torch.int16)  # code 3 fires exactly on the dragon tokens
    col = {"tokens": x, "codes": {"s": codes}, "books": [("s", "s", 0, SimpleNamespace(num_codes=5, k=1))]}
    book, code, p, r, n = analyze.concept_search(col, mask, top=2)[0]
    assert (book, code, p, r, n) == ("s", 3, 1.0, 1.0, 4)


# ---------------------------------------------------------------------------------------------- browser, CLI
def test_browser_html_is_produced_and_holds_the_codes(tmp_path):
    """The explorer page (tests/test_explorer.py reads it in a browser): one file holding every book's counts."""
    model = tiny()
    col = analyze.collect_codes(model, [torch.randint(11, (8, 16))])
    col["books"] = model.books()
    path = tmp_path / "b.html"
    stats = {b: analyze.code_stats(col["codes"][n][:, :, g], cb.num_codes) for b, n, g, cb in col["books"]}
    report.write_browser(str(path), col, lambda row: [str(t) for t in row], stats, n_codes=5)
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    data = json.loads(text.split('<script id="data" type="application/json">')[1].split("</script>")[0])
    assert [b["name"] for b in data["books"]] == [b for b, _, _, _ in col["books"]]
    assert "http" not in text.replace("http-equiv", "")  # self-contained: nothing to fetch


@pytest.mark.slow
def test_cli_fsm_writes_everything(tmp_path):
    model = tiny()
    save_ckpt(model, tmp_path / "run", num_states=20, num_edges=3)
    out = tmp_path / "an"
    analyze.main([f"--out_dir={tmp_path / 'run'}", f"--save_dir={out}", "--num_seqs=64", "--device=cpu", "--html_codes=3"])
    for f in ("codes.pt", "stats.json", "freq.png", "browser.html", "fsm.json", "fsm_tables.pt", "heatmap.png", "neurons.png"):
        assert (out / f).stat().st_size > 0, f
    summary = json.loads((out / "fsm.json").read_text())
    assert 0 <= summary["mlp"]["states_owning_code"] <= 20 and 0 <= summary["neurons"]["mean_precision"] <= 1
    col = torch.load(out / "codes.pt", weights_only=True)
    assert col["codes"]["h.0.mlp"].shape == (64, 16, 1, 1)
    analyze.main([f"--out_dir={tmp_path / 'run'}", f"--save_dir={out}", f"--codes={out / 'codes.pt'}", "--device=cpu"])


def test_cli_loss_recovered_against_a_reference_run(tmp_path):
    """--ref_dir: the total's loss_ref is the reference run's loss on the analysed eval set, and recovered_vs_ref
    uses it in place of the bypassed loss; a reference with codebooks or on another FSM is refused."""
    torch.manual_seed(0)
    save_ckpt(tiny(), tmp_path / "run", num_states=20, num_edges=3)
    ref = tiny(sites="")
    save_ckpt(ref, tmp_path / "ref", num_states=20, num_edges=3)
    save_ckpt(tiny(sites=""), tmp_path / "other", num_states=30, num_edges=3)
    out = tmp_path / "an"
    args = [f"--out_dir={tmp_path / 'run'}", f"--save_dir={out}", "--num_seqs=64", "--device=cpu", "--html_codes=1"]
    analyze.main([*args, f"--ref_dir={tmp_path / 'ref'}"])
    t = json.loads((out / "stats.json").read_text())["codebooks"]["total"]
    x, y = TokFSM(20, 3).eval_set(64, 16)
    want = torch.nn.functional.cross_entropy(ref(x)[0].reshape(-1, 11), y.reshape(-1)).item()
    assert t["loss_ref"] == pytest.approx(want, rel=1e-5)
    assert t["recovered_vs_ref"] == pytest.approx((t["loss_zero"] - t["loss"]) / (t["loss_zero"] - want), rel=1e-5)
    for bad in ("run", "other"):
        with pytest.raises(analyze.ConfigError, match="ref_dir"):
            analyze.main([*args, f"--ref_dir={tmp_path / bad}"])


def test_cli_language_model_regex_concepts(tmp_path):
    text = "Once upon a time there was a dragon. The dragon saw a king in a castle. A baby had a flower. " * 16
    data = write_lm_dataset(tmp_path / "data", text)
    model = tiny(k=2, sites="attn_heads", vocab=384, layers=1)
    save_ckpt(model, tmp_path / "run", dataset=str(data))
    out = tmp_path / "an"
    analyze.main([f"--out_dir={tmp_path / 'run'}", f"--save_dir={out}", "--regex= dragon", "--device=cpu"])
    found = json.loads((out / "concepts.json").read_text())
    assert found["regex"] == " dragon" and found["tokens"]
    assert all(book.startswith("h.0.attn_heads:") for book, *_ in found["tokens"])
    html = (out / "browser.html").read_text()
    assert json.dumps('regex " dragon"') in html and '" dragon"' in html  # the concept; the token in the page's strings
