"""
A GPT with codebook bottlenecks (Codebook Features, Section 3), in nanoGPT's shape and GPT-2's names.

One module covers the paper's TokFSM transformer and GPT-NeoX/Pythia: learned or rotary positions
(partial rotary, NeoX half-split), sequential or parallel residual, exact-erf GELU, LayerNorm with bias,
tied or untied unembedding, F.scaled_dot_product_attention.

Codebook sites (GPTConfig.codebook_sites, comma-separated), in every layer or in `codebook_layers`:
    attn_heads  one codebook group per head, on the heads' outputs before attn.c_proj (the FSM runs)
    attn        the attention output, after attn.c_proj
    mlp         the MLP output, after mlp.c_proj

    python model.py        # builds the FSM model with codebooks and prints its modules and sizes
"""

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from codebook import CodebookLayer

SITES = ("attn_heads", "attn", "mlp")


@dataclass
class GPTConfig:
    """The model. Defaults: the laptop TokFSM model with k=1 codebooks on every head and MLP."""

    block_size: int = 32  # longest context in tokens
    vocab_size: int = 11  # TokFSM: 10 digits + <|endoftext|>
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_inner: Optional[int] = None  # MLP hidden size; None means 4 * n_embd
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers (LayerNorms always have one)
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rotary" (GPT-NeoX)
    rotary_pct: float = 0.25  # fraction of each head's dims that are rotated
    rotary_base: float = 10000.0
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)), as GPT-NeoX
    tie_weights: bool = True  # lm_head shares wte's weight
    layer_norm_eps: float = 1e-5
    # codebooks
    codebook_sites: str = "attn_heads,mlp"  # comma-separated from: attn_heads, attn, mlp; "" = none
    codebook_layers: str = ""  # comma-separated layer indices; "" = every layer
    num_codes: int = 1000  # codes per group
    k: int = 1  # codes summed per token and group
    codebook_groups: int = 1  # groups G of the attn and mlp sites (attn_heads uses n_head)
    codebook_layernorm: bool = True  # LayerNorm before the lookup (see codebook.py for why)
    codebook_chunk: int = 0  # (token, group) rows scored at once; 0 = 32 MiB of scores (CPU), 256 MiB (GPU)
    recon_coef: float = 1.0  # lambda of the reconstruction loss

    def __post_init__(self):
        for key in ("block_size", "vocab_size", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1: pass --{key}=N with N >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: pick a divisor of n_embd")
        if self.pos_emb not in ("learned", "rotary"):
            raise ValueError(f"pos_emb must be 'learned' or 'rotary', got {self.pos_emb!r}")
        bad = set(self.sites) - set(SITES)
        if bad:
            raise ValueError(f"unknown codebook site(s) {sorted(bad)}: choose from {', '.join(SITES)}")
        if self.sites and self.num_codes < 1:
            raise ValueError(f"num_codes must be >= 1, got {self.num_codes}: raise num_codes (or set codebook_sites=)")
        g = self.codebook_groups
        if {"attn", "mlp"} & set(self.sites) and (g < 1 or self.n_embd % g):
            raise ValueError(f"n_embd={self.n_embd} is not divisible by codebook_groups={g}: pick a divisor of n_embd")
        if self.sites and not 1 <= self.k <= self.num_codes:
            raise ValueError(f"k={self.k} must be in [1, num_codes={self.num_codes}]: lower k or raise num_codes")
        bad = [i for i in self.layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"codebook_layers {bad} out of range for n_layer={self.n_layer}")

    @property
    def sites(self):
        return [s.strip() for s in self.codebook_sites.split(",") if s.strip()]

    @property
    def layers(self):
        if not self.codebook_layers.strip():
            return list(range(self.n_layer))
        try:
            return [int(i) for i in self.codebook_layers.split(",") if i.strip()]
        except ValueError:
            raise ValueError(f"codebook_layers must be comma-separated integers, got {self.codebook_layers!r}")

    def codebook(self, dim, groups):
        return CodebookLayer(dim, self.num_codes, self.k, groups, self.codebook_layernorm, self.codebook_chunk)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, use_cb):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # [q; k; v]
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        hs = config.n_embd // config.n_head
        self.rot = int(hs * config.rotary_pct) if config.pos_emb == "rotary" else 0
        if self.rot:
            inv_freq = 1.0 / config.rotary_base ** (torch.arange(0, self.rot, 2).float() / self.rot)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.codebook = config.codebook(config.n_embd, config.n_head) if use_cb else None

    def rotary(self, x, pos):
        """NeoX rotary on the first `rot` dims of each head (half-split pairs). x: (B, nh, T, hs)."""
        freqs = pos.float().unsqueeze(-1) * self.inv_freq  # (T, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, rot)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        xr, xp = x[..., : self.rot], x[..., self.rot :]
        return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)

    def forward(self, x, pos, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        if self.rot:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        if cache is not None:  # generation: attend to the cached keys and values too
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        causal = T > 1  # a single new query may see every cached key
        if causal and k.size(2) != T:
            raise ValueError("a cached forward takes one token at a time")
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, nh * hs): head h is slice h
        if self.codebook is not None:
            y = self.codebook(y)  # groups = heads: one codebook per head
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        n_inner = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, n_inner, bias=config.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU, as GPT-NeoX
        self.c_proj = nn.Linear(n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        on = layer in config.layers
        self.parallel = config.parallel_residual
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, on and "attn_heads" in config.sites)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        g = config.codebook_groups
        self.attn_cb = config.codebook(config.n_embd, g) if on and "attn" in config.sites else None
        self.mlp_cb = config.codebook(config.n_embd, g) if on and "mlp" in config.sites else None

    def forward(self, x, pos, cache=None):
        a = self.attn(self.ln_1(x), pos, cache)  # (B, T, C)
        if self.attn_cb is not None:
            a = self.attn_cb(a)
        if not self.parallel:
            x = x + a
        m = self.mlp(self.ln_2(x))  # (B, T, C)
        if self.mlp_cb is not None:
            m = self.mlp_cb(m)
        return x + a + m if self.parallel else x + m


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None,
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2: scaled init of the residual projections
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def codebooks(self):
        """[(name, CodebookLayer)] in forward order, e.g. ('h.0.attn.codebook', layer)."""
        return [(n.removeprefix("transformer."), m) for n, m in self.named_modules() if isinstance(m, CodebookLayer)]

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, cache=None, last_only=False):
        """Logits and loss.

        Args:
            idx: (B, T) token ids, T <= block_size.
            targets: (B, T) or None; -1 is ignored.
            cache: None, or a list of n_layer dicts filled with keys/values for cached generation
                (then T must be 1 once the cache holds anything).
            last_only: unembed the last position only, logits (B, 1, vocab_size) (generation; no targets).
        Returns:
            logits (B, T, vocab_size); loss = CE + recon_coef * sum of codebook reconstruction losses
            (None without targets); terms = {"ce": CE, "recon": sum of reconstruction losses} (detached).
        """
        B, T = idx.size()
        if last_only and targets is not None:
            raise ValueError("last_only computes the last position's logits only: it takes no targets")
        start = cache[0]["k"].size(2) if cache and "k" in cache[0] else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, pos, cache[i] if cache is not None else None)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): a 50k-token vocabulary makes the other positions' logits the cost
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits, None, {}
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        recons = [cb.recon_loss for _, cb in self.codebooks() if cb.recon_loss is not None]
        recon = torch.stack(recons).sum() if recons else torch.zeros((), device=idx.device)
        loss = ce + self.config.recon_coef * recon
        return logits, loss, {"ce": ce.detach(), "recon": recon.detach()}

    def configure_optimizers(self, weight_decay, learning_rate, betas, codebook_lr=None):
        """AdamW; weight decay on matrices of Linear/Embedding layers only, never on codes, norms, biases.
        `codebook_lr` (None = learning_rate) sets the codes' own learning rate."""
        codes = {id(cb.codes) for _, cb in self.codebooks()}
        params = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2 and id(p) not in codes]
        no_decay = [p for p in params.values() if p.dim() < 2 and id(p) not in codes]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        cb = [p for p in params.values() if id(p) in codes]
        if cb:
            groups.append({"params": cb, "weight_decay": 0.0, "lr": codebook_lr or learning_rate})
        for g in groups:
            g["lr_scale"] = g.get("lr", learning_rate) / learning_rate  # train.py's schedule multiplies this
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample `max_new_tokens` tokens after idx (B, T) with a key/value cache. Returns (B, T + new).

        temperature 0 is greedy. Past block_size the context is cropped and recomputed each step.
        """
        cache = [dict() for _ in self.transformer.h]
        logits, _, _ = self(idx[:, -self.config.block_size :], cache=cache, last_only=True)
        for _ in range(max_new_tokens):
            logits = logits[:, -1, :]  # (B, vocab_size)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
            if idx.size(1) > self.config.block_size:  # full window: recompute without the cache
                cache = None
                logits, _, _ = self(idx[:, -self.config.block_size :], last_only=True)
            else:
                logits, _, _ = self(nxt, cache=cache)
        return idx

    @classmethod
    def from_pythia(cls, path, **overrides):
        """A GPT holding the weights of a local Hugging Face GPT-NeoX/Pythia directory (no hub access).

        `path` holds config.json and model.safetensors or pytorch_model.bin, or a sharded checkpoint
        (model.safetensors.index.json / pytorch_model.bin.index.json). `overrides` are GPTConfig fields
        applied on top of the mapped config, e.g. codebook_sites="attn_heads,mlp", num_codes=1000.
        Codebooks keep their fresh init; weights are cast to the model's dtype (fp32).
        Shapes: wte (vocab_size, C) with vocab_size the padded embedding rows (50304 for Pythia),
        c_attn (3C, C) as [q; k; v], mlp.c_fc (n_inner, C), lm_head (vocab_size, C).

        Raises:
            ValueError: a config of another architecture, an unsupported activation or rope type,
                or a checkpoint tensor whose shape differs from ours (message names the key, both shapes).
            KeyError: a missing config field, an unknown or a missing checkpoint key (names file and key).
            FileNotFoundError: no weights file, or a shard listed in the index is absent (names the shard).
        """
        model = cls(pythia_config(path, **overrides))
        load_pythia_weights(model, path)
        return model


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
    """GPTConfig from a GPT-NeoX/Pythia config.json, old (rotary_pct, rotary_emb_base) or new
    (rope_parameters / partial_rotary_factor, rope_theta) names; `overrides` are GPTConfig fields."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        hf = json.load(f)
    arch = hf.get("architectures") or ["GPTNeoXForCausalLM"]
    if hf.get("model_type") != "gpt_neox" or arch != ["GPTNeoXForCausalLM"]:
        raise ValueError(
            f"{file}: model_type={hf.get('model_type')!r}, architectures={arch}; "
            "from_pythia loads only gpt_neox (GPTNeoXForCausalLM)"
        )
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{file}: hidden_act={hf['hidden_act']!r}, but our MLP uses exact (erf) 'gelu'")
    if not hf.get("attention_bias", True):
        raise ValueError(f"{file}: attention_bias=False, but our Linear layers all have biases")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"{file}: rope scaling {rope or hf.get('rope_scaling')} is not supported")

    def need(key):
        if key not in hf:
            raise KeyError(f"{file}: missing field {key!r}")
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
    return GPTConfig(**{**fields, **overrides})


