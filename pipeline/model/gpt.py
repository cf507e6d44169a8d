"""A small decoder-only transformer, readable top to bottom (nanoGPT style).

Two architectures share the code, chosen by `GPTConfig.arch`:

- `llama` (default): RMSNorm before each sub-layer, rotary position embeddings in the
  "rotate_half" convention that `transformers` uses, a SwiGLU MLP, no biases. Matching
  Llama exactly is what lets `pipeline.apps.export` hand the weights to `LlamaForCausalLM`.
- `gpt2`: GPT-2's own layout (learned absolute positions, LayerNorm, tanh-GELU MLP,
  biases), so a model exports to `GPT2LMHeadModel` and code written for GPT-2 runs on it.

Both tie input and output embeddings and use `scaled_dot_product_attention`. Packed
fine-tuning rows pass `segments` (which example each token belongs to): attention is then
block-diagonal and positions restart at every example, so a packed example computes
exactly what it would alone. The file knows nothing of devices or parallelism: precision,
DDP/FSDP and `torch.compile` are applied from outside by config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("llama", "gpt2")


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 192
    mlp_hidden: int = 512
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    arch: str = "llama"
    causal: bool = True  # False: bidirectional attention (the masked-LM objective, `pretrain.objective=mlm`)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (steadier attention logits at high LR)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown model.arch {self.arch!r}; expected one of {', '.join(ARCHS)}")

    @classmethod
    def from_dict(cls, d: dict, **extra) -> GPTConfig:
        """Build from a (Hydra) mapping, ignoring keys that are not model fields (`kind`, ...)."""
        names = {f.name for f in fields(cls)}
        merged = {**{k: v for k, v in dict(d).items() if k in names}, **extra}
        return cls(**merged)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, scale by a learned weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(cfg: GPTConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.arch == "gpt2" else RMSNorm(cfg.d_model, cfg.norm_eps)


class Rotary(nn.Module):
    """cos/sin tables for RoPE; frequencies repeat over both halves of a head (HF layout)."""

    def __init__(self, head_dim: int, max_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, T: int, offset: int = 0, positions: torch.Tensor | None = None):
        """[T, head_dim] tables, or [B, 1, T, head_dim] for per-row `positions` [B, T]."""
        if positions is not None:
            return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return self.cos[offset : offset + T], self.sin[offset : offset + T]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """Position of each token within its run of equal segment ids ([B, T] -> [B, T])."""
    T = segments.shape[1]
    t = torch.arange(T, device=segments.device).expand_as(segments)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return t - torch.where(start, t, torch.zeros_like(t)).cummax(dim=1).values


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] attention mask: causal and within the same segment only."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal).unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be a multiple of n_head"
        bias = cfg.arch == "gpt2"
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=bias)  # q, k, v stacked by rows
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.dropout = cfg.dropout
        self.causal = cfg.causal
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, cos=None, sin=None, cache: dict | None = None, mask: torch.Tensor | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and "slot_k" in cache:  # batched decoding: one new token per row
            rows, pos = torch.arange(B, device=x.device), cache["pos"]
            cache["slot_k"][rows, :, pos] = k[:, :, 0]
            cache["slot_v"][rows, :, pos] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, cache["slot_k"], cache["slot_v"], attn_mask=cache["mask"])
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        if cache is not None:  # incremental decoding: append this step's keys/values
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # a cached prefix is entirely in the past, so only a multi-token query needs the causal mask
        causal = self.causal and mask is None and k.shape[2] == T
        if self.causal and mask is None and not causal and T > 1:
            raise ValueError("multi-token queries with a KV cache are not supported")
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.hidden = cfg.mlp_hidden
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.mlp_hidden, bias=False)  # gate rows, then up rows
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2's MLP: Linear, GELU (tanh approximation, HF's `gelu_new`), Linear, with biases."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_hidden)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = GeluMLP(cfg) if cfg.arch == "gpt2" else SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos=None, sin=None, cache=None, mask=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.arch == "gpt2":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied embeddings
        if cfg.arch == "llama":
            self.rotary = Rotary(cfg.head_dim, cfg.block_size, cfg.rope_theta)
        self.apply(self._init)
        # GPT-2: scale the residual projections so the residual stream's variance stays put
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def forward(
        self, idx: torch.Tensor, caches: list[dict] | None = None, offset: int = 0,
        segments: torch.Tensor | None = None, positions: torch.Tensor | None = None, return_hidden: bool = False,
    ) -> torch.Tensor:
        """LongTensor [B, T] -> logits [B, T, vocab].

        `caches` (one dict per layer) enables KV caching, `offset` is the position of
        idx[:, 0]. `segments` [B, T] (example index per token, for packed rows) restricts
        attention to the token's own example and restarts positions at each example.
        `positions` [B, T] gives each row its own positions: batched decoding, where each
        layer's cache holds preallocated per-row slots (`slot_k`, `slot_v` [B, heads, block,
        head_dim], the write position `pos` [B] and the attention `mask` [B, 1, 1, block]).
        `return_hidden=True` returns the final normalised hidden states [B, T, d_model] instead,
        for a loss that applies `lm_head` a chunk of positions at a time (full-vocabulary
        logits of a whole batch are the largest tensor of a training step).
        """
        T = idx.shape[1]
        if offset + T > self.cfg.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size {self.cfg.block_size}")
        mask = None
        if segments is not None:
            if caches is not None:
                raise ValueError("segments (packed rows) cannot be combined with a KV cache")
            positions, mask = segment_positions(segments), segment_mask(segments)
        x = self.tok_emb(idx)
        cos = sin = None
        if self.cfg.arch == "gpt2":
            pos = positions if positions is not None else torch.arange(offset, offset + T, device=idx.device)
            x = x + self.pos_emb(pos)
        else:
            cos, sin = self.rotary(T, offset, positions)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if caches is None else caches[i], mask)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)
