"""
A GPT with codebook bottlenecks (Codebook Features, Section 3), in nanoGPT's shape and GPT-2's names.

One module covers the paper's TokFSM transformer and GPT-NeoX/Pythia: learned or rotary positions
(partial rotary, NeoX half-split), sequential or parallel residual, exact-erf GELU, LayerNorm with bias,
tied or untied unembedding, F.scaled_dot_product_attention. pythia.py maps a Pythia checkpoint onto it.

Codebook sites (GPTConfig.codebook_sites, comma-separated), in every layer or in `codebook_layers`:
    attn_heads  one codebook group per head, on the heads' outputs before attn.c_proj (the FSM runs)
    attn        the attention output, after attn.c_proj
    mlp         the MLP output, after mlp.c_proj
A codebook is named `h.{layer}.{site}` (module transformer.h.{layer}.codebooks.{site}); a "book" is one group of
it, `h.{layer}.{site}:{group}` when the codebook has several (per-head codebooks: one per head), and a code is
`BOOK:CODE`, e.g. `h.1.mlp:830` or `h.0.attn_heads:2:517`. analyze.py, steer.py and the README use these names.

    python model.py        # builds the FSM model with codebooks and prints its modules and sizes
"""

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import pythia
from codebook import CodebookLayer
from plumbing.configuration import ConfigError, build, device_of, is_index_list, spec, split_list, validate
from plumbing.rundir import load_checkpoint, load_state

SITES = ("attn_heads", "attn", "mlp")


