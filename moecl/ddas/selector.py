"""Task-agnostic routing: pick, per input, the task whose autoencoder reconstructs it, or plain CLIP.

Holds only tensors (autoencoder weights + per-task thresholds) so it saves with safetensors; the shapes
needed to rebuild it travel in a small JSON-able meta dict (``to_state`` / ``from_state``).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from ..routes import ZERO_SHOT
from .autoencoder import TaskAutoencoder
from .gaussian import TaskGaussian

STATE_VERSION = 1


class DDASSelector(nn.Module):
    """Per-task autoencoders (or gaussians) and thresholds; ``select`` returns a task id per sample, -1 = zero-shot.

    ``feature_block``: None reads the frozen CLIP's image embedding (today's DDAS); an int ``b`` reads the CLS
    token entering image block ``b``, the first adapted one (``ddas.feature=block``: single-pass inference)."""

    def __init__(self, feature_block: Optional[int] = None) -> None:
        super().__init__()
        self.feature_block = feature_block
        self.autoencoders = nn.ModuleList()
        self.register_buffer("thresholds", torch.zeros(0, dtype=torch.float32))

    @property
    def num_tasks(self) -> int:
        return len(self.autoencoders)

    def add_task(self, autoencoder: Union[TaskAutoencoder, TaskGaussian], threshold: float) -> int:
        """Append the next task's autoencoder (frozen) and threshold; returns its task id."""
        if self.num_tasks and autoencoder.dim != self.autoencoders[0].dim:
            raise ValueError(f"autoencoder dim {autoencoder.dim} differs from the first task's "
                             f"{self.autoencoders[0].dim}: every task must use the same image feature")
        if self.num_tasks and type(autoencoder) is not type(self.autoencoders[0]):
            raise ValueError(f"a {type(autoencoder).__name__} after {type(self.autoencoders[0]).__name__}s: errors of "
                             "different scorers are not comparable, every task must use the same ddas.scorer")
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
        return self.select_from_errors(self.errors(features), decision)

    @torch.no_grad()
    def select_from_errors(self, err: torch.Tensor, decision: Literal["sample", "batch"] = "sample") -> torch.Tensor:
        """``select`` on errors already computed (``errors``' [N, T] output)."""
        if decision not in ("sample", "batch"):
            raise ValueError(f"decision must be 'sample' or 'batch', got {decision!r}")
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
        if self.feature_block is not None:  # (absent: today's selector, its state unchanged)
            meta["feature_block"] = int(self.feature_block)
        if any(isinstance(ae, TaskGaussian) for ae in self.autoencoders):
            meta["scorers"] = ["gaussian" if isinstance(ae, TaskGaussian) else "autoencoder" for ae in self.autoencoders]
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "DDASSelector":
        """Rebuild from ``to_state``'s output (strict: a missing or extra tensor is an error)."""
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"DDAS state version {meta.get('version')!r} is not {STATE_VERSION}")
        block = meta.get("feature_block")
        if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
            raise ValueError(f"DDAS meta feature_block={block!r} is not a block index >= 1")
        sel = cls(block)
        scorers = meta.get("scorers") or ["autoencoder"] * len(meta["dims"])
        if len(scorers) != len(meta["dims"]) or not set(scorers) <= {"autoencoder", "gaussian"}:
            raise ValueError(f"DDAS meta scorers={scorers!r}: one of autoencoder / gaussian per task expected")
        for dim, hidden, thr, kind in zip(meta["dims"], meta["hidden"], meta["thresholds"], scorers):
            scorer = (TaskGaussian(dim) if kind == "gaussian"
                      else TaskAutoencoder(dim, hidden, generator=torch.Generator()))  # weights loaded below
            sel.add_task(scorer, thr)
        if sel.num_tasks != meta["num_tasks"]:
            raise ValueError("DDAS meta lists inconsistent task counts")
        sel.load_state_dict(tensors, strict=True)
        return sel
