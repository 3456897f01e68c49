"""topics.py: topic codes on hand-made codes, topic steering on a model built to write a word, the CLI end to end on
a tiny random language model, and LM ablation through steer.py."""

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from conftest import write_lm_dataset
import torch

import steer
import topics
from model import GPT, GPTConfig
from train import TrainConfig

VOCAB = ["Once", " upon", " a", " dra", "gon", " cat", ".", " fire"]


def tok(t):
    return VOCAB[t]


def test_topic_codes_context_and_dense():
    x = torch.tensor([[0, 1, 2, 3, 4, 6], [2, 5, 6, 3, 4, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    codes = torch.where(mask, 3, 1).view(2, 6, 1, 1).to(torch.int16)  # code 3 fires exactly on the dragon tokens
    col = {"tokens": x, "codes": {"s": codes}, "books": [("s", "s", 0, SimpleNamespace(num_codes=5, k=1))]}
    found = topics.topic_codes(col, tok, "fire", window=0, min_count=1)
    assert found["context"][0][:3] == ("s", 1, 1 / 8)  # " fire" is a code-1 token; 1 of code 1's 8 firings
    assert found["dense"][0][:2] == ("s", 1)  # code 1 fires on 4 of 6 tokens of each text


def test_dense_codes():
    codes = torch.tensor([[0, 0, 0, 1], [2, 2, 1, 1]]).view(2, 4, 1)
    assert topics.dense_codes(codes, 3).tolist() == [[True, False, False], [False, False, False]]


def test_frequent_nouns_counts_words_after_determiners():
    text = ("The dog saw a cat. The dogs ran to the park with a big ball. Her dog and his ball. "
            "Once upon a time, the little cat sat.")
    # dogs -> dog; "a big ball", "the little cat": past the adjectives; "a time": a set phrase, left out
    assert topics.frequent_nouns(text, 3) == [("dog", 3), ("cat", 2), ("ball", 2)]


def test_parse_topics():
    assert topics.parse_topics("princess,sea=ocean|sea") == {"princess": "prince|crown|king|castle", "sea": "ocean|sea"}
    with pytest.raises(topics.ConfigError, match="unknown topic 'sea'"):
        topics.parse_topics("sea")
    with pytest.raises(topics.ConfigError, match="not a valid regular expression"):
        topics.parse_topics("sea=(ocean")


def tiny(k=1, vocab=64, num_codes=256, tie=False):
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=vocab, codebook_sites="attn_heads,mlp",
                    num_codes=num_codes, k=k, tie_weights=tie)
    return GPT(cfg).eval()


def test_topic_steering_mechanics():
    """A code built to write the 'dragon' token: forcing it makes every sample match, the baseline rarely."""
    model = tiny()  # code 5 is rarely the natural choice
    words = [f" w{i}" for i in range(64)]
    words[7] = " dragon"
    codec = SimpleNamespace(encode=lambda docs: [[ord(ch) % 60 for ch in d] for d in docs],
                            decode=lambda ids: "".join(words[i] for i in ids), eot=63)
    cb = dict(model.codebooks())["h.1.mlp"]
    u = torch.randn(32)
    u = (u - u.mean()) / (u - u.mean()).norm()  # survives ln_f's centring
    with torch.no_grad():  # logit of 'dragon' = 3 (ln_f(x) . u - 2): about -6 normally, about +11 along code 5
        model.lm_head.weight[7] = 3 * u
        model.transformer.ln_f.bias.copy_(-2 * u)
        cb.codes[0, 5] = 50 * u
    prompts = ["", "Once", "A", "The"]
    res, samples = topics.topic_steering(model, codec, {"dragon": [("h.1.mlp", 0, 5)]}, {"dragon": "dragon"},
                                         per_prompt=3, max_new_tokens=4, seed=0, prompts=prompts)
    assert len(samples["baseline"]) == len(samples["dragon"]) == 12
    assert res["dragon"]["steered"] == 1.0 and res["dragon"]["baseline"] < 0.5


@pytest.mark.slow
def test_cli_language_model_topics_and_ablation(tmp_path, capsys):
    """The TinyStories path end to end on a tiny random model and a toy token file: mechanics only."""
    data = write_lm_dataset(tmp_path / "data", "Once upon a time there was a dragon and a king. " * 40)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=384,
                          codebook_sites="attn_heads", num_codes=16, k=2))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "optimizer": {}, "rng": {},
                "train_config": asdict(TrainConfig(dataset=str(data))), "iter_num": 0}, run_dir / "ckpt.pt")
    # find the codes, then steer with them: topics.json, concepts.json, steering.json in <out_dir>/topics
    topics.main([f"--out_dir={run_dir}", "--topics=dragon,princess,king=KING", "--samples_per_prompt=1",
                 "--max_new_tokens=4", "--device=cpu"])
    found = json.loads((run_dir / "topics" / "topic_codes.json").read_text())
    assert set(found) == {"dragon", "princess", "king"} and all(found.values())
    assert all(spec.startswith("h.0.attn_heads:") for spec in found["dragon"])
    res = json.loads((run_dir / "topics" / "steering.json").read_text())["results"]
    assert set(res) == {"dragon", "princess", "king"} and all(r["codes"] == 1 for r in res.values())
    # steering with a given file of codes, several per topic
    (tmp_path / "topics.json").write_text(json.dumps({"dragon": ["h.0.attn_heads:1:3", "h.0.attn_heads:0:5"],
                                                      "princess": []}))
    topics.main([f"--out_dir={run_dir}", f"--topic_codes={tmp_path / 'topics.json'}", "--topics=dragon,princess",
                 "--samples_per_prompt=2", "--max_new_tokens=20", "--device=cpu", f"--save_dir={tmp_path / 't'}"])
    res = json.loads((tmp_path / "t" / "steering.json").read_text())["results"]
    assert set(res) == {"dragon", "princess"} and res["dragon"]["codes"] == 1 and res["princess"]["codes"] == 0
    assert all(0 <= r[k] <= 1 for r in res.values() for k in ("baseline", "steered"))
    topics.main([f"--out_dir={run_dir}", f"--topic_codes={tmp_path / 'topics.json'}", "--topics=dragon",
                 "--codes_per_topic=2", "--samples_per_prompt=1", "--max_new_tokens=4", "--device=cpu",
                 f"--save_dir={tmp_path / 't'}"])
    assert json.loads((tmp_path / "t" / "steering.json").read_text())["results"]["dragon"]["codes"] == 2
    steer.main([f"--out_dir={run_dir}", "--task=ablate", "--ablate=h.0.attn_heads:0:1,h.0.attn_heads:0:2",
                "--ablate_to=zero", "--eval_seqs=8", "--device=cpu"])
    out = capsys.readouterr().out
    assert "dragon" in out and "loss" in out and "ppl" in out
