"""Task-agnostic routing: pick, per input, the task whose autoencoder reconstructs it, or plain CLIP.

Holds only tensors (autoencoder weights + per-task thresholds) so it saves with safetensors; the shapes
needed to rebuild it travel in a small JSON-able meta dict (``to_state`` / ``from_state``).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..routes import ZERO_SHOT
from .autoencoder import TaskAutoencoder

STATE_VERSION = 1


class DDASSelector(nn.Module):
    """Per-task autoencoders and thresholds; ``select`` returns a task id per sample, -1 = zero-shot."""

    def __init__(self) -> None:
        super().__init__()
        self.autoencoders = nn.ModuleList()
        self.register_buffer("thresholds", torch.zeros(0, dtype=torch.float32))

    @property
    def num_tasks(self) -> int:
        return len(self.autoencoders)

    def add_task(self, autoencoder: TaskAutoencoder, threshold: float) -> int:
        """Append the next task's autoencoder (frozen) and threshold; returns its task id."""
        if self.num_tasks and autoencoder.dim != self.autoencoders[0].dim:
            raise ValueError(f"autoencoder dim {autoencoder.dim} differs from the first task's "
                             f"{self.autoencoders[0].dim}: every task must use the same image feature")
        device = self.thresholds.device
        self.autoencoders.append(autoencoder.to(device).float().eval().requires_grad_(False))
        t = torch.tensor([float(threshold)], dtype=torch.float32, device=device)
        self.thresholds = torch.cat([self.thresholds, t])
        return self.num_tasks - 1

    @torch.no_grad()
    def errors(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction error of every sample under every trained task's autoencoder, [N, T] fp32."""
        x = features.to(self.thresholds.device)
        if not self.num_tasks:
            return torch.zeros(x.shape[0], 0, dtype=torch.float32, device=x.device)
        return torch.stack([ae(x) for ae in self.autoencoders], dim=1).float()

    @torch.no_grad()
    def select(self, features: torch.Tensor, decision: Literal["sample", "batch"] = "sample") -> torch.Tensor:
        """Task id per sample (LongTensor [N]); -1 sends the sample through plain CLIP.

        ``sample`` (default): the task with the smallest error, if that error is below that task's threshold;
        a sample's route does not depend on the rest of its batch. ``batch`` (the reference): the mean error
        over the batch per task decides once for the whole batch. Only trained tasks vote; with none, all -1.
        """
        if decision not in ("sample", "batch"):
            raise ValueError(f"decision must be 'sample' or 'batch', got {decision!r}")
        err = self.errors(features)
        n = err.shape[0]
        route = torch.full((n,), ZERO_SHOT, dtype=torch.long, device=err.device)
        if not self.num_tasks or n == 0:
            return route
        if decision == "batch":
            mean = err.mean(dim=0)
            best = int(mean.argmin())
            return route.fill_(best) if bool(mean[best] < self.thresholds[best]) else route
        best_err, best = err.min(dim=1)
        return torch.where(best_err < self.thresholds[best], best, route)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Flat tensors (contiguous CPU copies, safetensors-ready) and the meta needed to rebuild."""
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        meta = {"version": STATE_VERSION, "num_tasks": self.num_tasks,
                "dims": [ae.dim for ae in self.autoencoders], "hidden": [ae.hidden for ae in self.autoencoders],
                "thresholds": [float(t) for t in self.thresholds.cpu()]}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "DDASSelector":
        """Rebuild from ``to_state``'s output (strict: a missing or extra tensor is an error)."""
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"DDAS state version {meta.get('version')!r} is not {STATE_VERSION}")
        sel = cls()
        for dim, hidden, thr in zip(meta["dims"], meta["hidden"], meta["thresholds"]):
            sel.add_task(TaskAutoencoder(dim, hidden, generator=torch.Generator()), thr)  # weights loaded below
        if sel.num_tasks != meta["num_tasks"]:
            raise ValueError("DDAS meta lists inconsistent task counts")
        sel.load_state_dict(tensors, strict=True)
        return sel
