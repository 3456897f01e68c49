"""The language-model data path: data/prepare.py end to end on generated WikiText-like articles with a BPE
trained on them, train.py on its token files (eval metrics, exact resume, one-line errors, 2-rank gloo,
init_from a tiny random GPT-NeoX directory) and sample.py; and, where ../shared/data is beside the repository,
both real tokenizers offline and data/prepare.py on slices of the real TinyStories text. CPU, no network."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import once

import train
from evaluate import evaluate_lm
from model import GPT, GPTConfig
from conftest import write_bpe, write_tiktoken
from plumbing.configuration import ConfigError
from plumbing.rundir import MARKER, kind_of, staged_dir
from plumbing.tokens import EOT, gpt2_tokenizer, load_codec, load_tokenizer, load_tokens, neox_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")
TS_TRAIN = os.path.join(SHARED, "tinystories", "tinystories_train_head.txt")
TS_VALID = os.path.join(SHARED, "tinystories", "tinystories_valid_head.txt")
WT_VALID = os.path.join(SHARED, "wikitext", "wikitext-103", "wiki.valid.tokens")
GPT2_FILE = os.path.join(SHARED, "tokenizers", "gpt2", "r50k_base.tiktoken")
GPT2_HF = os.path.join(SHARED, "tokenizers", "gpt2", "tokenizer.json")
NEOX_FILE = os.path.join(SHARED, "tokenizers", "gpt-neox", "tokenizer.json")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data (the real GPT-2 and GPT-NeoX "
                                  "BPE files, TinyStories and WikiText text) is not beside the repository")

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=32", "--batch_size=8", "--vocab_size=512",
        "--codebook_sites=attn_heads", "--k=2", "--num_codes=16", "--codebook_start=0", "--kmeans_init=false",
        "--replace_after=0", "--eval_interval=2", "--log_interval=2", "--eval_iters=2", "--device=cpu"]


def env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "0", **extra}


def run(script, args, timeout=300, **extra):
    return subprocess.run([sys.executable, script, *map(str, once(args))], cwd=ROOT, env=env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def is_title(line):  # a top-level WikiText title, ` = Title = `, written without the regex prepare.py uses
    return line.startswith(" = ") and not line.startswith(" = =") and line.endswith(" = ") and not line.endswith("= = ")


@pytest.fixture(scope="module")
def ts(tmp_path_factory):
    """A prepared TinyStories slice: (data dir, train text, val text)."""
    src = tmp_path_factory.mktemp("ts_src")
    train_text = read(TS_TRAIN)[:20_000].rsplit("\n", 1)[0] + "\n"  # whole lines
    val_text = read(TS_VALID)[:10_000].rsplit("\n\n", 1)[0] + "\n\n"
    (src / "train.txt").write_text(train_text, encoding="utf-8")
    (src / "val.txt").write_text(val_text, encoding="utf-8")
    out = tmp_path_factory.mktemp("ts")
    r = run("data/prepare.py", ["tinystories", f"--train={src / 'train.txt'}", f"--val={src / 'val.txt'}",
                                f"--tokenizer={GPT2_FILE}", f"--out={out}"])
    assert r.returncode == 0, r.stderr
    return out, train_text, val_text


WORDS = "the a an dragon king castle baby flower sea ship river old new saw found went with and of in on by".split()


def wikitext_like(n_articles, seed):
    """n_articles of random words laid out as WikiText-103's .tokens files are: a blank ` ` line first, then per
    article a ` = Title = ` line, ` = = Section = = ` subheadings and ` @-@ ` joins, lines ending ` \\n`."""
    rng = np.random.default_rng(seed)
    para = lambda: " ".join(rng.choice(WORDS, 40)) + " @-@ old . \n \n"  # noqa: E731
    return " \n" + "".join(f" = Article {seed} {i} = \n \n {para()} = = Section {i} = = \n \n {para()}"
                            for i in range(n_articles))


@pytest.fixture(scope="module")
def wt(tmp_path_factory):
    """Generated WikiText-like articles (20 valid, 3 test) prepared by data/prepare.py with a BPE trained on
    them (conftest.write_bpe): (data dir, valid text, test text); also the data of train.py's tests."""
    src = tmp_path_factory.mktemp("wt_src")
    valid, test = wikitext_like(20, 0), wikitext_like(3, 1)
    (src / "wiki.valid.tokens").write_text(valid, encoding="utf-8")
    (src / "wiki.test.tokens").write_text(test, encoding="utf-8")
    tok = write_bpe(src / "tokenizer.json", valid + test)
    out = tmp_path_factory.mktemp("wt")
    r = run("data/prepare.py", ["wikitext", f"--valid={src / 'wiki.valid.tokens'}",
                                f"--test={src / 'wiki.test.tokens'}", f"--tokenizer={tok}", f"--out={out}"])
    assert r.returncode == 0, r.stderr
    return out, valid, test


