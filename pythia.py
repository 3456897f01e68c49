"""
Map a Hugging Face GPT-NeoX/Pythia checkpoint onto model.GPT (the paper finetunes Pythia-410M with codebooks,
Section 5): config.json -> GPTConfig, then a state-dict mapper. Local directories only, no hub access; data/prepare.py
pythia downloads one, scripts/random_pythia.py writes a random one offline.

    model = GPT.from_pythia("data/pythia-70m-deduped", codebook_sites="attn_heads", num_codes=10_000, k=8)
    python train.py config/wikitext.py --init_from=data/pythia-70m-deduped

Shapes: wte (vocab_size, C) with vocab_size the padded embedding rows (50304 for Pythia), c_attn (3C, C) as
[q; k; v] (NeoX interleaves them per head), mlp.c_fc (n_inner, C), lm_head (vocab_size, C) (untied in Pythia).
Every problem (another architecture, a missing or misshapen key, a missing shard) is a ConfigError naming the
file and the key.
"""

import os

import torch

from plumbing.configuration import ConfigError
from plumbing.entry import require
from plumbing.files import read_json

FIX = "point init_from at a complete local Pythia/GPT-NeoX download"
# the GPTConfig fields a finetuning run sets; the rest come from the checkpoint's config.json
OVERRIDES = ("codebook_sites", "codebook_layers", "num_codes", "k", "codebook_groups", "codebook_layernorm",
             "codebook_chunk", "recon_coef", "block_size")

PYTHIA_LAYER = {  # GPT-NeoX module name -> ours, inside layer i
    "input_layernorm": "ln_1",
    "attention.query_key_value": "attn.c_attn",
    "attention.dense": "attn.c_proj",
    "post_attention_layernorm": "ln_2",
    "mlp.dense_h_to_4h": "mlp.c_fc",
    "mlp.dense_4h_to_h": "mlp.c_proj",
}
PYTHIA_SKIP = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")  # buffers of old checkpoints


def pythia_config(path, **overrides):
    """The GPTConfig fields (a dict) of a GPT-NeoX/Pythia config.json, old (rotary_pct, rotary_emb_base) or new
    (rope_parameters / partial_rotary_factor, rope_theta) names; `overrides` are GPTConfig fields of OVERRIDES.
    It imports no model: GPT.from_pythia builds the GPT from these fields and calls load_pythia_weights."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"init_from={path!r} is not 'scratch', 'resume' or a local Pythia/GPT-NeoX directory "
                          "(config.json + weights): pass --init_from=DIR, e.g. a download of EleutherAI/pythia-410m")
    fixed = sorted(set(overrides) - set(OVERRIDES))
    if fixed:
        raise ConfigError(f"{fixed} come from {file}: with a pretrained init_from set only {', '.join(OVERRIDES)}")
    hf = read_json(file, "GPT-NeoX config", FIX)
    arch = hf.get("architectures") or ["GPTNeoXForCausalLM"]
    if hf.get("model_type") != "gpt_neox" or arch != ["GPTNeoXForCausalLM"]:
        raise ConfigError(f"{file}: model_type={hf.get('model_type')!r}, architectures={arch}; only gpt_neox "
                          f"(GPTNeoXForCausalLM) can be loaded: {FIX}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{file}: hidden_act={hf['hidden_act']!r}, but our MLP uses exact (erf) 'gelu': {FIX}")
    if not hf.get("attention_bias", True):
        raise ConfigError(f"{file}: attention_bias=False, but our Linear layers all have biases: {FIX}")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ConfigError(f"{file}: rope scaling {rope or hf.get('rope_scaling')} is not supported: {FIX}")

    def need(key):
        if key not in hf:
            raise ConfigError(f"{file}: missing field {key!r}: {FIX}")
        return hf[key]

    fields = dict(
        vocab_size=need("vocab_size"),  # the padded embedding rows
        n_layer=need("num_hidden_layers"),
        n_head=need("num_attention_heads"),
        n_embd=need("hidden_size"),
        n_inner=need("intermediate_size"),
        block_size=need("max_position_embeddings"),
        pos_emb="rotary",
        rotary_pct=rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))),
        rotary_base=rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0))),
        parallel_residual=hf.get("use_parallel_residual", True),
        tie_weights=hf.get("tie_word_embeddings", False),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        bias=True,
        dropout=0.0,
        codebook_sites="",  # the pretrained model as it is; codebooks come from the overrides
    )
    return {**fields, **overrides}


def pythia_state_dict(path):
    """({key: tensor}, {key: file}) of a GPT-NeoX checkpoint directory, single file or sharded."""
    def load(file):
        if not os.path.exists(file):
            raise ConfigError(f"{file}: shard listed in the index is missing: {FIX}")
        load_file = require("safetensors.torch", f"reading {file}", "safetensors").load_file if \
            file.endswith(".safetensors") else None
        try:
            if load_file:
                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # torn or foreign
            raise ConfigError(f"{file} cannot be read as weights ({type(e).__name__}): {FIX}") from None

    names = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    for name in names:
        file = os.path.join(path, name)
        if os.path.exists(file):
            break
    else:
        raise ConfigError(f"{path}: no weights file, expected one of {names}: {FIX}")
    if not name.endswith(".index.json"):
        sd = load(file)
        return sd, {k: file for k in sd}
    shards = sorted(set(read_json(file, "weights index", FIX).get("weight_map", {}).values()))
    sd, where = {}, {}
    for shard in shards:
        part = load(os.path.join(path, shard))
        sd.update(part)
        where.update({k: os.path.join(path, shard) for k in part})
    return sd, where


@torch.no_grad()
def load_pythia_weights(model, path):
    """Copy a GPT-NeoX checkpoint into `model` (built by pythia_config) in place; codebooks are untouched."""
    sd, where = pythia_state_dict(path)
    names = {"gpt_neox.embed_in.weight": "transformer.wte.weight", "embed_out.weight": "lm_head.weight"}
    for w in ("weight", "bias"):
        names[f"gpt_neox.final_layer_norm.{w}"] = f"transformer.ln_f.{w}"
        for i in range(model.config.n_layer):
            for theirs, ours in PYTHIA_LAYER.items():
                names[f"gpt_neox.layers.{i}.{theirs}.{w}"] = f"transformer.h.{i}.{ours}.{w}"
    tied = model.config.tie_weights
    if tied:  # lm_head is wte; a saved embed_out is a copy of embed_in (transformers ignores it too)
        del names["embed_out.weight"]
    ours = model.state_dict()
    for key, t in sd.items():
        if key.endswith(PYTHIA_SKIP) or (tied and key == "embed_out.weight"):
            continue
        if key not in names:
            raise ConfigError(f"{where[key]}: unknown key {key!r} for a GPT-NeoX with n_layer={model.config.n_layer}: {FIX}")
        p = ours[names[key]]
        if t.shape != p.shape:
            raise ConfigError(f"{where[key]}: {key} has shape {tuple(t.shape)}, {names[key]} needs {tuple(p.shape)}: {FIX}")
        if key.endswith("query_key_value.weight") or key.endswith("query_key_value.bias"):
            # NeoX orders the 3C rows per head, [q_0, k_0, v_0, q_1, ...] (hs rows each); ours are [q; k; v]
            nh = model.config.n_head
            t = t.reshape(nh, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)  # (3, nh, hs, ...) -> (3C, ...)
        p.copy_(t)
    missing = [k for k in names if k not in sd]
    if missing:
        raise ConfigError(f"{path}: checkpoint lacks {len(missing)} key(s), first {missing[0]!r}: {FIX}")

