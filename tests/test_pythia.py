"""GPT.from_pythia: parity with a tiny random transformers GPT-NeoX (logits, greedy generation, bypassed
codebooks), the config names of old and new transformers versions, and clear errors. Offline, CPU."""

import json
import os

import pytest
import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never call the hub
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from model import GPT  # noqa: E402
from plumbing.configuration import ConfigError  # noqa: E402
from pythia import pythia_config  # noqa: E402


def tiny_neox(parallel=True):
    cfg = transformers.GPTNeoXConfig(
        vocab_size=96,  # padded embedding rows
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=256,
        rotary_pct=0.25,
        max_position_embeddings=64,
        use_parallel_residual=parallel,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # LayerNorms away from 1/0, and nonzero biases, so a swapped or dropped one shows
        for m in hf.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
            if getattr(m, "bias", None) is not None:
                m.bias.add_(0.2 * torch.randn_like(m.bias))
    hf.generation_config.eos_token_id = None  # greedy runs the full 20 tokens
    return hf


def save(hf, path, fmt="safetensors"):
    """Save in the original GPT-NeoX key names: model.safetensors, pytorch_model.bin or 2+ shards."""
    if fmt == "sharded":
        hf.save_pretrained(path, max_shard_size="40KB")
        assert os.path.exists(path / "model.safetensors.index.json")
        return
    hf.save_pretrained(path)
    if fmt == "bin":  # this transformers saves safetensors only: rewrite its tensors with torch.save
        torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
        os.remove(path / "model.safetensors")


def edit_checkpoint(path, fn):
    file = path / "model.safetensors"
    sd = load_file(file)
    fn(sd)
    save_file(sd, file)


def max_logit_diff(hf, model):
    idx = torch.randint(96, (2, 32))
    with torch.no_grad():
        ref = hf(idx).logits
        ours, _, _ = model(idx)
    return (ref - ours).abs().max().item()


def assert_greedy_equal(hf, model):
    idx = torch.randint(96, (2, 8))
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False, pad_token_id=0)
    ours = model.generate(idx, 20, temperature=0)
    assert ref.shape == (2, 28)
    assert torch.equal(ref, ours)


@pytest.mark.parametrize(
    "parallel,fmt", [(True, "safetensors"), (False, "safetensors"), (True, "bin"), (True, "sharded")]
)
def test_parity(tmp_path, parallel, fmt):
    hf = tiny_neox(parallel)
    save(hf, tmp_path, fmt)
    model = GPT.from_pythia(tmp_path).eval()
    c = model.config
    assert (c.vocab_size, c.n_embd, c.n_inner, c.rotary_pct, c.parallel_residual) == (96, 64, 256, 0.25, parallel)
    assert not c.tie_weights and model.transformer.h[0].attn.rot == 4
    diff = max_logit_diff(hf, model)
    print(f"parallel={parallel} {fmt}: max |dlogits| = {diff:.2e}")
    assert diff <= 1e-4
    assert_greedy_equal(hf, model)


@pytest.mark.parametrize("parallel", [True, False])
def test_parity_with_bypassed_codebooks(tmp_path, parallel):
    hf = tiny_neox(parallel)
    save(hf, tmp_path)
    model = GPT.from_pythia(
        tmp_path, codebook_sites="attn_heads,mlp", codebook_layernorm=False, num_codes=16
    ).eval()
    cbs = model.codebooks()
    assert len(cbs) == 2 * 2 and cbs[0][1].groups == 4
    for _, cb in cbs:
        cb.bypass = True
    diff = max_logit_diff(hf, model)
    print(f"parallel={parallel} bypassed codebooks: max |dlogits| = {diff:.2e}")
    assert diff <= 1e-4
    assert_greedy_equal(hf, model)


def test_legacy_buffers_are_skipped(tmp_path):
    hf = tiny_neox()
    save(hf, tmp_path)

    def add_buffers(sd):
        for i in range(2):
            sd[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
            sd[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
            sd[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)

    edit_checkpoint(tmp_path, add_buffers)
    model = GPT.from_pythia(tmp_path).eval()
    assert max_logit_diff(hf, model) <= 1e-4


def write_config(path, **kw):
    path.mkdir()
    cfg = dict(
        model_type="gpt_neox",
        architectures=["GPTNeoXForCausalLM"],
        vocab_size=50304,
        hidden_size=512,
        num_attention_heads=8,
        num_hidden_layers=6,
        intermediate_size=2048,
        max_position_embeddings=2048,
        hidden_act="gelu",
        use_parallel_residual=True,
        tie_word_embeddings=False,
        layer_norm_eps=1e-5,
    )
    cfg.update(kw)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_old_and_new_rotary_names_agree(tmp_path):
    old = pythia_config(write_config(tmp_path / "old", rotary_pct=0.5, rotary_emb_base=500.0))
    rope = dict(rope_type="default", partial_rotary_factor=0.5, rope_theta=500.0)  # transformers >= 5
    new = pythia_config(write_config(tmp_path / "new", rope_parameters=rope))
    flat = pythia_config(write_config(tmp_path / "flat", partial_rotary_factor=0.5, rope_theta=500.0))  # flat new names
    assert old == new == flat
    assert [old[k] for k in ("rotary_pct", "rotary_base", "vocab_size", "block_size")] == [0.5, 500.0, 50304, 2048]
    assert [old[k] for k in ("n_layer", "n_head", "n_embd", "n_inner", "pos_emb")] == [6, 8, 512, 2048, "rotary"]
    assert pythia_config(tmp_path / "old", num_codes=7, codebook_sites="mlp")["num_codes"] == 7


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "gpt2"),
        (dict(architectures=["GPTNeoXForSequenceClassification"]), "GPTNeoXForSequenceClassification"),
        (dict(hidden_act="gelu_fast"), "gelu_fast"),
    ],
)
def test_other_configs_raise(tmp_path, kw, match):
    path = write_config(tmp_path / "c", **kw)
    with pytest.raises(ConfigError, match=match):
        GPT.from_pythia(path)


def test_missing_key_raises(tmp_path):
    save(tiny_neox(), tmp_path)
    edit_checkpoint(tmp_path, lambda sd: sd.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(ConfigError, match=r"gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        GPT.from_pythia(tmp_path)


def test_unknown_key_raises(tmp_path):
    save(tiny_neox(), tmp_path)
    edit_checkpoint(tmp_path, lambda sd: sd.update({"gpt_neox.layers.2.input_layernorm.weight": torch.ones(64)}))
    with pytest.raises(ConfigError, match=r"model\.safetensors.*gpt_neox\.layers\.2\.input_layernorm\.weight"):
        GPT.from_pythia(tmp_path)


def test_wrong_shape_raises(tmp_path):
    save(tiny_neox(), tmp_path)
    edit_checkpoint(tmp_path, lambda sd: sd.update({"gpt_neox.layers.0.attention.dense.weight": torch.ones(64, 32)}))
    with pytest.raises(ConfigError, match=r"attention\.dense\.weight has shape \(64, 32\).*\(64, 64\)"):
        GPT.from_pythia(tmp_path)


def test_missing_shard_raises(tmp_path):
    save(tiny_neox(), tmp_path, "sharded")
    shards = sorted(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
    os.remove(tmp_path / shards[-1])
    with pytest.raises(ConfigError, match=shards[-1]):
        GPT.from_pythia(tmp_path)