def tokens(path):
    return np.fromfile(path, dtype=np.uint16)


# ---------------------------------------------------------------------------------------------- tokenizers
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@needs_shared
def test_gpt2_tokenizer_offline(no_network):
    enc = gpt2_tokenizer(GPT2_FILE)
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert (enc.eot_token, enc.n_vocab) == (50256, 50257)
    text = read(TS_TRAIN)[:5000]
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    from tokenizers import Tokenizer  # an independent GPT-2 BPE gives the same ids

    assert Tokenizer.from_file(GPT2_HF).encode(text).ids == ids


@needs_shared
def test_neox_tokenizer_offline(no_network):
    tok = neox_tokenizer(NEOX_FILE)
    assert tok.encode("Hello world").ids == [12092, 1533]
    assert (tok.token_to_id(EOT), tok.get_vocab_size()) == (0, 50277)
    text = read(WT_VALID)[:5000]
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_gpt2_tokenizer_rejects_another_file(tmp_path):
    """A valid .tiktoken file that is not r50k_base (tiktoken's sha256 differs) is refused; a dataset naming it
    gets one line that names the file."""
    path = str(write_tiktoken(tmp_path / "bytes.tiktoken"))
    with pytest.raises(ValueError, match="[Hh]ash"):
        gpt2_tokenizer(path)
    with pytest.raises(ConfigError, match="bytes.tiktoken as the gpt2 tokenizer"):
        load_codec("gpt2", path)


def test_staged_dir_keeps_the_earlier_result_on_error(tmp_path):
    """staged_dir, which data/prepare.py writes a dataset through: an error inside leaves `path` as it was and
    no staging directory behind; a completed block replaces `path` as a whole, with the marker of its kind."""
    out = tmp_path / "data"
    out.mkdir()
    (out / "meta.json").write_text('{"vocab_size": 64}')  # a dataset written before markers existed
    with pytest.raises(ConfigError):
        with staged_dir(str(out), "dataset") as tmp:
            open(os.path.join(tmp, "meta.json"), "w").write("half")
            raise ConfigError("a failure half way")
    assert os.listdir(tmp_path) == ["data"] and os.listdir(out) == ["meta.json"]
    assert (out / "meta.json").read_text() == '{"vocab_size": 64}'
    with staged_dir(str(out), "dataset") as tmp:
        open(os.path.join(tmp, "train.bin"), "wb").write(b"new")
    assert os.listdir(tmp_path) == ["data"] and sorted(os.listdir(out)) == [MARKER, "train.bin"]
    assert kind_of(str(out))[0] == "dataset"


