"""Pieces every converter shares: image discovery, seeded splits, few-shot sampling, writing a whole task."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moecl.data.untrusted import NAME_RULE, plain_name_problem
from moecl.errors import DataError

from .taskfile import write_task
from .writer import Item, SplitResult, WriteOptions, parse_bytes, write_split

log = logging.getLogger("data_tools")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmarks"


def benchmark(name: str) -> dict[str, Any]:
    """A benchmark definition shipped as data (``data_tools/benchmarks/<name>.json``)."""
    return json.loads((BENCHMARK_DIR / f"{name}.json").read_text(encoding="utf-8"))


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted for a reproducible order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def random_split(n: int, fraction: float = 0.8, seed: int = 42) -> tuple[list[int], list[int]]:
    """Indices of a seeded train/test split, identical to ``torch.utils.data.random_split(ds,
    [int(fraction * n), n - int(fraction * n)], generator=torch.Generator().manual_seed(seed))``."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(fraction * n)
    return perm[:cut], perm[cut:]


def few_shot(labels: list[int], shots: int, seed: int) -> list[int]:
    """Indices of ``shots`` samples per class (all of a class that has fewer), seeded, in original order."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    chosen: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        if len(idx) < shots:
            log.warning("class %d has only %d images for %d shots: taking all", y, len(idx), shots)
            chosen.extend(idx)
        else:
            chosen.extend(int(i) for i in rng.choice(idx, size=shots, replace=False))
    return sorted(chosen)


def add_write_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("writing shards")
    g.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    g.add_argument("--shard-bytes", default=None, help="also cap shard size in bytes, e.g. 500MB")
    g.add_argument("--workers", type=int, default=0, help="processes writing shards in parallel (default 0)")
    g.add_argument("--image-format", choices=("keep", "png", "jpg"), default="keep",
                   help="keep PNG/JPEG bytes as they are (others become PNG), or re-encode all")
    g.add_argument("--resize", type=int, default=None,
                   help="shrink images whose shorter side exceeds this many pixels (saves space)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def write_options(args: argparse.Namespace) -> WriteOptions:
    try:
        shard_bytes = parse_bytes(args.shard_bytes)
    except ValueError as e:
        raise DataError(f"--shard-bytes: {e}") from None
    if args.shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {args.shard_size}")
    return WriteOptions(shard_size=args.shard_size, shard_bytes=shard_bytes, workers=max(0, args.workers),
                        progress=not args.no_progress, image_format=args.image_format, resize=args.resize)


def build_task(out_root: str | Path, name: str, *, classnames: list[str], train_template: str,
               eval_templates: list[str], splits: dict[str, list[Item]], opts: WriteOptions,
               class_ids: Optional[list[int]] = None, cil: Optional[dict[str, Any]] = None,
               source: Optional[dict[str, Any]] = None) -> Path:
    """Write every split of one task and its ``task.json``; returns the task folder."""
    for what, value in [("task name (--task)", name), *(("split name", sp) for sp in splits)]:
        problem = plain_name_problem(value)
        if problem:  # the loaders refuse anything else in task.json and sequence files
            raise DataError(f"{what} {problem}; choose one that is {NAME_RULE}")
    task_dir = Path(out_root) / name
    results: dict[str, SplitResult] = {}
    for split, items in splits.items():
        results[split] = write_split(task_dir, split, items, classnames, opts, desc=f"{name}/{split}")
        if results[split].bad:
            log.warning("%s/%s: %d unreadable image(s) skipped, listed in %s", name, split,
                        len(results[split].bad), task_dir / "bad_images.json")
    write_task(task_dir, name=name, classnames=classnames, train_template=train_template,
               eval_templates=eval_templates, splits=results, class_ids=class_ids, cil=cil, source=source)
    counts = ", ".join(f"{s} {r.total} in {len(r.shards)} shard(s)" for s, r in results.items())
    log.info("%s: %s", task_dir, counts)
    return task_dir