@dataclass
class GPTConfig:
    """The model. Defaults: the quick TokFSM model (d=64, 4 heads of 16) with k=1 codebooks on every head and MLP."""

    block_size: int = spec(32, ">= 1")  # longest context in tokens
    vocab_size: int = spec(11, ">= 1")  # TokFSM: 10 digits + <|endoftext|>
    n_layer: int = spec(2, ">= 1")
    n_head: int = spec(4, ">= 1")
    n_embd: int = spec(64, ">= 1")
    n_inner: Optional[int] = spec(None, ">= 1")  # MLP hidden size; None means 4 * n_embd
    dropout: float = spec(0.0, "[0, 1)")
    bias: bool = True  # biases in Linear layers (LayerNorms always have one)
    pos_emb: str = spec("learned", ("learned", "rotary"))  # GPT-2 or GPT-NeoX positions
    rotary_pct: float = spec(0.25, "[0, 1]")  # fraction of each head's dims that are rotated
    rotary_base: float = spec(10000.0, "> 0")
    parallel_residual: bool = False  # x + attn(ln_1(x)) + mlp(ln_2(x)), as GPT-NeoX
    tie_weights: bool = True  # lm_head shares wte's weight
    layer_norm_eps: float = spec(1e-5, "> 0")
    # codebooks
    codebook_sites: str = spec("attn_heads,mlp", each=SITES, empty_ok=True)  # comma-separated; "" = none
    codebook_layers: str = spec("", check=is_index_list)  # comma-separated layer indices; "" = every layer
    num_codes: int = spec(256, ">= 1")  # codes per group
    k: int = spec(1, ">= 1")  # codes summed per token and group
    codebook_groups: int = spec(1, ">= 1")  # groups G of the attn and mlp sites (attn_heads uses n_head)
    codebook_layernorm: bool = True  # LayerNorm before the lookup (see codebook.py for why)
    codebook_chunk: int = spec(0, ">= 0")  # (token, group) rows scored at once; 0 = 32 MiB of scores (CPU), 256 MiB (GPU)
    recon_coef: float = spec(1.0, ">= 0")  # lambda of the MSE, a mean over dims: the authors' lambda=1 is n_embd

    def __post_init__(self):
        validate(self)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: pick a divisor of n_embd")
        rot = int(self.n_embd // self.n_head * self.rotary_pct)
        if self.pos_emb == "rotary" and rot % 2:
            raise ConfigError(f"rotary_pct={self.rotary_pct} rotates {rot} dims per head, an odd number: pick a "
                              "rotary_pct that rotates an even number")
        g = self.codebook_groups
        if {"attn", "mlp"} & set(self.sites) and self.n_embd % g:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by codebook_groups={g}: pick a divisor of n_embd")
        if self.sites and self.k > self.num_codes:
            raise ConfigError(f"k={self.k} must be in [1, num_codes={self.num_codes}]: lower k or raise num_codes")
        bad = [i for i in map(int, split_list(self.codebook_layers)) if not i < self.n_layer]  # named ones only
        if bad:
            raise ConfigError(f"codebook_layers {bad} out of range for n_layer={self.n_layer}: use 0..{self.n_layer - 1}")

    @property
    def sites(self):
        return [s for s in SITES if s in split_list(self.codebook_sites)]  # in forward order

    @property
    def layers(self):
        return [int(i) for i in split_list(self.codebook_layers)] or list(range(self.n_layer))

    def codebook(self, site):
        groups = self.n_head if site == "attn_heads" else self.codebook_groups
        return CodebookLayer(self.n_embd, self.num_codes, self.k, groups, self.codebook_layernorm, self.codebook_chunk)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
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

    def rotary(self, x, pos):
        """NeoX rotary on the first `rot` dims of each head (half-split pairs). x: (B, nh, T, hs)."""
        freqs = pos.float().unsqueeze(-1) * self.inv_freq  # (T, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, rot)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        xr, xp = x[..., : self.rot], x[..., self.rot :]
        return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)

    def forward(self, x, pos, cache=None, codebook=None):
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
        if codebook is not None:
            y = codebook(y)  # groups = heads: one codebook per head
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
        self.parallel = config.parallel_residual
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        sites = config.sites if layer in config.layers else []
        self.codebooks = nn.ModuleDict({site: config.codebook(site) for site in sites})

    def forward(self, x, pos, cache=None):
        cb = self.codebooks
        a = self.attn(self.ln_1(x), pos, cache, cb["attn_heads"] if "attn_heads" in cb else None)  # (B, T, C)
        if "attn" in cb:
            a = cb["attn"](a)
        if not self.parallel:
            x = x + a
        m = self.mlp(self.ln_2(x))  # (B, T, C)
        if "mlp" in cb:
            m = cb["mlp"](m)
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
        """[(name, CodebookLayer)] in forward order, named h.{layer}.{site}, e.g. ('h.0.attn_heads', layer)."""
        return [(f"h.{i}.{site}", cb) for i, block in enumerate(self.transformer.h)
                for site, cb in block.codebooks.items()]

    def books(self):
        """[(book, codebook name, group, CodebookLayer)], one per group: 'h.1.mlp', or 'h.0.attn_heads:2' (head 2)
        for codebooks with several groups."""
        return [(f"{name}:{g}" if cb.groups > 1 else name, name, g, cb)
                for name, cb in self.codebooks() for g in range(cb.groups)]

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
        """A GPT holding the weights of a local GPT-NeoX/Pythia directory (config.json + safetensors or .bin,
        sharded or not), with the GPTConfig `overrides` (the codebooks) applied; see pythia.py. Raises ConfigError."""
        model = cls(build(GPTConfig, pythia.pythia_config(path, **overrides)))
        pythia.load_pythia_weights(model, path)  # the codebooks keep their fresh init
        return model


def model_from_checkpoint(ckpt, device="cpu"):
    """The GPT of a checkpoint, rebuilt from the config stored in it, in eval mode on `device`."""
    try:
        model = GPT(build(GPTConfig, ckpt["model_config"], "the checkpoint's model_config"))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the checkpoint's model_config is invalid ({e}): another version of this code wrote it")
    load_state(model, ckpt["model"], "the checkpoint's weights")
    return model.to(device).eval()


def load_run(out_dir, device):
    """(checkpoint, model) of the run in out_dir, for the tools that read a run (sample, analyze, steer)."""
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    return ckpt, model_from_checkpoint(ckpt, device_of(device))

if __name__ == "__main__":
    cfg = GPTConfig(codebook_sites="attn_heads,mlp", num_codes=1000, k=1)
    model = GPT(cfg)
    print(model)
    print(f"{model.get_num_params() / 1e6:.2f}M parameters; codebooks:")
    for name, cb in model.codebooks():
        print(f"  {name}: {cb.groups} group(s) x {cb.num_codes} codes, k={cb.k}")