# ---------------------------------------------------------------------------------------------- prepare.py
@needs_shared
def test_prepare_tinystories(ts):
    out, train_text, val_text = ts
    codec, meta = load_tokenizer(out)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["eot_token"] == 50256
    assert (out / "tokenizer.tiktoken").exists() and not (out / "test.bin").exists()
    for split, text in (("train", train_text), ("val", val_text)):
        ids = tokens(out / f"{split}.bin")
        assert meta["tokens"][split] == ids.size and ids[-1] == 50256
        stories = codec.decode(ids.tolist()).split(EOT)
        assert stories[-1] == "" and len(stories) - 1 == meta["documents"][split]
        stories = stories[:-1]
        assert all(s and s == s.strip() for s in stories)
        assert " ".join(stories).split() == text.split()  # every word, in order, nothing added
        assert meta["sources"][split].endswith(f"{split}.txt")
    first = codec.decode(tokens(out / "train.bin").tolist()).split(EOT)[:2]
    assert first[0].startswith("One day, a little girl named Lily found a needle")
    assert first[0].endswith("shared and worked together.")  # one "\n" ends a story in the train head
    assert first[1].startswith("Once upon a time, there was a little car named Beep.")
    val = codec.decode(tokens(out / "val.bin").tolist()).split(EOT)
    assert sum(s.startswith("Once upon a time") for s in val) >= 5  # the valid head's "\n\n" + opening rule


def test_prepare_wikitext_splits_at_article_boundaries(wt):
    out, valid, test = wt
    codec, meta = load_tokenizer(out)
    assert meta["tokenizer"] == "neox" and meta["vocab_size"] == codec.vocab_size <= 384 and meta["eot_token"] == 0
    assert (out / "tokenizer.json").exists()
    arts = {}
    for split in ("train", "val", "test"):
        ids = tokens(out / f"{split}.bin")
        assert meta["tokens"][split] == ids.size and ids[-1] == 0
        pieces = codec.decode(ids.tolist()).split(EOT)
        assert pieces[-1] == ""
        arts[split] = pieces[:-1]
        assert len(arts[split]) == meta["documents"][split]
        for a in arts[split]:  # each piece is one article: it opens with its title (after blank lines)
            lines = a.splitlines()
            title = next(l for l in lines if l.strip())
            assert is_title(title), title
            assert sum(is_title(l) for l in lines) == 1
    assert (len(arts["train"]), len(arts["val"]), len(arts["test"])) == (18, 2, 3)
    assert "".join(arts["test"]) == test
    # every 10th article of valid is val, the rest train, in order: together they are valid byte for byte
    merged = arts["train"][:9] + arts["val"][:1] + arts["train"][9:] + arts["val"][1:]
    assert "".join(merged) == valid


@pytest.mark.slow
def test_prepare_errors_are_one_line(tmp_path):
    text, tok = tmp_path / "val.txt", write_tiktoken(tmp_path / "bytes.tiktoken")  # both are read after the error
    text.write_text("Once upon a time, a dog ran.\n")
    r = run("data/prepare.py", ["tinystories", f"--train={tmp_path / 'nope.txt'}", f"--val={text}",
                                f"--tokenizer={tok}", f"--out={tmp_path / 'o'}"])
    assert_one_line_error(r, "nope.txt")
    r = run("data/prepare.py", ["wikitext", f"--valid={text}", f"--out={tmp_path / 'o'}"])
    assert_one_line_error(r, "--test")
    r = run("data/prepare.py", ["tinystories", f"--tokenizer={tok}", f"--out={tmp_path / 'o'}"],
            HF_HUB_OFFLINE="1")  # nothing given: it would download; offline it says so
    assert_one_line_error(r, "offline", "--train=")
    r = run("data/prepare.py", ["pythia", "--model=EleutherAI/pythia-70m-deduped", f"--out={tmp_path / 'p'}"],
            HF_HUB_OFFLINE="1")
    assert_one_line_error(r, "offline", "pythia-70m-deduped", "config.json")
    r = run("data/prepare.py", ["pythia", f"--out={tmp_path / 'p'}"])
    assert_one_line_error(r, "--model=")


def test_pythia_download_keeps_local_files(tmp_path, no_network):
    """A directory that already holds a download is returned as it is: nothing is fetched or overwritten."""
    from data.prepare import pythia_download

    for name, text in (("config.json", "{}"), ("tokenizer.json", "{}"), ("pytorch_model.bin", "w")):
        (tmp_path / name).write_text(text)
    assert pythia_download("EleutherAI/pythia-70m-deduped", str(tmp_path)) == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin", "tokenizer.json"]