def pythia_state_dict(path):
    """({key: tensor}, {key: file}) of a GPT-NeoX checkpoint directory, single file or sharded."""
    def load(file):
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: shard listed in the index is missing")
        if file.endswith(".safetensors"):
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)

    names = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    for name in names:
        file = os.path.join(path, name)
        if os.path.exists(file):
            break
    else:
        raise FileNotFoundError(f"{path}: no weights file, expected one of {names}")
    if not name.endswith(".index.json"):
        sd = load(file)
        return sd, {k: file for k in sd}
    with open(file) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
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
            raise KeyError(f"{where[key]}: unknown key {key!r} for a GPT-NeoX with n_layer={model.config.n_layer}")
        p = ours[names[key]]
        if t.shape != p.shape:
            raise ValueError(f"{where[key]}: {key} has shape {tuple(t.shape)}, {names[key]} needs {tuple(p.shape)}")
        if key.endswith("query_key_value.weight") or key.endswith("query_key_value.bias"):
            # NeoX orders the 3C rows per head, [q_0, k_0, v_0, q_1, ...] (hs rows each); ours are [q; k; v]
            nh = model.config.n_head
            t = t.reshape(nh, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)  # (3, nh, hs, ...) -> (3C, ...)
        p.copy_(t)
    missing = [k for k in names if k not in sd]
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} key(s), first {missing[0]!r}")


if __name__ == "__main__":
    cfg = GPTConfig(codebook_sites="attn_heads,mlp", num_codes=1000, k=1)
    model = GPT(cfg)
    print(model)
    print(f"{model.get_num_params() / 1e6:.2f}M parameters; codebooks:")
    for name, cb in model.codebooks():
        print(f"  {name}: {cb.groups} group(s) x {cb.num_codes} codes, k={cb.k}")
