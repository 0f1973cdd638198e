"""The coarse model's heads (coarse spec §2): the original's initialisation, the ``cls_feats`` and
ITC poolers, the MLM head and the ITM head. Their attribute names are the released checkpoints' keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["init_head", "Pooler", "POOLINGS", "MLMHead", "ITMHead"]

POOLINGS = ("first", "mean")  # Pooler: the first token (<s>) or the token mean


def init_head(module: nn.Module) -> None:
    """Normal(0, 0.02) Linear weights, zero biases, unit LayerNorms (the original's init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Pooler(nn.Module):
    """Dense + tanh on one token (``pool="first"``) or on the token mean (``pool="mean"``; over the
    tokens where ``mask`` is 1 when a mask is given)."""

    def __init__(self, dim: int, pool: str):
        super().__init__()
        if pool not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pool!r}")
        self.dense = nn.Linear(dim, dim)
        self.pool = pool

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, N, D), mask: optional (B, N) -> (B, D)."""
        if self.pool == "first":
            pooled = x[:, 0]
        elif mask is None:
            pooled = x.mean(dim=1)
        else:
            m = mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return torch.tanh(self.dense(pooled))


class MLMHead(nn.Module):
    """``transform`` (dense, GELU, LayerNorm eps 1e-12) then an untied ``decoder`` plus ``bias``."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(dim, dim)
        self.transform.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> logits (B, T, V)."""
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return self.decoder(h) + self.bias


class ITMHead(nn.Module):
    """Image-text matching logits: one linear layer, ``fc``; its row 1 ("match") is the retrieval
    score, of which the original's ``rank_output`` is a copy."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, x):
        return self.fc(x)
