"""Bad input at every entry point: one table of cases per script (train, sample, analyze, steer, topics, bench,
data/prepare). Each case runs in a copy of a small world of earlier results (a finished TokFSM run with its
analysis, a language-model run with its topics, prepared token files, presets, torn and foreign files) and must
stop with a non-zero exit and one `error:` line naming the problem and a fix, with no traceback, leaving every
earlier result byte-identical. The cases run in process through entry.cli (an exception other than the one-line
exit fails the test, as a traceback would); a few run as real subprocesses, to check the scripts' own entry."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import ROOT, once, write_bpe, write_lm_dataset, write_tiktoken, write_tokens

import analyze
import bench
import sae
import sample
import steer
import topics
import train
from data import prepare
from model import GPT, GPTConfig
from plumbing.entry import cli

TINY = ["--n_layer=1", "--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=8", "--eval_seqs=16",
        "--eval_samples=8", "--codebook_sites=attn_heads,mlp", "--num_codes=32", "--device=cpu"]
SCRATCH = [*TINY, "--max_iters=2", "--out_dir={run}", "--overwrite=true"]  # would overwrite the finished run
RESUME = ["--init_from=resume", "--max_iters=4", "--out_dir={run}"]
LM = ["--vocab_size=64"]
PYTHIA = ["--codebook_sites=attn_heads", "--num_codes=16", "--block_size=16", "--batch_size=4", "--max_iters=1",
          "--eval_seqs=4", "--eval_samples=2", "--device=cpu", "--out_dir={run}", "--overwrite=true"]
UNWRITABLE = "/proc/codebook-features-test/out"  # cannot be created, even as root
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


# ---------------------------------------------------------------------------------------------- the world
def pythia_dir(d, arch="gpt_neox", missing_shard=False):
    """A GPT-NeoX directory with a tiny config.json; with missing_shard, an index naming two weight shards of
    which only the first exists."""
    os.makedirs(d)
    config = {"model_type": arch, "architectures": ["GPTNeoXForCausalLM" if arch == "gpt_neox" else "LlamaForCausalLM"],
              "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1,
              "intermediate_size": 64, "max_position_embeddings": 64, "rotary_pct": 0.25}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    if missing_shard:
        from safetensors.torch import save_file

        shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
        save_file({"gpt_neox.embed_in.weight": torch.zeros(64, 32)}, os.path.join(d, shards[0]))
        index = {"metadata": {}, "weight_map": {"gpt_neox.embed_in.weight": shards[0], "embed_out.weight": shards[1]}}
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f)
    return d


def damaged_run(src, dst, how):
    """A copy of the run in src whose ckpt.pt is damaged or replaced as `how` says."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "ckpt.pt")
    if how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        return
    if how == "text":
        open(path, "w").write("iter 2: loss 2.39\n")
        return
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if how == "state_dict":  # e.g. a pytorch_model.bin copied over ckpt.pt
        ckpt = ckpt["model"]
    elif how == "mismatch":  # the weights of a wider model under this run's config
        ckpt["model"] = GPT(GPTConfig(**{**ckpt["model_config"], "n_embd": 64})).state_dict()
    elif how == "optimizer":  # AdamW state without the codes' parameter group
        ckpt["optimizer"]["param_groups"].pop()
    elif how == "old_version":
        ckpt["model_config"]["attention_sink"] = 4
    torch.save(ckpt, path)