# ---------------------------------------------------------------------------------------------- train.py
def evals(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "eval" in l]


@pytest.mark.slow
def test_lm_training_logs_eval_metrics_and_samples(wt, tmp_path):
    data, _, _ = wt
    out = tmp_path / "run"
    r = run("train.py", [*TINY, f"--dataset={data}", "--max_iters=4", f"--out_dir={out}"])
    assert r.returncode == 0, r.stderr
    assert "dloss" in r.stdout and "ppl" in r.stdout
    records = evals(out)
    assert [e["iter"] for e in records] == [2, 4]
    for e in records:
        m = e["eval"]
        assert {"loss", "acc", "ppl", "loss_nocb", "dloss", "dead_pct"} <= set(m)
        assert 0 <= m["acc"] <= 1 and 0 <= m["dead_pct"] <= 100 and m["loss"] > 0
        assert math.isclose(m["ppl"], math.exp(m["loss"]), rel_tol=1e-6)
        assert math.isclose(m["dloss"], m["loss"] - m["loss_nocb"], abs_tol=1e-6)
        assert m["dloss"] != 0  # the codebooks are on, so bypassing them changes the loss
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["train_config"]["dataset"] == str(data) and ckpt["model_config"]["vocab_size"] == 512

    r = run("sample.py", [f"--out_dir={out}", "--start=Once upon a time", "--num_samples=2", "--max_new_tokens=5"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("---------------") == 2 and r.stdout.startswith("Once upon a time")
    r = run("sample.py", [f"--out_dir={out}", "--bypass=true", "--num_samples=1", "--max_new_tokens=3"])
    assert r.returncode == 0, r.stderr


def test_lm_eval_windows_are_fixed(wt):
    """Two evaluations of the same weights see the same windows; bypass flags are restored after dloss."""
    data, _, _ = wt
    train_data, val = load_tokens(str(data), 32, 512)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=32, vocab_size=512,
                          codebook_sites="attn_heads", k=2, num_codes=16))
    ix = torch.randint(len(val) - 32, (8,), generator=torch.Generator().manual_seed(1234))
    off = torch.autocast("cpu", enabled=False)
    a = evaluate_lm(model, val, ix, 4, off)
    b = evaluate_lm(model, val, ix, 4, off)
    assert a == b and a["dloss"] != 0
    assert not any(cb.bypass for _, cb in model.codebooks()) and model.training


@pytest.mark.slow
def test_lm_resume_equals_straight_run(wt, tmp_path):
    data, _, _ = wt
    args = [*TINY, f"--dataset={data}", "--kmeans_init=true", "--replace_after=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run("train.py", [*args, "--max_iters=4", f"--out_dir={straight}"]).returncode == 0
    assert run("train.py", [*args, "--max_iters=2", f"--out_dir={split}"]).returncode == 0
    r = run("train.py", ["--init_from=resume", "--max_iters=4", f"--out_dir={split}"])
    assert r.returncode == 0, r.stderr
    a, b = (torch.load(p / "ckpt.pt", map_location="cpu", weights_only=False)["model"] for p in (straight, split))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def write_tokens(d, ids, vocab_size=512):
    d.mkdir()
    for split in ("train", "val"):
        np.asarray(ids, dtype=np.uint16).tofile(d / f"{split}.bin")
    (d / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "tokenizer_file": "x", "vocab_size": vocab_size}))
    return d


