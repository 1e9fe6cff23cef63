"""The frozen backbone's work on the test sets, done once per run instead of once per row.

Route -1 is the untouched CLIP for every method but full fine-tuning, so its image features of a test set
(what DDAS reads and what zero-shot routing scores) and its zero-shot class heads never change while a run
trains: the evaluator computes them on the first row and reads them afterwards. Entries live in memory and,
with ``eval.frozen_cache=disk``, also under ``RUN/cache/frozen/`` so that a resumed run or ``moecl eval`` reuses
them. An entry's name is a hash of everything that decides its numbers (backbone identity, task, split, each
shard's sha256, the test transform, batch size, this rank's share of the data): another backbone, other data or
another cluster shape gives another name and is recomputed. Files carry a checksum of their tensors; a file that
does not match is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..runstate.atomic import atomic_write

log = logging.getLogger("moecl")

FORMAT = 1


@dataclass
class SetFeatures:
    """One test set's plain features on this rank, batch by batch as the eval stream yields them."""
    keys: list[list[str]]  # sample keys per batch ("" for padding rows)
    targets: list[torch.Tensor]  # [B] long per batch (-1 for padding rows)
    plain: list[torch.Tensor]  # [B, D] float32 per batch, L2-normalised
    read: dict[str, int]  # samples per shard this rank read when the entry was made
    image_shape: tuple[int, ...] = ()  # one preprocessed image (placeholder for images not decoded)

    @property
    def images(self) -> int:
        return sum(len(k) for k in self.keys)


def _digest(t: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(t):
        h.update(name.encode())
        h.update(t[name].contiguous().view(torch.uint8).numpy().tobytes() if t[name].numel() else b"")
    return h.hexdigest()


def shard_digests(task: Any, split: str) -> list[str]:
    """What identifies each shard's content: the file's own sha256 (hashed once per process and file version;
    task.json's claim alone would let a replaced or damaged shard reuse features of the old one), with
    task.json's sha256 beside it; remote shards (URL template) by URL and task.json's sha256 only."""
    from ..runstate.identity import file_sha256
    out = []
    for url in task.urls(split):
        name = os.path.basename(url)
        claimed = task.sha256.get(name, "")
        if not task.remote and Path(url).is_file():
            out.append(f"{name}:{file_sha256(url)}:{claimed}")
        else:
            out.append(f"url:{url}:{claimed}")
    return out


class FrozenCache:
    """Plain test-set features and zero-shot heads of one frozen backbone (see the module docstring)."""

    def __init__(self, identity: dict[str, Any], folder: Optional[Path] = None):
        self.identity = dict(identity)
        self.folder = Path(folder) if folder is not None else None
        self.sets: dict[str, SetFeatures] = {}
        self.heads: dict[str, torch.Tensor] = {}
        self.stats = {"hits": 0, "disk_hits": 0, "misses": 0}

    def key(self, task: Any, split: str, settings: dict[str, Any]) -> str:
        doc = {"format": FORMAT, "backbone": self.identity, "task": task.name, "split": split,
               "shards": shard_digests(task, split), **settings}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Optional[Path]:
        return None if self.folder is None else self.folder / f"{key[:40]}.safetensors"

    def get(self, key: str) -> Optional[SetFeatures]:
        if key in self.sets:
            self.stats["hits"] += 1
            return self.sets[key]
        path = self._path(key)
        if path is not None and path.is_file():
            entry = self._load(path, key)
            if entry is not None:
                self.sets[key] = entry
                self.stats["disk_hits"] += 1
                return entry
        self.stats["misses"] += 1
        return None

    def put(self, key: str, entry: SetFeatures) -> None:
        self.sets[key] = entry
        path = self._path(key)
        if path is None:
            return
        try:
            self._save(path, key, entry)
        except OSError as e:  # a read-only or full run folder: keep it in memory, say why once
            log.warning("frozen-feature cache not written to %s (%s); kept in memory for this process", path.parent, e)
            self.folder = None

    # ---- files --------------------------------------------------------------------------------------
    @staticmethod
    def _save(path: Path, key: str, entry: SetFeatures) -> None:
        from safetensors.torch import save_file
        sizes = torch.tensor([len(k) for k in entry.keys], dtype=torch.long)
        dim = entry.plain[0].shape[1] if entry.plain else 0
        tensors = {"plain": torch.cat(entry.plain) if entry.plain else torch.zeros(0, dim),
                   "targets": torch.cat(entry.targets) if entry.targets else torch.zeros(0, dtype=torch.long),
                   "sizes": sizes}
        meta = {"key": key, "keys": json.dumps([k for ks in entry.keys for k in ks]), "read": json.dumps(entry.read),
                "image_shape": json.dumps(list(entry.image_shape)), "sha256": _digest(tensors)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @staticmethod
    def _load(path: Path, key: str) -> Optional[SetFeatures]:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {n: f.get_tensor(n) for n in ("plain", "targets", "sizes")}
            if meta.get("key") != key or meta.get("sha256") != _digest(tensors):
                raise ValueError("its checksum or name does not match its contents")
            flat = json.loads(meta["keys"])
            sizes = [int(s) for s in tensors["sizes"].tolist()]
            if sum(sizes) != len(flat) or len(flat) != tensors["plain"].shape[0] or tensors["plain"].dtype != torch.float32:
                raise ValueError("its sizes disagree")
            read = {str(k): int(v) for k, v in json.loads(meta.get("read", "{}")).items()}
            shape = tuple(int(s) for s in json.loads(meta.get("image_shape", "[]")))
            if sizes and (not shape or len(shape) > 4 or any(s < 1 or s > 1 << 14 for s in shape)):
                raise ValueError(f"its image shape {shape} is not one")
        except Exception as e:  # noqa: BLE001 - any damage means: recompute
            log.warning("frozen-feature cache file %s is unusable (%s): recomputing it", path, e)
            return None
        keys, starts = [], [0]
        for s in sizes:
            keys.append(flat[starts[-1]:starts[-1] + s])
            starts.append(starts[-1] + s)
        return SetFeatures(keys, list(tensors["targets"].split(sizes)), list(tensors["plain"].split(sizes)), read,
                           shape)


def frozen_cache_for(cfg: Any, identity: dict[str, Any], run_dir: Optional[Path], method: Any) -> Optional[FrozenCache]:
    """The cache a run's evaluation uses, or None where the frozen features are not fixed: full fine-tuning
    (route -1 trains), random test crops (``eval.transform=train``), or ``eval.frozen_cache=none``."""
    if cfg.eval.frozen_cache == "none" or not method.zero_shot_is_frozen or cfg.eval.transform != "eval":
        return None
    folder = Path(run_dir) / "cache" / "frozen" if cfg.eval.frozen_cache == "disk" and run_dir is not None else None
    return FrozenCache(identity, folder)