def files(w):
    """The user files of the world: presets, torn, foreign and non-UTF-8 files."""
    j = lambda *p: os.path.join(w, *p)  # noqa: E731
    text = {
        "preset_str.py": 'config = {"max_iters": "10"}  # a string where an int belongs\n',
        "preset_syntax.py": "config = dict(max_iters=)\n",
        "preset_exit.py": "import sys\nsys.exit(0)\nconfig = dict(max_iters=2)\n",
        "preset_none.py": "max_iters = 2\n",
        "preset_expr.py": "config = dict(max_iters=2 ** 10)\n",
        "preset.txt": "config = dict(max_iters=2)\n",
        "preset_unknown.py": "config = dict(no_such_key=1)\n",
        "preset_model.py": "config = dict(n_embd=64)  # another model than the run's\n",
        "preset_other_out.py": f"config = dict(out_dir={j('elsewhere')!r})\n",
        "torn.json": '{"dragon": ["h.0.',
        "list.json": "[1, 2]\n",
        "bad_codes.json": '{"dragon": [3, 4]}\n',
        "other_model.json": '{"dragon": ["h.5.mlp:1"]}\n',
        "notes.txt": "iter 2: loss 2.39\n",
        "fsm_other.json": '{"mlp": {"per_state": [{"state": 0, "book": "h.7.mlp", "code": 1}]}}\n',
        "afile": "a file where a directory belongs\n",
        "empty.txt": "",
        "fsm_no_states.json": '{"mlp": {"per_state": []}}\n',
    }
    for name, t in text.items():
        with open(j(name), "w") as f:
            f.write(t)
    with open(j("latin1.txt"), "wb") as f:
        f.write("Once upon a time, a caf\u00e9.\n".encode("latin-1"))
    torch.save([1, 2, 3], j("foreign.pt"))
    os.makedirs(j("empty_dir"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The earlier results every case must leave byte-identical (see the module docstring). Returns its path."""
    w = str(tmp_path_factory.mktemp("world"))
    j = lambda *p: os.path.join(w, *p)  # noqa: E731
    files(w)
    train.main([*TINY, "--max_iters=2", "--eval_interval=2", "--log_interval=1", "--codebook_start=1",
                f"--out_dir={j('run')}"])
    analyze.main([f"--out_dir={j('run')}", "--num_seqs=16", "--device=cpu", "--html_codes=2"])  # run/analysis
    train.main(once([*TINY, "--max_iters=1", "--codebook_sites=", f"--out_dir={j('nocb')}"]))
    for how in ("truncated", "text", "state_dict", "mismatch", "optimizer", "old_version"):
        damaged_run(j("run"), j(how), how)
    rng = np.random.default_rng(0)
    write_tokens(j("tokens"), rng.integers(0, 64, 4000))
    write_tokens(j("short"), range(10))
    write_tokens(j("empty"), [])
    write_tokens(j("no_val"), np.arange(200) % 64, splits=("train",))
    write_tokens(j("big_id"), [5] * 199 + [100])
    write_tokens(j("big_vocab"), np.arange(200) % 64, vocab_size=50257)
    write_tokens(j("bad_meta"), np.arange(200) % 64)
    write_tokens(j("odd"), np.arange(200) % 64)
    with open(j("odd", "train.bin"), "ab") as f:
        f.write(b"\0")  # half a token: torn
    write_tokens(j("meta_zero"), np.arange(200) % 64, vocab_size=0)
    write_tokens(j("meta_str"), np.arange(200) % 64, vocab_size="64")
    open(j("bad_meta", "meta.json"), "w").write('{"tokenizer": "gpt2", "vocab')  # torn
    pythia_dir(j("pythia_missing_shard"), missing_shard=True)
    pythia_dir(j("llama"), arch="llama")
    pythia_dir(j("pythia_junk"))
    open(j("pythia_junk", "model.safetensors"), "w").write("not weights\n")
    # a language model: prepared text (a BPE trained on it), a tiny random checkpoint and its topic codes
    data = write_lm_dataset(j("lm_data"), "Once upon a time there was a dragon and a king. " * 40)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=384,
                          codebook_sites="attn_heads", num_codes=16, k=1))
    os.makedirs(j("lm_run"))
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config), "optimizer": {}, "rng": {},
                "train_config": asdict(train.TrainConfig(dataset=str(data))), "iter_num": 0}, j("lm_run", "ckpt.pt"))
    topics.main([f"--out_dir={j('lm_run')}", "--topics=dragon", "--samples_per_prompt=1", "--max_new_tokens=2",
                 "--device=cpu"])
    shutil.copytree(j("lm_run"), j("lm_run_no_data"))
    ckpt = torch.load(j("lm_run", "ckpt.pt"), weights_only=True)
    ckpt["train_config"]["dataset"] = j("nowhere")
    torch.save(ckpt, j("lm_run_no_data", "ckpt.pt"))
    shutil.copytree(data, j("lm_bad_tok"))
    open(j("lm_bad_tok", "tokenizer.json"), "w").write("not a tokenizer\n")
    # prepared data of data/prepare.py, which a failed prepare must leave whole
    src = j("ts_src")
    os.makedirs(src)
    open(os.path.join(src, "train.txt"), "w").write("One day, a cat sat.\nOnce upon a time, a dog ran.\n")
    open(os.path.join(src, "val.txt"), "w").write("Once upon a time, a bird sang.\n\n")
    open(os.path.join(src, "wiki.tokens"), "w").write(" = A = \n text \n = B = \n more \n")
    articles = "".join(f" = Article {i} = \n \n The dragon {i} met a king . \n \n" for i in range(10))
    open(os.path.join(src, "wiki10.tokens"), "w").write(articles)
    write_bpe(j("neox.json"), articles)  # a tokenizer.json as Pythia's
    write_tiktoken(j("bytes.tiktoken"))  # a valid .tiktoken file that is not r50k_base
    prepare.main(["wikitext", f"--valid={src}/wiki10.tokens", f"--test={src}/wiki.tokens",
                  f"--tokenizer={j('neox.json')}", f"--out={j('prepared')}"])
    return w


def snapshot(d):
    out = {}
    for dirpath, _, names in os.walk(d):
        for n in names:
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, n), d)] = f.read()
    return out


def check(entry, args, needles, world, tmp_path, capsys):
    """Run one case in a copy of the world; assert one clear error line and an untouched world."""
    w = str(tmp_path / "w")
    shutil.copytree(world, w)
    before = snapshot(w)
    names = {n.replace(".", "_"): os.path.join(w, n) for n in os.listdir(w)}  # {preset_str_py}: w/preset_str.py
    argv = once([a.format(w=w, **names) for a in args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(entry, argv)
    msg, err = e.value.code, capsys.readouterr().err
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    assert err == "", err  # nothing else on stderr: no warning, no traceback
    for word in needles:
        assert word.format(w=w, **names) in msg, f"{word!r} not in {msg!r}"
    assert snapshot(w) == before, "earlier results changed"
    return msg


def cases(table):
    return pytest.mark.parametrize("args,needles", [c[1:] for c in table], ids=[c[0] for c in table])


# ---------------------------------------------------------------------------------------------- train.py
TRAIN = [
    # configs, presets and flags
    ("unknown config key", [*SCRATCH, "--no_such_key=1"], ["'no_such_key'", "TrainConfig"]),
    ("wrong value type (flag)", [*SCRATCH, "--max_iters=abc"], ["--max_iters=abc", "expected int"]),
    ("bad boolean", [*SCRATCH, "--kmeans_init=maybe"], ["--kmeans_init=maybe", "true or false"]),
    ("flag without a value", [*SCRATCH, "--max_iters"], ["--max_iters", "--key=value"]),
    ("wrong value type (preset)", ["{preset_str_py}", *SCRATCH], ["max_iters='10'", "expected int"]),
    ("number in another script's digits", [*SCRATCH, "--max_iters=١٠"], ["--max_iters=١٠", "ASCII digits"]),
    ("superscript digit in a number", [*SCRATCH, "--max_iters=2²"], ["--max_iters=2²", "ASCII digits"]),
    ("superscript digit in codebook_layers", [*SCRATCH, "--codebook_layers=0,¹"], ["codebook_layers='0,¹'", "layer"]),
    ("preset that does not parse", ["{preset_syntax_py}", *SCRATCH], ["preset_syntax.py:1", "syntax"]),
    ("preset that runs code", ["{preset_exit_py}", *SCRATCH], ["preset_exit.py:1", "only `config = dict("]),
    ("preset without config", ["{preset_none_py}", *SCRATCH], ["preset_none.py", "only `config"]),
    ("preset value not a literal", ["{preset_expr_py}", *SCRATCH], ["'max_iters'", "not a literal"]),
    ("preset not a .py file", ["{preset_txt}", *SCRATCH], ["preset.txt", ".py files"]),
    ("preset not found", ["{w}/config/nope.py", *SCRATCH], ["nope.py", "not found"]),
    ("preset with an unknown key", ["{preset_unknown_py}", *SCRATCH], ["'no_such_key'", "preset_unknown.py"]),
    ("value outside the choices", [*SCRATCH, "--nan_policy=ignore"], ["nan_policy", "'skip'"]),
    ("lr_schedule outside the choices", [*SCRATCH, "--lr_schedule=linear"], ["lr_schedule='linear'", "'cosine'"]),
    ("dtype outside the choices", [*SCRATCH, "--dtype=float16"], ["dtype='float16'", "'bfloat16'"]),
    ("pos_emb outside the choices", [*SCRATCH, "--pos_emb=alibi"], ["pos_emb='alibi'", "'rotary'"]),
    ("unknown codebook site", [*SCRATCH, "--codebook_sites=mlp,resid"], ["'resid'", "attn_heads"]),
    ("codebook_layers not integers", [*SCRATCH, "--codebook_layers=0,x"], ["codebook_layers='0,x'", "e.g."]),
    ("codebook_layers out of range", [*SCRATCH, "--codebook_layers=3"], ["[3]", "n_layer=1"]),
    # ranges: values torch or the loop would reject, or take silently
    *[(f"{key} out of range ({value})", [*SCRATCH, f"--{key}={value}"], [f"{key}=", rule]) for key, value, rule in [
        ("learning_rate", "-1", "> 0"), ("learning_rate", "0", "> 0"), ("codebook_lr", "0", "> 0"),
        ("min_lr", "-1", ">= 0"), ("weight_decay", "-0.1", ">= 0"), ("beta1", "1.5", "[0, 1)"),
        ("beta2", "-0.1", "[0, 1)"), ("dropout", "1", "[0, 1)"), ("grad_clip", "-1", ">= 0"),
        ("n_layer", "0", ">= 1"), ("n_embd", "-8", ">= 1"), ("n_head", "0", ">= 1"), ("block_size", "0", ">= 1"),
        ("vocab_size", "0", ">= 1"), ("max_iters", "-5", ">= 1"), ("max_iters", "0", ">= 1"),
        ("replace_after", "-1", ">= 0"), ("codebook_start", "-1", ">= 0"), ("warmup_iters", "-1", ">= 0"),
        ("batch_size", "0", ">= 1"), ("gradient_accumulation_steps", "0", ">= 1"), ("eval_interval", "0", ">= 1"),
        ("eval_samples", "0", ">= 1"), ("num_states", "1", ">= 2"), ("num_edges", "0", ">= 1"),
        ("seed", "-1", "[0, 2147483647]"), ("fsm_seed", "9999999999", "[0, 2147483647]"),
        ("rotary_pct", "2", "[0, 1]"), ("layer_norm_eps", "0", "> 0"), ("recon_coef", "-1", ">= 0"),
        ("kmeans_iters", "-1", ">= 0"), ("codebook_chunk", "-1", ">= 0"), ("num_codes", "0", ">= 1"),
        ("k", "0", ">= 1"), ("codebook_groups", "0", ">= 1")]],
    ("learning rate not a number", [*SCRATCH, "--learning_rate=nan"], ["learning_rate=nan", "finite"]),
    ("learning rate infinite", [*SCRATCH, "--learning_rate=inf"], ["learning_rate=inf", "finite"]),
    ("num_edges > num_states", [*SCRATCH, "--num_edges=200"], ["num_edges=200", "num_states=100"]),
    ("k > num_codes", [*SCRATCH, "--k=64"], ["k=64", "num_codes=32", "lower k"]),
    ("n_embd not divisible by codebook_groups", [*SCRATCH, "--codebook_sites=mlp", "--codebook_groups=3"],
     ["n_embd=32", "codebook_groups=3", "divisor"]),
    ("n_embd not divisible by n_head", [*SCRATCH, "--n_head=3"], ["n_head=3", "n_embd=32"]),
    ("odd rotary dims", [*SCRATCH, "--pos_emb=rotary", "--rotary_pct=0.2"], ["rotary_pct=0.2", "even"]),
    ("batch not divisible by micro-steps", [*SCRATCH, "--batch_size=7", "--gradient_accumulation_steps=2"],
     ["batch_size=7", "multiple of 2"]),
    # the device and the output place
    ("CUDA device on a machine without one", [*SCRATCH, "--device=cuda"], ["device='cuda'", "available here", "cpu"]),
    ("device that does not exist", [*SCRATCH, "--device=tpu"], ["device='tpu'", "cpu"]),
    ("empty out_dir", [*TINY, "--max_iters=2", "--out_dir="], ["out_dir=''", "empty"]),
    ("out_dir that is a file", [*TINY, "--max_iters=2", "--out_dir={afile}"], ["afile", "is a file"]),
    ("out_dir that cannot be created", [*TINY, "--max_iters=2", f"--out_dir={UNWRITABLE}"],
     [UNWRITABLE, "cannot be created", "writable"]),
    ("out_dir holds another run", SCRATCH[:-1], ["already holds a run", "--overwrite=true"]),
    # data
    ("block_size too short for the FSM", [*SCRATCH, "--block_size=4"], ["block_size=4", ">= 5"]),
    ("vocab_size below the FSM's", [*SCRATCH, "--vocab_size=5"], ["vocab_size=5", "raise vocab_size"]),
    ("block_size longer than the data", [*SCRATCH, *LM, "--dataset={short}"],
     ["has 10 tokens", "block_size=16", "lower block_size"]),
    ("missing dataset directory", [*SCRATCH, *LM, "--dataset={w}/nowhere"], ["nowhere", "data/prepare.py"]),
    ("missing data file", [*SCRATCH, *LM, "--dataset={no_val}"], ["val.bin", "data/prepare.py"]),
    ("empty dataset", [*SCRATCH, *LM, "--dataset={empty}"], ["has 0 tokens", "block_size"]),
    ("torn meta.json", [*SCRATCH, *LM, "--dataset={bad_meta}"], ["meta.json", "data/prepare.py"]),
    ("token file of an odd byte count", [*SCRATCH, *LM, "--dataset={odd}"], ["train.bin", "odd number", "prepare.py"]),
    ("meta.json vocab_size zero", [*SCRATCH, *LM, "--dataset={meta_zero}"], ["vocab_size is 0", "positive integer"]),
    ("meta.json vocab_size a string", [*SCRATCH, *LM, "--dataset={meta_str}"], ["vocab_size is '64'", "positive"]),
    ("token id beyond the tokenizer's", [*SCRATCH, *LM, "--dataset={big_id}"], ["token id 100", "the 64 tokens"]),
    ("tokenizer larger than vocab_size", [*SCRATCH, *LM, "--dataset={big_vocab}"], ["50257", "raise vocab_size"]),
    # checkpoints
    ("resume without a checkpoint", ["--init_from=resume", "--out_dir={empty_dir}"], ["no checkpoint", "empty_dir"]),
    ("truncated checkpoint (resume)", ["--init_from=resume", "--max_iters=4", "--out_dir={truncated}"],
     ["ckpt.pt", "cannot be read", "truncated", "--overwrite=true"]),
    ("non-checkpoint file (resume)", ["--init_from=resume", "--out_dir={text}"],
     ["cannot be read as a checkpoint", "another kind"]),
    ("bare state dict as ckpt.pt (resume)", ["--init_from=resume", "--out_dir={state_dict}"],
     ["not a checkpoint written by train.py"]),
    ("weights of another config (resume)", ["--init_from=resume", "--max_iters=4", "--out_dir={mismatch}"],
     ["do not match", "another config"]),
    ("optimizer state of another config (resume)", ["--init_from=resume", "--max_iters=4", "--out_dir={optimizer}"],
     ["optimizer state", "match"]),
    ("config keys of another version (resume)", ["--init_from=resume", "--out_dir={old_version}"],
     ["unknown keys", "attention_sink", "another version"]),
    # resume: only what is safe may change
    ("model setting changed on resume", [*RESUME, "--n_embd=64"], ["n_embd", "new out_dir"]),
    ("FSM changed on resume", [*RESUME, "--num_states=50"], ["num_states", "max_iters"]),
    ("FSM seed changed on resume", [*RESUME, "--fsm_seed=7"], ["fsm_seed", "new out_dir"]),
    ("dataset changed on resume", [*RESUME, "--dataset={tokens}"], ["dataset", "new out_dir"]),
    ("batch changed on resume", [*RESUME, "--batch_size=16"], ["batch_size", "new out_dir"]),
    ("optimizer setting changed on resume", [*RESUME, "--beta2=0.9"], ["beta2", "new out_dir"]),
    ("preset changing the model on resume", ["{preset_model_py}", *RESUME], ["n_embd", "new out_dir"]),
    ("overwrite on resume", [*RESUME, "--overwrite=true"], ["overwrite", "when resuming"]),
    ("resume through a preset naming an empty out_dir", ["{preset_other_out_py}", "--init_from=resume"],
     ["no checkpoint", "elsewhere"]),
    ("codebook_start moved behind the checkpoint", [*RESUME, "--codebook_start=5"], ["codebook_start=5", "already"]),
    # pretrained directories
    ("Pythia directory with a missing shard", ["--init_from={pythia_missing_shard}", *PYTHIA],
     ["model-00002-of-00002.safetensors", "missing", "complete"]),
    ("Pythia directory of another architecture", ["--init_from={llama}", *PYTHIA], ["llama", "gpt_neox"]),
    ("init_from neither a mode nor a Pythia directory", ["--init_from={w}/nowhere", *PYTHIA],
     ["init_from=", "config.json"]),
    ("architecture set with a Pythia directory", ["--init_from={llama}", *PYTHIA, "--n_layer=3"],
     ["n_layer", "config.json"]),
    # a replacing run that fails before its first checkpoint keeps the old run whole
    ("overwrite, then divergence before the first checkpoint",
     [*SCRATCH, "--learning_rate=1e6", "--warmup_iters=0", "--max_iters=40", "--eval_interval=40", "--log_interval=1",
      "--codebook_start=0"], ["this run wrote no checkpoint", "earlier run in out_dir is kept"]),
]


@cases(TRAIN)
def test_train(args, needles, world, tmp_path, capsys):
    check(train.main, args, needles, world, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- sample.py
SAMPLE_ARGS = ["--out_dir={lm_run}", "--max_new_tokens=2", "--num_samples=1", "--device=cpu"]
SAMPLE = [
    ("unknown config key", [*SAMPLE_ARGS, "--nope=1"], ["'nope'", "SampleConfig"]),
    ("zero samples", [*SAMPLE_ARGS, "--num_samples=0"], ["num_samples=0", ">= 1"]),
    ("negative max_new_tokens", [*SAMPLE_ARGS, "--max_new_tokens=-1"], ["max_new_tokens=-1", ">= 1"]),
    ("negative temperature", [*SAMPLE_ARGS, "--temperature=-1"], ["temperature=-1.0", ">= 0"]),
    ("top_k zero", [*SAMPLE_ARGS, "--top_k=0"], ["top_k=0", ">= 1"]),
    ("CUDA device on a machine without one", [*SAMPLE_ARGS, "--device=cuda"], ["device='cuda'", "cpu"]),
    ("out_dir without a checkpoint", ["--out_dir={empty_dir}"], ["no checkpoint", "empty_dir"]),
    ("truncated checkpoint", ["--out_dir={truncated}"], ["ckpt.pt", "truncated"]),
    ("non-checkpoint file", ["--out_dir={text}"], ["cannot be read", "another kind"]),
    ("weights of another config", ["--out_dir={mismatch}", "--dataset={lm_data}"], ["do not match", "another config"]),
    ("a TokFSM run", ["--out_dir={run}"], ["TokFSM", "--dataset=DIR"]),
    ("prompt file missing", [*SAMPLE_ARGS, "--start=FILE:{w}/nope.txt"], ["prompt file", "nope.txt", "not found"]),
    ("prompt file not UTF-8", [*SAMPLE_ARGS, "--start=FILE:{latin1_txt}"], ["latin1.txt", "not UTF-8"]),
    ("empty prompt file", [*SAMPLE_ARGS, "--start=FILE:{empty_txt}"], ["empty.txt", "is empty"]),
    ("dataset without meta.json", [*SAMPLE_ARGS, "--dataset={empty_dir}"], ["meta.json", "data/prepare.py"]),
    ("torn tokenizer file", [*SAMPLE_ARGS, "--dataset={lm_bad_tok}"], ["tokenizer.json", "neox tokenizer"]),
    ("a preset that runs code", ["{preset_exit_py}", *SAMPLE_ARGS], ["preset_exit.py:1", "only `config"]),
]


@cases(SAMPLE)
def test_sample(args, needles, world, tmp_path, capsys):
    check(sample.main, args, needles, world, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- analyze.py
AN = ["--out_dir={run}", "--num_seqs=16", "--device=cpu"]
ANALYZE = [
    ("unknown config key", [*AN, "--nope=1"], ["'nope'", "AnalyzeConfig"]),
    ("zero sequences", [*AN, "--num_seqs=0"], ["num_seqs=0", ">= 1"]),
    ("zero batch", [*AN, "--batch_size=0"], ["batch_size=0", ">= 1"]),
    ("zero max_tokens", [*AN, "--max_tokens=0"], ["max_tokens=0", ">= 1"]),
    ("zero top", [*AN, "--top=0"], ["top=0", ">= 1"]),
    ("negative contexts", [*AN, "--contexts=-1"], ["contexts=-1", ">= 0"]),
    ("invalid regex", [*AN, "--regex=(dragon"], ["regex='(dragon'", "regular expression"]),
    ("empty save_dir", [*AN, "--save_dir="], ["save_dir=''", "empty"]),
    ("save_dir that is a file", [*AN, "--save_dir={afile}"], ["afile", "is a file"]),
    ("save_dir that cannot be created", [*AN, f"--save_dir={UNWRITABLE}"], [UNWRITABLE, "cannot be written"]),
    ("codes file missing", [*AN, "--codes={w}/nope.pt"], ["nope.pt", "not found"]),
    ("codes file not a torch file", [*AN, "--codes={notes_txt}"], ["notes.txt", "cannot be read"]),
    ("codes file of another kind", [*AN, "--codes={foreign_pt}"], ["foreign.pt", "lacks"]),
    ("codes of other codebooks", ["--out_dir={lm_run}", "--codes={run}/analysis/codes.pt", "--device=cpu"],
     ["codes of", "collect them again"]),
    ("CUDA device on a machine without one", [*AN, "--device=cuda"], ["device='cuda'", "cpu"]),
    ("a run without codebooks", ["--out_dir={nocb}"], ["no codebooks", "nothing to analyse"]),
    ("truncated checkpoint", ["--out_dir={truncated}"], ["ckpt.pt", "truncated"]),
    ("out_dir without a checkpoint", ["--out_dir={empty_dir}"], ["no checkpoint"]),
    ("language model whose data is gone", ["--out_dir={lm_run_no_data}", "--device=cpu"], ["nowhere", "meta.json"]),
    ("regex that matches nothing", ["--out_dir={lm_run}", "--device=cpu", "--max_tokens=200", "--regex=unicorn"],
     ["--regex='unicorn'", "matches nothing", "--max_tokens"]),
]


@cases(ANALYZE)
def test_analyze(args, needles, world, tmp_path, capsys):
    check(analyze.main, args, needles, world, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- steer.py
ST = ["--out_dir={run}", "--device=cpu"]
STEER = [
    ("unknown config key", [*ST, "--nope=1"], ["'nope'", "SteerConfig"]),
    ("unknown task", [*ST, "--task=swap"], ["task='swap'", "'generate'"]),
    ("unknown mode", [*ST, "--mode=some"], ["mode='some'", "'all'"]),
    ("unknown ablate_to", [*ST, "--ablate_to=mean"], ["ablate_to='mean'", "'zero'"]),
    ("unknown patch", [*ST, "--patch=everything"], ["patch='everything'", "'state+next'"]),
    ("zero pairs", [*ST, "--pairs=0"], ["pairs=0", ">= 1"]),
    ("zero samples", [*ST, "--task=generate", "--num_samples=0"], ["num_samples=0", ">= 1"]),
    ("zero new tokens", [*ST, "--task=generate", "--max_new_tokens=0"], ["max_new_tokens=0", ">= 1"]),
    ("negative temperature", [*ST, "--task=generate", "--temperature=-0.5"], ["temperature=-0.5", ">= 0"]),
    ("unknown codebook", [*ST, "--task=generate", "--force=h.9.mlp:1"], ["no codebook 'h.9.mlp'", "h.0.mlp"]),
    ("code out of range", [*ST, "--task=generate", "--force=h.0.mlp:32"], ["no code '32' at h.0.mlp", "0-31"]),
    ("head not named", [*ST, "--task=generate", "--ablate=h.0.attn_heads:5"], ["has 2 heads"]),
    ("more forced codes than k", [*ST, "--task=generate", "--force=h.0.mlp:1,h.0.mlp:2"], ["h.0.mlp", "k=1"]),
    ("prompt not digits on TokFSM", [*ST, "--task=generate", "--start=abc"], ["--start='abc'", "digits"]),
    ("superscript digit in a TokFSM prompt", [*ST, "--task=generate", "--start=4²"], ["--start='4²'", "digits"]),
    ("code in another script's digits", [*ST, "--task=generate", "--force=h.0.mlp:١"], ["no code '١'", "0-31"]),
    ("prompt longer than the block", [*ST, "--task=generate", "--start=" + "4" * 20], ["no room", "block_size=16"]),
    ("ablate without codes", [*ST, "--task=ablate"], ["--ablate=BOOK:CODE"]),
    ("the swap on a language model", ["--out_dir={lm_run}", "--device=cpu"], ["language model", "--task=fsm"]),
    ("save into a file-shaped directory", [*ST, "--pairs=2", "--save={afile}/out.json"], ["afile", "is a file"]),
    ("state codes file missing", [*ST, "--pairs=2", "--state_codes={w}/nope.json"], ["nope.json", "not found"]),
    ("state codes file torn", [*ST, "--pairs=2", "--state_codes={torn_json}"], ["torn.json", "not valid JSON"]),
    ("state codes without MLP codes", [*ST, "--pairs=2", "--state_codes={list_json}"], ["list.json", "not a dict"]),
    ("state codes file without states", [*ST, "--pairs=2", "--state_codes={fsm_no_states_json}"],
     ["fsm_no_states.json", "no state codes"]),
    ("state codes of another model", [*ST, "--pairs=2", "--state_codes={fsm_other_json}"],
     ["fsm_other.json", "this model's codebooks"]),
    ("CUDA device on a machine without one", [*ST, "--device=cuda"], ["device='cuda'", "cpu"]),
    ("truncated checkpoint", ["--out_dir={truncated}"], ["ckpt.pt", "truncated"]),
    ("a run without codebooks", ["--out_dir={nocb}"], ["no codebooks"]),
]


@cases(STEER)
def test_steer(args, needles, world, tmp_path, capsys):
    check(steer.main, args, needles, world, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- topics.py
TP = ["--out_dir={lm_run}", "--device=cpu", "--samples_per_prompt=1", "--max_new_tokens=2"]
TOPICS = [
    ("unknown config key", [*TP, "--nope=1"], ["'nope'", "TopicsConfig"]),
    ("unknown topic", [*TP, "--topics=dragons"], ["unknown topic 'dragons'", "NAME=REGEX"]),
    ("invalid topic regex", [*TP, "--topics=sea=(ocean"], ["sea=", "regular expression"]),
    ("topic that matches nothing", [*TP, "--topics=baby"], ["topic baby ('baby')", "matches nothing"]),
    ("a TokFSM run", ["--out_dir={run}"], ["not a language model"]),
    ("topic codes file missing", [*TP, "--topic_codes={w}/nope.json"], ["nope.json", "not found"]),
    ("topic codes file torn", [*TP, "--topic_codes={torn_json}"], ["torn.json", "not valid JSON", "topics.py"]),
    ("topic codes file not UTF-8", [*TP, "--topic_codes={latin1_txt}"], ["latin1.txt", "not UTF-8"]),
    ("topic codes file holds a list", [*TP, "--topic_codes={list_json}"], ["list.json", "not a dict"]),
    ("topic codes that are not names", [*TP, "--topic_codes={bad_codes_json}"], ["bad_codes.json", "BOOK:CODE"]),
    ("topic codes of another model", [*TP, "--topic_codes={other_model_json}"], ["no codebook 'h.5.mlp'"]),
    ("zero samples", [*TP, "--samples_per_prompt=0"], ["samples_per_prompt=0", ">= 1"]),
    ("zero codes per topic", [*TP, "--codes_per_topic=0"], ["codes_per_topic=0", ">= 1"]),
    ("negative frequent", [*TP, "--frequent=-1"], ["frequent=-1", ">= 0"]),
    ("no topics at all", [*TP, "--topics="], ["no topics", "--frequent=N"]),
    ("save_dir that is a file", [*TP, "--save_dir={afile}"], ["afile", "is a file"]),
]


@cases(TOPICS)
def test_topics(args, needles, world, tmp_path, capsys):
    check(topics.main, args, needles, world, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- sae.py
SA = ["--out_dir={nocb}", "--steps=1", "--num_latents=8", "--num_seqs=8", "--pairs=2", "--device=cpu"]
SAE = [
    ("unknown config key", [*SA, "--nope=1"], ["'nope'", "SAEConfig"]),
    ("k zero", [*SA, "--k=0"], ["k=0", ">= 1"]),
    ("k above the latents", [*SA, "--k=9"], ["k=9", "<= 8"]),
    ("zero latents", [*SA, "--num_latents=0"], ["num_latents=0", ">= 1"]),
    ("zero learning rate", [*SA, "--lr=0"], ["lr=0.0", "> 0"]),
    ("negative AuxK coefficient", [*SA, "--aux_coef=-1"], ["aux_coef=-1.0", ">= 0"]),
    ("unknown site", [*SA, "--sites=resid"], ["'resid'", "mlp"]),
    ("no site", [*SA, "--sites="], ["sites=''", "names nothing", "mlp"]),
    ("a run with codebooks", [*SA[1:], "--out_dir={run}"], ["without codebooks", "--codebook_sites="]),
    ("a language model", [*SA[1:], "--out_dir={lm_run}"], ["TokFSM run"]),
    ("out_dir without a checkpoint", ["--out_dir={empty_dir}"], ["no checkpoint"]),
    ("save_dir that is a file", [*SA, "--save_dir={afile}"], ["afile", "is a file"]),
]


@cases(SAE)
def test_sae(args, needles, world, tmp_path, capsys):
    check(sae.main, args, needles, world, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- bench.py
BENCH = [
    ("misspelled part", ["--only=layers"], ["'layers'", "layer, step, generate, profile"]),
    ("no part", ["--only=,"], ["only=','", "names nothing"]),
    ("zero repeats", ["--repeats=0"], ["repeats=0", "[1, 1000]"]),
    ("CUDA device on a machine without one", ["--device=cuda"], ["device='cuda'", "cpu"]),
    ("dtype outside the choices", ["--dtype=float16"], ["dtype='float16'", "'bfloat16'"]),
    ("unknown shape", ["--mem_shape=z"], ["mem_shape='z'"]),
    ("unknown config key", ["--nope=1"], ["'nope'", "BenchConfig"]),
]


@cases(BENCH)
def test_bench(args, needles, world, tmp_path, capsys):
    check(bench.main, args, needles, world, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------- data/prepare.py
# each tinystories case stops before its tokenizer is read, so any file serves; one that reads it must fail
TS = ["tinystories", "--train={ts_src}/train.txt", "--val={ts_src}/val.txt", "--tokenizer={bytes_tiktoken}",
      "--out={prepared}"]
WT = ["wikitext", "--valid={ts_src}/wiki10.tokens", "--test={ts_src}/wiki.tokens", "--tokenizer={neox_json}",
      "--out={prepared}"]
PREPARE = [
    ("no dataset named", [], ["name the dataset first"]),
    ("unknown dataset", ["wikitext2"], ["'wikitext2'", "tinystories"]),
    ("unknown flag", [*TS, "--nope=1"], ["'nope'", "PrepareConfig"]),
    ("missing text file", ["tinystories", "--train={w}/nope.txt", "--val={ts_src}/val.txt"], ["nope.txt", "not a file"]),
    ("text not UTF-8 (an existing dataset stays whole)", [*WT[:1], "--valid={latin1_txt}", *WT[2:]],
     ["latin1.txt", "not UTF-8"]),
    ("tokenizer that is not r50k_base", TS, ["bytes.tiktoken", "r50k_base"]),
    ("tokenizer.json that is not one", ["wikitext", "--valid={ts_src}/wiki.tokens", "--test={ts_src}/wiki.tokens",
                                        "--tokenizer={notes_txt}", "--out={w}/wt"], ["notes.txt", "neox tokenizer"]),
    ("too few articles to split", ["wikitext", "--valid={ts_src}/wiki.tokens", "--test={ts_src}/wiki.tokens",
                                   "--tokenizer={neox_json}", "--out={w}/wt"], ["2 article(s)", ">= 10"]),
    ("out that is a file", [*TS[:4], "--out={afile}"], ["afile", "is a file"]),
    ("only --train", ["tinystories", "--train={ts_src}/train.txt"], ["both --train and --val"]),
    ("empty text file", [*WT[:2], "--test={empty_txt}", *WT[3:]], ["empty.txt", "holds no text"]),
    ("wikitext flags for tinystories", [*TS, "--valid={ts_src}/val.txt"], ["--valid/--test are for wikitext"]),
    ("tinystories flags for wikitext", ["wikitext", "--val={ts_src}/val.txt"], ["--val is for tinystories"]),
    ("--model outside pythia", [*TS, "--model=EleutherAI/pythia-70m"], ["--model is for `pythia`"]),
    ("pythia without --model", ["pythia"], ["--model=REPO"]),
]


@cases(PREPARE)
def test_prepare(args, needles, world, tmp_path, capsys):
    check(prepare.main, args, needles, world, tmp_path, capsys)


# a missing package is named as such, never reported as a bad file: each case hides one that the step needs
MISSING = [
    ("tokenizers", sample.main, SAMPLE_ARGS, {}),
    ("tqdm", sample.main, [*SAMPLE_ARGS, "--bypass=true"], {"CODEBOOK_PROGRESS": "1"}),  # bars on
    ("matplotlib", analyze.main, AN, {}),
    ("safetensors", train.main, ["--init_from={pythia_junk}", *PYTHIA], {}),  # not "cannot be read as weights"
]


@pytest.mark.parametrize("package,entry,args,env", MISSING, ids=[m[0] for m in MISSING])
def test_missing_package(package, entry, args, env, world, tmp_path, capsys, monkeypatch):
    for name in [package] + [m for m in sys.modules if m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import package` now fails as if it were not installed
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check(entry, args, [f"the Python package {package}, needed for", f"pip install {package}"], world, tmp_path, capsys)


ALL = {"train.py": TRAIN, "sample.py": SAMPLE, "analyze.py": ANALYZE, "steer.py": STEER, "topics.py": TOPICS,
       "sae.py": SAE, "bench.py": BENCH, "data/prepare.py": PREPARE}


def test_readme_states_the_number_of_cases():
    """The count of bad-input cases in README.md or RESULTS.md is this file's, so it cannot drift."""
    n = sum(map(len, ALL.values()))
    readme = " ".join(" ".join(open(os.path.join(ROOT, doc), encoding="utf-8").read().split())
                      for doc in ("README.md", "RESULTS.md"))
    per = ", ".join(f"{script} {len(t)}" for script, t in ALL.items())
    assert f"**{n} bad-input cases**" in readme and per in readme, (n, per)


# ---------------------------------------------------------------------------------------------- real processes
@pytest.mark.parametrize("script,args,needle", [
    ("train.py", ["--learning_rate=-1"], "learning_rate=-1.0"),
    ("sample.py", ["--out_dir=/nonexistent"], "no checkpoint"),
    ("analyze.py", ["--regex=("], "regular expression"),
    ("steer.py", ["--pairs=0"], "pairs=0"),
    ("topics.py", ["--topics=nope"], "unknown topic"),
    ("bench.py", ["--only=lyer"], "'lyer'"),
    ("data/prepare.py", ["tinystory"], "'tinystory'"),
])
def test_scripts_print_one_line(script, args, needle):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


@pytest.mark.slow
def test_torchrun_batch_not_divisible_across_ranks(world, tmp_path):
    """Under torchrun every rank fails alike; the first says why, in its own stderr, and nothing changes."""
    w = str(tmp_path / "w")
    shutil.copytree(world, w)
    before = snapshot(w)
    logs = str(tmp_path / "logs")
    argv = once([a.format(run=os.path.join(w, "run")) for a in [*SCRATCH, "--batch_size=7"]])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        f"--log-dir={logs}", "--redirects=3", "train.py", *argv], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and 'train.py", line' not in r.stderr, r.stderr[-2000:]
    import glob

    stderr = "".join(open(f).read() for f in sorted(glob.glob(os.path.join(logs, "*", "attempt_0", "*", "stderr.log"))))
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("error:") and all(n in lines[0] for n in ("batch_size=7", "2 rank(s)", "multiple of 2"))
    assert snapshot(w) == before
