"""An LSTM language model: the recurrent baseline every transformer report should beat.

Same interface as the GPT for scoring (``model(idx [B, T]) -> logits [B, T, V]``), so the
evaluation's sliding-window scorer treats both families identically. Embeddings are tied
to the output layer through a projection when the embedding and hidden sizes differ, as
in the classic AWD-LSTM setup, which keeps the parameter count comparable to gpt_tiny.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn


@dataclass
class LSTMConfig:
    vocab_size: int
    embed_dim: int = 128
    hidden: int = 256
    layers: int = 1
    dropout: float = 0.0
    tie_embeddings: bool = True

    @classmethod
    def from_dict(cls, d: dict, **extra) -> LSTMConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in dict(d).items() if k in names}, **extra})

    def to_dict(self) -> dict:
        return asdict(self)


class LSTMLM(nn.Module):
    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.rnn = nn.LSTM(
            cfg.embed_dim, cfg.hidden, num_layers=cfg.layers, batch_first=True,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0,
        )
        self.proj = nn.Linear(cfg.hidden, cfg.embed_dim, bias=False) if cfg.hidden != cfg.embed_dim else nn.Identity()
        self.head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.head.weight = self.emb.weight
        nn.init.normal_(self.emb.weight, std=0.05)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, state=None, return_state: bool = False, return_hidden: bool = False):
        """`return_hidden=True`: the input of `head` instead of logits, for the chunked training loss."""
        x = self.drop(self.emb(idx))
        out, state = self.rnn(x, state)
        hidden = self.proj(self.drop(out))
        logits = hidden if return_hidden else self.head(hidden)
        return (logits, state) if return_state else logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
