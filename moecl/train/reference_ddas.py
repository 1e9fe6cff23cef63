"""Fitting the published selector's slots inside the task loop (``ddas.kind=reference``).

Every rank fits the same slot from the same single-rank stream and seed, so the selectors agree without a
broadcast (the autoencoder is small; the AlexNet forward is the cost)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from ..data import read_task, train_batches
from ..data.task import TaskInfo
from ..ddas.reference import REFERENCE_SLOT, fit_reference_autoencoder
from ..errors import DataError
from ..seeding import stable_seed


def reference_task(root: str, name_or_path: str) -> TaskInfo:
    """``ddas.reference_task``: a task folder path, or a task folder name under ``data.root``."""
    for candidate in (Path(name_or_path), Path(root) / name_or_path):
        if (candidate / "task.json").is_file():
            return read_task(candidate)
    raise DataError(f"ddas.reference_task={name_or_path!r}: neither {name_or_path}/task.json nor "
                    f"{Path(root) / name_or_path}/task.json exists; build it with `python -m data_tools folder "
                    f"--src IMAGES --out {root} --task {Path(name_or_path).name}` (the paper uses TinyImageNet)")


def fit_reference_slot(trainer, t: Optional[int], task: Optional[TaskInfo] = None) -> dict[str, Any]:
    """Fit task ``t``'s slot on its train images (train augmentation), or, with ``t=None``, the
    reference-domain slot on ``ddas.reference_task``; adds it to ``trainer.selector``; returns its stats."""
    cfg = trainer.cfg
    if t is None:
        task = reference_task(cfg.data.root, cfg.ddas.reference_task)
        iterations = cfg.ddas.reference_iterations
    else:
        iterations = cfg.ddas.iterations
    batch = cfg.ddas.batch_size
    stream = train_batches(task, batch_size=batch, rank=0, world_size=1, workers=cfg.data.workers,
                           seed=stable_seed(cfg.train.seed, "ddas-reference", t), preprocess=trainer.train_tf,
                           shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
                           max_bad_fraction=cfg.data.max_bad_fraction)
    images = (x for x, _ in stream)
    selector = trainer.selector
    first = next(images)  # the feature length (43,264 at 224 px) read off the first batch
    dim = int(selector.features(first.to(trainer.device)).shape[1])
    images = _chain(first, images)
    per_epoch = math.ceil(task.count("train") / batch)
    ae, info = fit_reference_autoencoder(selector.features, images, dim, cfg.ddas, iterations, per_epoch,
                                         seed=stable_seed(cfg.train.seed, "ddas", t), device=trainer.device)
    if t is None:
        selector.add_slot(REFERENCE_SLOT, ae, cfg.ddas.fixed_threshold)
    else:
        selector.add_task(ae, cfg.ddas.fixed_threshold)
    del stream
    return dict(info, slot="reference" if t is None else int(t), task=task.name, n_train=task.count("train"))


def _chain(first, rest):
    yield first
    yield from rest
