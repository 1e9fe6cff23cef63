"""Bottleneck-adapter experts and DeepSpeed's expert container, run as one grouped matmul."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from torch import nn


class AdapterExpert(nn.Module):
    """``Linear(d, r) -> ReLU -> Dropout -> Linear(r, d) -> * scale``.

    Zero-output init (METHOD.md): down weight kaiming-uniform(a=sqrt(5)), down bias, up weight and up bias
    zero, so the adapted model equals the frozen CLIP bit for bit before training. The input's last
    dimension may hold several tokens (``L * d``, per-sample routing); it is viewed as ``[..., d]``.
    """

    def __init__(self, dim: int, width: int, dropout: float = 0.1, scale: float = 0.1):
        super().__init__()
        self.dim, self.width, self.scale = dim, width, scale
        self.down = nn.Linear(dim, width)
        self.up = nn.Linear(width, dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = self.dropout(F.relu(self.down(x.reshape(-1, self.dim))))
        return (self.up(h) * self.scale).reshape(shape)


class GroupedExperts(Experts):
    """DeepSpeed's ``Experts`` (same parameters, names and expert-parallel tags, so the engine's param
    groups and checkpoints know them as experts), but the forward runs all local experts as one batched
    matmul instead of a Python loop of small ones."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # inputs: [ep_size, num_local_experts, capacity, M] with M = tokens_per_row * d
        experts = self.deepspeed_experts
        first = experts[0]
        d, scale = first.dim, first.scale
        g, e, c, m = inputs.shape
        x = inputs.transpose(0, 1).reshape(e, g * c * (m // d), d)
        w_down = torch.stack([ex.down.weight for ex in experts]).transpose(1, 2)  # [e, d, r]
        b_down = torch.stack([ex.down.bias for ex in experts]).unsqueeze(1)  # [e, 1, r]
        w_up = torch.stack([ex.up.weight for ex in experts]).transpose(1, 2)  # [e, r, d]
        b_up = torch.stack([ex.up.bias for ex in experts]).unsqueeze(1)  # [e, 1, d]
        h = first.dropout(F.relu(torch.bmm(x, w_down.to(x.dtype)) + b_down.to(x.dtype)))
        y = (torch.bmm(h, w_up.to(h.dtype)) + b_up.to(h.dtype)) * scale
        if torch.is_grad_enabled() and not y.requires_grad:
            # Every local expert frozen and the input constant: without this, autograd would skip the
            # all-to-all's backward on this rank but not on ranks with trainable experts (a collective mismatch).
            y.requires_grad_()
        return y.reshape(e, g, c, m).transpose(0, 1)
