"""The published selector (``ddas.kind=reference``): AlexNet conv5 features, one autoencoder per task, a
reference-domain slot meaning "plain CLIP", one decision per test batch against a fixed threshold.

moecl's own DDAS (CLIP features, calibrated thresholds, per-sample decisions) stays the default; this module
exists so a reproduction of the paper's table is like for like. Facts (read from the authors' code):

- features: torchvision AlexNet ``features`` without its last ReLU and max-pool (conv5 output), sigmoid,
  flattened: 256 x 13 x 13 = 43,264 values at 224 px. The images are the CLIP-normalised test images.
- autoencoder: ``Linear(D, 100) -> ReLU -> Linear(100, D) -> Sigmoid``, MSE; Adam with weight decay 1e-4 and
  the learning rate divided by 10 every 10 epochs; batch 64 of the task's train images with train augmentation.
  The published loop runs ``iterations + 1`` steps; so does :func:`fit_reference_autoencoder`.
- decision: the batch's mean error under every slot; the smallest wins if it is ``<=`` the threshold (ties
  accepted) and the winner is not the reference-domain slot; otherwise plain CLIP. Ties between slots go to
  the earlier slot (reference slot first, then tasks in order), as in the published loop.
- the published code also lets untrained (randomly initialised) future slots vote. Slots stored untrained
  (an imported autochooser file holds them) vote only with ``ddas.future_slots_vote=true``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, DDASConfig
from ..errors import CheckpointError
from ..routes import ZERO_SHOT

REFERENCE_SLOT = -1  # slot task id of the reference-domain autoencoder: selecting it means plain CLIP
STATE_KIND = "reference"
STATE_VERSION = 1
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's file name for IMAGENET1K_V1
ALEXNET_URL = "https://download.pytorch.org/models/" + ALEXNET_FILE
WEIGHT_DECAY = 1e-4  # published autoencoder recipe
LR_DECAY_EPOCHS = 10


def default_alexnet_path() -> Path:
    """Where torchvision itself would cache the ImageNet AlexNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


