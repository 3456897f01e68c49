"""The story language (stories.py): labels exact on a known text, determinism from a seed, the exact entropy floor
against a Monte Carlo estimate, the word-level tokenizer through plumbing/tokens.py, the truth scoring of codes and
of generated text; data/prepare.py stories (one-line errors, nothing lost) and, marked slow, train -> analyze ->
topics end to end on a tiny model."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import stories
from stories import MOOD_NAMES, TOPIC_NAMES, StoryLanguage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN = ("Once upon a time, there was a sad boy named Tom. He lived near a big robot. Tom saw a shiny wire. "
         "It was a gloomy day. So he cried again. From that day on, Tom was always lonely.")
# by hand, one mark per token of KNOWN, sentence by sentence: the next word is written by a topic slot (T), a mood
# slot (M) or neither (.): "a" before "sad", "big" before "robot", "shiny" before "wire", "a" before "gloomy", "he" before "cried",
# "always" before "lonely"
KNOWN_MARKS = ".......M....." + "....T.." + "...T.." + "..M..." + ".M..." + ".......M.."


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def one_line_error(r, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.fixture(scope="module")
def lang():
    return StoryLanguage(seed=0)


def test_labels_exact_on_known_text(lang):
    topic, mood, topic_next, mood_next = lang.truth_of(KNOWN)
    assert (TOPIC_NAMES[topic], MOOD_NAMES[mood]) == ("robot", "sad")
    marks = "".join("T" if t else "M" if m else "." for t, m in zip(topic_next, mood_next))
    assert len(lang.encode(KNOWN)) == len(KNOWN_MARKS) and marks == KNOWN_MARKS
    assert lang.latent_of_text(lang.encode(KNOWN))[:2] == (topic, mood)
    with pytest.raises(ValueError, match="not one story"):
        lang.truth_of("Once upon a time, there was a sad boy named Tom. He lived near a big robot.")
    with pytest.raises(ValueError, match="'zebra' is not a word"):
        lang.encode("Once upon a zebra")


def test_sampler_labels_match_the_text(lang):
    """The sampler's labels (from the derivation) equal those read back from each story's text alone."""
    s = lang.sample(60, seed=3)
    for i in range(60):
        at = s.story == i
        ids = s.tokens[at]
        assert ids[-1] == lang.eot and (ids[:-1] != lang.eot).all()
        topic, mood, tn, mn = lang.truth_of(lang.decode(ids[:-1]))
        assert topic == s.topic[at][0] and mood == s.mood[at][0]
        assert (tn == s.topic_next[at][:-1]).all() and (mn == s.mood_next[at][:-1]).all()
        assert not s.topic_next[at][-1] and not s.mood_next[at][-1]


def test_determinism(lang):
    a, b = StoryLanguage(seed=7).sample(50), StoryLanguage(seed=7).sample(50)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    c = StoryLanguage(seed=8).sample(50)
    assert not np.array_equal(a.tokens[:500], c.tokens[:500])
    assert np.array_equal(lang.sample(20, seed=5).tokens, lang.sample(20, seed=5).tokens)
    gen = StoryLanguage(seed=7)
    assert not np.array_equal(gen.sample(20).tokens[:300], gen.sample(20).tokens[:300])  # the stream goes on


def test_floor_against_monte_carlo(lang):
    """log_prob (from the tokens alone, summing over every derivation) equals the sampler's ln p, so the grammar is
    read back unambiguously; the mean -ln p per token of 8,000 stories is the exact floor within 4 standard errors."""
    floor, h, tokens = lang.entropy_floor()
    small = lang.sample(100, seed=11)
    parsed = [lang.log_prob(small.tokens[small.story == i][:-1]) for i in range(100)]
    assert np.allclose(parsed, small.logp, atol=1e-9)
    s = lang.sample(8_000, seed=12)
    n = np.bincount(s.story).astype(float)  # tokens per story, EOT included
    est = -s.logp.sum() / n.sum()
    # the ratio estimator's standard error (delta method)
    se = np.std(-s.logp - floor * n) / math.sqrt(len(n)) / n.mean()
    assert abs(est - floor) < 4 * se and se < 0.003, (est, floor, se)
    assert abs(n.mean() - tokens) < 4 * n.std() / math.sqrt(len(n))
    assert lang.max_story_tokens() >= n.max()


def test_grammar_checks(monkeypatch):
    StoryLanguage()  # the grammar as it is can be read back
    with monkeypatch.context() as m:  # an ending that a body sentence could be: the story's length is unreadable
        m.setattr(stories, "ENDINGS", stories.ENDINGS + ["So {pron} {act} again ."])
        with pytest.raises(ValueError, match="cannot be told apart"):
            StoryLanguage()
    with monkeypatch.context() as m:  # a mood word in a frame of its own: the truth of that word is unclear
        m.setattr(stories, "BODY", stories.BODY + ["Everyone was happy ."])
        with pytest.raises(ValueError, match="two kinds"):
            StoryLanguage()
    with pytest.raises(ValueError, match="positive number"):
        StoryLanguage().sample(0)


def test_tokenizer_through_plumbing(lang, tmp_path):
    from plumbing.tokens import load_codec

    path = tmp_path / "tokenizer.json"
    path.write_text(lang.tokenizer_json())
    codec = load_codec("neox", str(path))
    s = lang.sample(5, seed=1)
    assert codec.eot == lang.eot and codec.vocab_size == lang.vocab_size
    text = codec.decode(s.tokens.tolist())
    assert text == lang.decode(s.tokens) and lang.encode(text) == s.tokens.tolist()
    docs = text.split("<|endoftext|>")[:-1]
    assert sum(codec.encode(docs), []) == s.tokens[s.tokens != lang.eot].tolist()


def test_code_truth_on_known_codes(lang):
    """A book whose code is the topic everywhere owns every topic (P = R = 1), and the dense heuristic picks it; a book
    whose code is the mood only where the mood decides the next word is exact there and not over all tokens."""
    s = lang.sample(400, seed=2)
    T = 64
    n = len(s.tokens) // T
    cut = lambda a: torch.from_numpy(a[: n * T].astype(np.int64)).view(n, T)  # noqa: E731
    truth = {k: getattr(s, k) for k in ("topic", "mood", "topic_next", "mood_next", "topic_seen", "mood_seen", "story")}
    wt = stories.window_truth(truth, cut(s.tokens), s.tokens)
    for latent in ("topic", "mood"):  # known: seen, with its word inside the window
        known, seen = wt[f"{latent}_known"].bool(), wt[f"{latent}_seen"].bool()
        assert (known <= seen).all() and known.any()
        for i in range(1, n):
            cut_story = wt["story"][i] == wt["story"][i - 1, -1]  # (T,) the story that began in the window before
            before = seen[i - 1, -1] & cut_story  # its latent's word was written before the window
            assert (known[i] == seen[i] & ~before).all()
    cb = type("CB", (), {"k": 1, "num_codes": 20})()
    mood_code = torch.where(wt["mood_next"].bool(), wt["mood"] + 16, torch.full_like(wt["mood"], 0))
    col = {"tokens": cut(s.tokens), "codes": {"a": wt["topic"].view(n, T, 1, 1), "b": mood_code.view(n, T, 1, 1)},
           "books": [("h.0.a", "a", 0, cb), ("h.0.b", "b", 0, cb)]}
    tables = stories.code_truth(col, wt)
    summary = stories.summarize(tables, wt)
    t, m = summary["topic"], summary["mood"]
    assert t["owned"] == 16 and all(x["book"] == "h.0.a" and x["code"] == v for v, x in enumerate(t["values"]))
    assert all(x["P_next"] == 1 and x["R_next"] == 1 and x["R_all"] == 1 for x in t["values"])
    assert all(x["dense"]["book"] == "h.0.a" and x["dense"]["story_precision"] == 1 for x in t["values"])
    assert m["owned"] == 4 and all(x["book"] == "h.0.b" and x["code"] == v + 16 for v, x in enumerate(m["values"]))
    assert all(x["P_all"] == 1 and x["R_all"] < 0.2 for x in m["values"])  # the code is silent where mood is not next
    with pytest.raises(Exception, match="collect them again"):
        stories.window_truth(truth, cut(s.tokens).flip(0), s.tokens)


def test_latent_of_text(lang):
    ids = lambda text: [lang.id[lang.token(w)] for w in text.split()]  # noqa: E731
    assert lang.latent_of_text(ids("fire dragon happy"))[:2] == (TOPIC_NAMES.index("dragon"), MOOD_NAMES.index("happy"))
    assert lang.latent_of_text(ids("fire"))[0] == -1  # dragon's and tent's: a tie
    assert lang.latent_of_text(ids("fire star"))[0] == TOPIC_NAMES.index("tent")
    assert lang.latent_of_text(ids("big ball"))[:2] == (-1, -1)


@pytest.mark.slow
def test_prepare_bad_inputs(tmp_path):
    out = tmp_path / "st"
    r = run("data/prepare.py", "stories", "--train_stories=30", "--val_stories=10", f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    truth = np.load(out / "val_truth.npz")
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert meta["dataset"] == "stories" and len(truth["topic"]) == len(val) == meta["tokens"]["val"]
    before = sorted(os.listdir(out)), (out / "train.bin").read_bytes()
    one_line_error(run("data/prepare.py", "stories", "--train_stories=0", f"--out={out}"), "train_stories")
    one_line_error(run("data/prepare.py", "stories", f"--train={out / 'val.bin'}", f"--out={out}"), "--train_stories")
    one_line_error(run("data/prepare.py", "stories", "--seed=-1", f"--out={out}"), "seed")
    assert (sorted(os.listdir(out)), (out / "train.bin").read_bytes()) == before
    r = run("data/prepare.py", "--help")
    assert r.returncode == 0 and "train_stories" in r.stdout and "val_stories" in r.stdout


@pytest.mark.slow
def test_train_analyze_steer_end_to_end(tmp_path):
    data, out = tmp_path / "st", tmp_path / "run"
    assert run("data/prepare.py", "stories", "--train_stories=400", "--val_stories=40", f"--out={data}").returncode == 0
    r = run("train.py", "config/stories.py", f"--dataset={data}", f"--out_dir={out}", "--n_embd=32", "--max_iters=20",
            "--codebook_start=5", "--batch_size=8", "--eval_interval=20", "--eval_iters=2", "--num_codes=24")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("analyze.py", f"--out_dir={out}", "--html_codes=5")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "analysis" / "stories.json").read_text())
    assert len(summary["topic"]["values"]) == 16 and len(summary["mood"]["values"]) == 4
    assert all(0 <= x["P_next"] <= 1 and "neuron" in x for x in summary["topic"]["values"])
    assert "topic " in (out / "analysis" / "browser.html").read_text()
    r = run("topics.py", f"--out_dir={out}", "--samples_per_prompt=2")
    assert r.returncode == 0, r.stderr[-2000:]
    steering = json.loads((out / "topics" / "steering.json").read_text())
    res = steering["results"]
    neurons = res.pop("neurons")  # the best neuron of each value forced instead of its code
    assert len(res) == len(neurons) == 20 and all(r_["n"] == 8 for r_ in [*res.values(), *neurons.values()])
    base = steering["samples"]["baseline"]  # 2 samples of each prompt: "", "Once", "Once upon a time,", ...
    assert len(base) == 8 and base[2].startswith("Once") and base[4].startswith("Once upon a time,")
    codes = json.loads((out / "topics" / "topic_codes.json").read_text())
    assert set(codes) == {f"topic {t}" for t in TOPIC_NAMES} | {f"mood {m}" for m in MOOD_NAMES}
    # bad topic codes: one error line, the earlier results kept
    before = (out / "topics" / "steering.json").read_bytes()
    (tmp_path / "codes.json").write_text(json.dumps({"topic dragon": ["h.0.attn_heads:0:1"]}))
    one_line_error(run("topics.py", f"--out_dir={out}", f"--topic_codes={tmp_path / 'codes.json'}"), "princess")
    (tmp_path / "codes.json").write_text(json.dumps({**codes, "topic dragon": ["h.0.attn_heads:9:1"]}))
    one_line_error(run("topics.py", f"--out_dir={out}", f"--topic_codes={tmp_path / 'codes.json'}"), "h.0.attn_heads:9")
    assert (out / "topics" / "steering.json").read_bytes() == before