@pytest.mark.slow
def test_lm_data_errors_are_one_line(wt, tmp_path):
    data, _, _ = wt
    go = lambda *a: run("train.py", [*TINY, "--max_iters=1", f"--out_dir={tmp_path / 'run'}", *a])  # noqa: E731
    assert_one_line_error(go(f"--dataset={tmp_path / 'nowhere'}"), "nowhere", "data/prepare.py")
    no_val = write_tokens(tmp_path / "no_val", range(100))
    os.remove(no_val / "val.bin")
    assert_one_line_error(go(f"--dataset={no_val}"), "val.bin", "data/prepare.py")
    short = write_tokens(tmp_path / "short", range(20))
    assert_one_line_error(go(f"--dataset={short}"), "has 20 tokens", "block_size=32", "33")
    n_vocab = str(load_tokenizer(data)[1]["vocab_size"])
    assert_one_line_error(go(f"--dataset={data}", "--vocab_size=100"), n_vocab, "raise vocab_size")
    big = write_tokens(tmp_path / "big", [5] * 99 + [60000], vocab_size=100)
    assert_one_line_error(go(f"--dataset={big}", "--vocab_size=128"), "token id 60000", "the 100 tokens")
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_get_batch_windows_and_ranks(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    data = np.memmap(path, dtype=np.uint16, mode="r")
    x0, y0 = train.get_batch(data, 16, 8, train.data_generator(1337, 0, 3, 0))
    x1, _ = train.get_batch(data, 16, 8, train.data_generator(1337, 1, 3, 0))
    again, _ = train.get_batch(data, 16, 8, train.data_generator(1337, 0, 3, 0))
    assert x0.shape == y0.shape == (8, 16) and x0.dtype == torch.long
    assert torch.equal(y0[:, :-1], x0[:, 1:]) and torch.equal(y0[:, -1], x0[:, -1] + 1)
    assert torch.equal(x0, x0[:, :1] + torch.arange(16))  # contiguous windows of the file
    assert torch.equal(x0, again)  # the same (seed, rank, iteration, micro-step): the same batch (resume)
    assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())  # ranks read different windows


@pytest.mark.slow
def test_lm_ddp_two_ranks(wt, tmp_path):
    data, _, _ = wt
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, f"--dataset={data}", "--max_iters=4", f"--out_dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rank(s) x 4 sequences" in r.stdout
    assert torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)["iter_num"] == 4


# ---------------------------------------------------------------------------------------------- init_from Pythia
def tiny_neox_dir(path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(vocab_size=512, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                                     intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64,
                                     use_parallel_residual=True, tie_word_embeddings=False)
    hf = transformers.GPTNeoXForCausalLM(cfg)
    hf.save_pretrained(path)
    return hf


@pytest.mark.slow
def test_init_from_pythia_dir_trains_with_codebooks(wt, tmp_path):
    data, _, _ = wt
    hf = tiny_neox_dir(tmp_path / "pythia")
    out = tmp_path / "run"
    args = [f"--init_from={tmp_path / 'pythia'}", f"--dataset={data}", "--codebook_sites=attn_heads", "--k=2",
            "--num_codes=16", "--block_size=32", "--batch_size=4", "--max_iters=2", "--eval_interval=2",
            "--eval_iters=1", "--codebook_start=0", "--device=cpu", "--learning_rate=1e-9", "--codebook_lr=1e-9",
            "--min_lr=0", f"--out_dir={out}"]
    r = run("train.py", args, HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr
    assert "codebook_layernorm=true" in r.stdout  # the note: a fresh LayerNorm changes the pretrained function
    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)
    c = ckpt["model_config"]
    assert (c["pos_emb"], c["n_layer"], c["vocab_size"], c["block_size"], c["codebook_sites"]) == \
        ("rotary", 2, 512, 32, "attn_heads")
    sd = ckpt["model"]
    assert sd["transformer.h.1.codebooks.attn_heads.codes"].shape == (2, 16, 16)  # one codebook per head, every layer
    assert sd["transformer.h.0.codebooks.attn_heads.counts"].sum() > 0
    # at lr 1e-9 the weights are still the Pythia directory's
    assert torch.allclose(sd["transformer.wte.weight"], hf.get_input_embeddings().weight, atol=1e-5)
    assert torch.allclose(sd["lm_head.weight"], hf.get_output_embeddings().weight, atol=1e-5)
    assert "dloss" in evals(out)[-1]["eval"]

    r = run("train.py", [*args, "--n_layer=3", "--overwrite=true"])
    assert_one_line_error(r, "n_layer", "config.json")