class AlexNetFeatures(nn.Module):
    """conv1..conv5 of torchvision's AlexNet (up to conv5, before its ReLU and pooling), sigmoid, flattened."""

    def __init__(self, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        super().__init__()
        from torchvision.models import alexnet
        net = alexnet(weights=None)
        if state_dict is not None:
            net.load_state_dict(state_dict)
        self.body = net.features[:-2]
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "AlexNetFeatures":  # a frozen feature extractor: always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, enabled=False):
            return torch.sigmoid(self.body(images.float()).flatten(1))

    def dim(self, image_size: int) -> int:
        """Feature length at ``image_size`` px (43,264 at 224)."""
        device = next(self.parameters()).device
        return int(self(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1])


def load_alexnet_features(path: Optional[str | Path]) -> AlexNetFeatures:
    """AlexNet features with ImageNet weights from a local file (``torch.load(weights_only=True)``)."""
    file = Path(path).expanduser() if path else default_alexnet_path()
    if not file.is_file():
        raise ConfigError(f"ddas.kind=reference needs torchvision's ImageNet AlexNet weights at {file} (not found); "
                          f"download {ALEXNET_URL} on a machine with internet and copy it there, or set "
                          "ddas.alexnet_weights=/path/to/" + ALEXNET_FILE)
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same message
        raise CheckpointError(f"{file} is not a readable torch weights file ({type(e).__name__}: {e}); "
                              f"expected torchvision's {ALEXNET_FILE}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not an AlexNet state dict")
    try:
        return AlexNetFeatures(state)
    except RuntimeError as e:
        raise CheckpointError(f"{file} is not a torchvision AlexNet state dict: {str(e).splitlines()[0]}") from None


class ReferenceAutoencoder(nn.Module):
    """``Linear(D, h) -> ReLU -> Linear(h, D) -> Sigmoid`` (the published key layout: encoder.0, decoder.0)."""

    def __init__(self, dim: int, hidden: int = 100, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.dim, self.hidden = int(dim), int(hidden)
        device = "meta" if generator is not None else None
        self.encoder = nn.Sequential(nn.Linear(self.dim, self.hidden, device=device), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(self.hidden, self.dim, device=device), nn.Sigmoid())
        if generator is not None:  # nn.Linear's default range, drawn without touching the global RNG
            self.to_empty(device="cpu")
            with torch.no_grad():
                for layer in (self.encoder[0], self.decoder[0]):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    for p in (layer.weight, layer.bias):
                        p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared reconstruction error [N] (their batch mean is the published batch MSE)."""
        return (self(x) - x).pow(2).mean(dim=1)


def fit_reference_autoencoder(features: Callable[[torch.Tensor], torch.Tensor], batches: Iterator[torch.Tensor],
                              dim: int, cfg: DDASConfig, iterations: int, batches_per_epoch: int,
                              seed: int = 0, device: Optional[torch.device] = None
                              ) -> tuple[ReferenceAutoencoder, dict[str, Any]]:
    """Fit one slot the published way on a stream of (train-augmented) image batches.

    Adam(lr=cfg.lr, weight_decay=1e-4); lr x 0.1 every 10 epochs of ``batches_per_epoch`` steps; MSE on the
    sigmoid AlexNet features; ``iterations + 1`` steps as in the published loop. Global RNG untouched."""
    g = torch.Generator().manual_seed(int(seed))
    ae = ReferenceAutoencoder(dim, cfg.hidden, generator=g).to(device or "cpu")
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.lr, weight_decay=WEIGHT_DECAY)
    per_epoch = max(1, int(batches_per_epoch))
    loss = torch.zeros(())
    with torch.inference_mode(False), torch.enable_grad():
        for it in range(int(iterations) + 1):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.1 ** ((it // per_epoch) // LR_DECAY_EPOCHS)
            x = features(next(batches).to(device or "cpu")).detach()
            with torch.autocast(device_type=x.device.type, enabled=False):
                loss = F.mse_loss(ae(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    ae.eval().requires_grad_(False)
    return ae, {"threshold": float(cfg.fixed_threshold), "threshold_kind": "fixed", "final_loss": float(loss.detach()),
                "iterations": int(iterations) + 1, "feature_dim": int(dim)}


class ReferenceSelector(nn.Module):
    """Slots = (task id or -1 for the reference domain, autoencoder, threshold, trained?); ``select`` reads images.

    The AlexNet feature extractor is a submodule but not part of the saved state (its weights come from the
    local torchvision file), so a checkpoint holds only the autoencoders, thresholds and slot table."""

    reads_images = True  # the evaluator passes the CLIP-preprocessed images, not CLIP features

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.autoencoders = nn.ModuleList()
        self.register_buffer("thresholds", torch.zeros(0, dtype=torch.float32))
        self.register_buffer("slot_tasks", torch.zeros(0, dtype=torch.long))
        self.register_buffer("slot_trained", torch.zeros(0, dtype=torch.bool))
        self.future_slots_vote = False

    # -- slots ---------------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        """Trained task slots (the reference-domain slot not counted)."""
        return int(((self.slot_tasks >= 0) & self.slot_trained).sum())

    @property
    def has_reference_slot(self) -> bool:
        return bool((self.slot_tasks == REFERENCE_SLOT).any())

    def add_slot(self, task: int, autoencoder: ReferenceAutoencoder, threshold: float, trained: bool = True) -> None:
        if len(self.autoencoders) and autoencoder.dim != self.autoencoders[0].dim:
            raise ValueError(f"autoencoder dim {autoencoder.dim} differs from the first slot's "
                             f"{self.autoencoders[0].dim}: every slot must read the same AlexNet features")
        dev = self.thresholds.device
        self.autoencoders.append(autoencoder.to(dev).float().eval().requires_grad_(False))
        self.thresholds = torch.cat([self.thresholds, torch.tensor([float(threshold)], device=dev)])
        self.slot_tasks = torch.cat([self.slot_tasks, torch.tensor([int(task)], device=dev)])
        self.slot_trained = torch.cat([self.slot_trained, torch.tensor([bool(trained)], device=dev)])

    def add_task(self, autoencoder: ReferenceAutoencoder, threshold: float) -> int:
        """The next task's slot (task id = trained task slots so far); returns the id."""
        task = self.num_tasks
        self.add_slot(task, autoencoder, threshold)
        return task

    def with_threshold(self, threshold: float) -> "ReferenceSelector":
        """The same slots with one hand-set threshold (``moecl eval ddas.fixed_threshold=...``)."""
        sel = ReferenceSelector(self.features)
        for task, ae, trained in zip(self.slot_tasks.tolist(), self.autoencoders, self.slot_trained.tolist()):
            sel.add_slot(task, ae, threshold, trained)
        sel.future_slots_vote = self.future_slots_vote
        return sel.to(self.thresholds.device)

    # -- selection -----------------------------------------------------------------------------------------
    def _voting(self) -> torch.Tensor:
        return self.slot_trained | torch.full_like(self.slot_trained, bool(self.future_slots_vote))

    @torch.no_grad()
    def slot_errors(self, images: torch.Tensor) -> torch.Tensor:
        """Per-sample error under every slot, [N, S] fp32."""
        x = self.features(images.to(self.thresholds.device))
        if not len(self.autoencoders):
            return torch.zeros(x.shape[0], 0, device=x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.stack([ae.error(x) for ae in self.autoencoders], dim=1).float()

    @torch.no_grad()
    def errors(self, images: torch.Tensor) -> torch.Tensor:
        """Per-sample error under every trained task slot, [N, T] (what ``moecl predict`` shows)."""
        err = self.slot_errors(images)
        keep = (self.slot_tasks >= 0) & self.slot_trained
        order = torch.argsort(self.slot_tasks[keep])
        return err[:, keep][:, order]

    @torch.no_grad()
    def select(self, images: torch.Tensor, decision: Literal["sample", "batch"] = "batch") -> torch.Tensor:
        """Task id per image (LongTensor [N]); -1 = plain CLIP. ``batch``: the published per-batch decision."""
        if decision not in ("sample", "batch"):
            raise ValueError(f"decision must be 'sample' or 'batch', got {decision!r}")
        n = images.shape[0]
        route = torch.full((n,), ZERO_SHOT, dtype=torch.long, device=self.thresholds.device)
        voting = self._voting()
        if n == 0 or not bool(voting.any()):
            return route
        err = self.slot_errors(images)
        err = torch.where(voting.unsqueeze(0), err, torch.full_like(err, float("inf")))
        if decision == "batch":
            mean = err.mean(dim=0)
            best = int(mean.argmin())  # first minimum: the earlier slot wins a tie
            if bool(mean[best] <= self.thresholds[best]):
                route.fill_(int(self.slot_tasks[best]))
            return route  # the reference slot's id is -1 = plain CLIP
        best_err, best = err.min(dim=1)
        return torch.where(best_err <= self.thresholds[best], self.slot_tasks[best], route)

    # -- state ---------------------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Autoencoders + slot table (safetensors-ready) and JSON meta; AlexNet weights are not included."""
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()
                   if not k.startswith("features.")}
        meta = {"kind": STATE_KIND, "version": STATE_VERSION, "num_tasks": self.num_tasks,
                "slots": [int(t) for t in self.slot_tasks.tolist()],
                "trained": [bool(t) for t in self.slot_trained.tolist()],
                "dims": [ae.dim for ae in self.autoencoders], "hidden": [ae.hidden for ae in self.autoencoders],
                "thresholds": [float(t) for t in self.thresholds.cpu()]}
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                   features: Optional[nn.Module] = None) -> "ReferenceSelector":
        """Rebuild from ``to_state``'s output (strict); ``features``: the AlexNet extractor to read images with."""
        if meta.get("kind") != STATE_KIND or meta.get("version") != STATE_VERSION:
            raise ValueError(f"not a reference DDAS state (kind {meta.get('kind')!r}, version {meta.get('version')!r})")
        if features is None:
            raise ValueError("a reference DDAS state needs the AlexNet features (load_alexnet_features)")
        sel = cls(features)
        for task, trained, dim, hidden, thr in zip(meta["slots"], meta["trained"], meta["dims"], meta["hidden"],
                                                   meta["thresholds"]):
            sel.add_slot(task, ReferenceAutoencoder(dim, hidden, generator=torch.Generator()), thr, trained)
        missing, unexpected = sel.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.startswith("features.")]
        if missing or unexpected:
            raise ValueError(f"reference DDAS state does not match its meta: missing {missing}, "
                             f"unexpected {unexpected}")
        return sel


def load_selector(tensors: dict[str, torch.Tensor], meta: dict[str, Any], cfg: DDASConfig):
    """The selector a checkpoint's ``ddas.safetensors`` + ``ddas.json`` hold (moecl's or the reference one)."""
    if meta.get("kind") == STATE_KIND:
        sel = ReferenceSelector.from_state(tensors, meta, load_alexnet_features(cfg.alexnet_weights))
        sel.future_slots_vote = bool(cfg.future_slots_vote)
        return sel
    from .selector import DDASSelector
    return DDASSelector.from_state(tensors, meta)
