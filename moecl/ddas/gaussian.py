"""A per-task diagonal Gaussian as the DDAS scorer (``ddas.scorer=gaussian``): the task's per-dimension mean and
std of the (L2-normalised) feature, an input scored by its mean squared z-score. No training loop: fitting is
two statistics, calibrated like the autoencoder (held-out quantile x margin), so it costs nothing after a task.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import DDASConfig
from .autoencoder import AutoencoderStats, TaskAutoencoder, _split

STD_FLOOR = 1e-6  # a dimension constant over the task's images must not divide by zero


class TaskGaussian(nn.Module):
    """Per-dimension mean and std of one task's features; ``forward`` gives the mean squared z-score per sample."""

    hidden = 0  # (the autoencoder's bottleneck; kept so both scorers describe themselves alike)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("std", torch.ones(self.dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = TaskAutoencoder.prepare(features)
            return ((x - self.mean) / self.std).pow(2).mean(dim=-1)


def fit_gaussian(features: torch.Tensor, cfg: DDASConfig, seed: int = 0) -> tuple[TaskGaussian, AutoencoderStats]:
    """Mean and std of ``features`` [N, D] on the training part of the autoencoder's split (same seed, same
    ``max_images`` / ``holdout_fraction``), threshold from the held-out part as ``fit_autoencoder`` sets it."""
    if features.ndim != 2 or features.shape[0] < 3:
        raise ValueError(f"the gaussian DDAS scorer needs a [N, D] feature matrix with N >= 3, got shape "
                         f"{tuple(features.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    train_idx, hold_idx = _split(features.shape[0], cfg, g)
    device = features.device
    x = TaskAutoencoder.prepare(features[train_idx.to(device)])
    model = TaskGaussian(features.shape[1]).to(device)
    with torch.no_grad():
        model.mean.copy_(x.mean(dim=0))
        model.std.copy_(x.std(dim=0).clamp(min=STD_FLOOR))
        hold = model(features[hold_idx.to(device)]).float().cpu()
        train = model(features[train_idx.to(device)]).float().cpu()
    model.eval().requires_grad_(False)
    q = float(torch.quantile(hold, cfg.quantile))
    threshold = q * cfg.margin if cfg.threshold == "calibrated" else float(cfg.fixed_threshold)
    stats = AutoencoderStats(
        threshold=threshold, threshold_kind=cfg.threshold, holdout_quantile_error=q,
        holdout_mean_error=float(hold.mean()), holdout_accept_fraction=float((hold < threshold).float().mean()),
        train_mean_error=float(train.mean()), final_loss=float(train.mean()),
        n_train=int(train_idx.numel()), n_holdout=int(hold_idx.numel()))
    return model, stats
