"""Checking shards against their task.json: every shard present, sha256 equal, sample count equal."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Optional

from webdataset.tariterators import base_plus_ext


def _scan(path: Path) -> tuple[str, int, Optional[str]]:
    """sha256, number of samples (key groups) and the tar error, if any, of one shard file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    keys, last, error = 0, None, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                prefix, _ = base_plus_ext(m.name)
                if prefix is not None and prefix != last:
                    keys, last = keys + 1, prefix
    except (tarfile.TarError, EOFError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
    return h.hexdigest(), keys, error


def find_tasks(root: Path, tasks: Optional[list[str]] = None) -> list[Path]:
    if (root / "task.json").is_file():
        return [root]
    if tasks:
        return [root / t for t in tasks]
    return sorted(p.parent for p in root.glob("*/task.json"))


def verify(root: str | Path, tasks: Optional[list[str]] = None, *, counts: bool = True) -> list[str]:
    """Problems found (empty when every shard matches); each names the shard and what is wrong."""
    root = Path(root)
    problems: list[str] = []
    task_dirs = find_tasks(root, tasks)
    if not task_dirs:
        return [f"no task.json under {root}"]
    for task_dir in task_dirs:
        path = task_dir / "task.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{path}: unreadable ({e})")
            continue
        sha = meta.get("sha256") or {}
        for split, names in (meta.get("shards") or {}).items():
            per = (meta.get("shard_counts") or {}).get(split) or [None] * len(names)
            total = 0
            for name, expected in zip(names, per):
                shard = task_dir / name
                if not shard.is_file():
                    problems.append(f"{shard}: missing")
                    continue
                digest, n, error = _scan(shard)
                total += n
                if sha.get(name) and digest != sha[name]:
                    problems.append(f"{shard}: sha256 {digest[:12]}... differs from task.json {sha[name][:12]}...")
                if error:
                    problems.append(f"{shard}: not a readable tar ({error})")
                if counts and expected is not None and n != expected:
                    problems.append(f"{shard}: {n} samples, task.json says {expected}")
            if counts and meta.get("counts", {}).get(split) not in (None, total) and not problems:
                problems.append(f"{task_dir}: split {split} has {total} samples, task.json says "
                                f"{meta['counts'][split]}")
    return problems
