"""One small autoencoder per task on frozen CLIP image features, and how it is fitted and calibrated.

An input whose features the task's autoencoder reconstructs well looks like that task's training data;
the per-task threshold on the reconstruction error is calibrated on held-out training features instead of
being typed by hand (the reference's 0.0655 stays available as ``threshold="fixed"``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DDASConfig


def _no_autocast(device: torch.device):
    # DDAS runs in fp32 even inside the caller's bf16 autocast region: errors near the threshold matter.
    return torch.autocast(device_type=device.type, enabled=False)


class TaskAutoencoder(nn.Module):
    """``Linear(D, h) -> sigmoid -> Linear(h, D)`` on L2-normalised features, scored by per-sample MSE.

    Inputs are cast to fp32 and L2-normalised inside, so any CLIP feature (any scale or dtype) can be
    passed; normalising makes the error scale the same for every task and backbone. The decoder has no
    output sigmoid (normalised features are signed), unlike the reference's pixel-range AlexNet features.
    """

    def __init__(self, dim: int, hidden: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.dim, self.hidden = int(dim), int(hidden)
        # With a generator, allocate uninitialised (meta) and draw from it: the global RNG stays untouched.
        device = "meta" if generator is not None else None
        self.encoder = nn.Linear(self.dim, self.hidden, device=device)
        self.decoder = nn.Linear(self.hidden, self.dim, device=device)
        if generator is not None:
            self.to_empty(device="cpu")
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """nn.Linear's default init range, drawn from ``generator`` so fitting never touches the global RNG."""
        for layer in (self.encoder, self.decoder):
            bound = 1.0 / math.sqrt(layer.in_features)
            for p in (layer.weight, layer.bias):
                p.copy_(torch.rand(p.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)

    @staticmethod
    def prepare(features: torch.Tensor) -> torch.Tensor:
        """fp32, L2-normalised rows: what the autoencoder sees and reconstructs."""
        return F.normalize(features.float(), dim=-1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of already ``prepare``d features (training uses this on cached inputs)."""
        return self.decoder(torch.sigmoid(self.encoder(x)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction error (mean squared error over the D features), shape [N]."""
        with _no_autocast(features.device):
            x = self.prepare(features)
            return (self.reconstruct(x) - x).pow(2).mean(dim=-1)


@dataclass
class AutoencoderStats:
    """What fitting one task's autoencoder measured (JSON-able through ``as_dict``)."""
    threshold: float
    threshold_kind: str
    holdout_quantile_error: float
    holdout_mean_error: float
    holdout_accept_fraction: float
    train_mean_error: float
    final_loss: float
    n_train: int
    n_holdout: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(n: int, cfg: DDASConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=generator)[: min(n, cfg.max_images)]
    n_hold = min(len(order) - 1, max(1, round(len(order) * cfg.holdout_fraction)))
    return order[n_hold:], order[:n_hold]


def fit_autoencoder(features: torch.Tensor, cfg: DDASConfig, seed: int = 0
                    ) -> tuple[TaskAutoencoder, AutoencoderStats]:
    """Fit one task's autoencoder on ``features`` [N, D] (frozen CLIP image features of its training images).

    At most ``cfg.max_images`` rows are used (a seeded random subset); ``cfg.holdout_fraction`` of them is
    held out. Adam (``cfg.lr``) runs ``cfg.iterations`` steps of ``cfg.batch_size`` samples (reshuffled every
    pass) on the rest. Threshold: ``calibrated`` = the ``cfg.quantile`` quantile of the held-out errors times
    ``cfg.margin``; ``fixed`` = ``cfg.fixed_threshold``. Deterministic for a given seed; global RNG untouched.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"DDAS needs a [N, D] feature matrix with N >= 2, got shape {tuple(features.shape)}")
    with torch.inference_mode(False), torch.enable_grad():  # callers often hold features from no-grad code
        return _fit(features, cfg, seed)


def _fit(features: torch.Tensor, cfg: DDASConfig, seed: int) -> tuple[TaskAutoencoder, AutoencoderStats]:
    device = features.device
    g = torch.Generator().manual_seed(int(seed))
    train_idx, hold_idx = _split(features.shape[0], cfg, g)
    ae = TaskAutoencoder(features.shape[1], cfg.hidden, generator=g).to(device)
    x_train = TaskAutoencoder.prepare(features[train_idx.to(device)]).detach().clone()
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr)
    batch = min(cfg.batch_size, x_train.shape[0])
    perm, pos, loss = torch.randperm(x_train.shape[0], generator=g), 0, torch.zeros(())
    with _no_autocast(device):
        for _ in range(cfg.iterations):
            if pos + batch > len(perm):
                perm, pos = torch.randperm(x_train.shape[0], generator=g), 0
            xb = x_train[perm[pos: pos + batch].to(device)]
            pos += batch
            loss = F.mse_loss(ae.reconstruct(xb), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        hold_err = ae(features[hold_idx.to(device)]).float().cpu()
        train_err = ae(features[train_idx.to(device)]).float().cpu()
    q = float(torch.quantile(hold_err, cfg.quantile))
    threshold = q * cfg.margin if cfg.threshold == "calibrated" else float(cfg.fixed_threshold)
    stats = AutoencoderStats(
        threshold=threshold, threshold_kind=cfg.threshold, holdout_quantile_error=q,
        holdout_mean_error=float(hold_err.mean()),
        holdout_accept_fraction=float((hold_err < threshold).float().mean()),
        train_mean_error=float(train_err.mean()), final_loss=float(loss.detach()),
        n_train=int(train_idx.numel()), n_holdout=int(hold_idx.numel()))
    return ae, stats
