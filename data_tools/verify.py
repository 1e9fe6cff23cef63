"""Checking shards against their task.json: the task file obeys the loaders' rules (moecl.data.task's
``task_problems``: plain shard names, no URL template, well-typed fields), every shard is a regular file,
sha256 equal, sample count equal. Shards are only read, never run or decompressed without bound."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from moecl.data.shards import SKIP_KEY, ShardError, ShardLimits, read_shard
from moecl.data.sequence import read_sequence_file
from moecl.data.task import MAX_TASK_FILE_BYTES, task_problems
from moecl.errors import DataError
from moecl.data.untrusted import open_regular, regular_file_problem


def _scan(path: Path, limits: ShardLimits) -> tuple[str, int, Optional[str], list[str]]:
    """sha256, number of samples (key groups), the tar error if any, and the oversized members of one shard
    file, read the way the loaders read it (``read_shard``: streaming, members and shard size capped)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    keys, error, oversized = 0, None, []
    try:
        for sample in read_shard(str(path), limits, local=True):
            keys += 1
            if SKIP_KEY in sample:
                oversized.append(f"sample {sample['__key__']}: {sample[SKIP_KEY]}")
    except ShardError as e:
        error = e.reason
    return h.hexdigest(), keys, error, oversized


def find_tasks(root: Path, tasks: Optional[list[str]] = None) -> list[Path]:
    if (root / "task.json").is_file():
        return [root]
    if tasks:
        return [root / t for t in tasks]
    return sorted(p.parent for p in root.glob("*/task.json"))


def verify(root: str | Path, tasks: Optional[list[str]] = None, *, counts: bool = True,
           limits: Optional[ShardLimits] = None) -> list[str]:
    """Problems found (empty when every shard matches); each names the task file or shard and what is wrong."""
    root = Path(root)
    limits = limits or ShardLimits()
    problems: list[str] = []
    if os.path.lexists(root / "sequence.yaml"):  # the data folder's own sequence: same rules as the loaders
        try:
            read_sequence_file(root / "sequence.yaml")
        except DataError as e:
            problems.append(str(e))
    task_dirs = find_tasks(root, tasks)
    if not task_dirs:
        return [f"no task.json under {root}"]
    for task_dir in task_dirs:
        path = task_dir / "task.json"
        bad_file = regular_file_problem(path)
        if bad_file:
            problems.append(f"{path} {bad_file}")
            continue
        if path.stat().st_size > MAX_TASK_FILE_BYTES:
            problems.append(f"{path}: {path.stat().st_size} bytes, more than a task.json ever needs")
            continue
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            problems.append(f"{path}: unreadable ({e})")
            continue
        rules = task_problems(meta, path)
        if rules:  # its names cannot be trusted as file names: read none of its shards
            problems.extend(rules)
            continue
        sha = meta.get("sha256") or {}
        for split, names in (meta.get("shards") or {}).items():
            per = (meta.get("shard_counts") or {}).get(split) or [None] * len(names)
            total = 0
            for name, expected in zip(names, per):
                shard = task_dir / name
                bad_file = regular_file_problem(shard)
                if bad_file:
                    problems.append(f"{shard}: missing" if bad_file == "does not exist" else f"{shard} {bad_file}")
                    continue
                digest, n, error, oversized = _scan(shard, limits)
                total += n
                if sha.get(name) and digest != sha[name]:
                    problems.append(f"{shard}: sha256 {digest[:12]}... differs from task.json {sha[name][:12]}...")
                if error:
                    problems.append(f"{shard}: not a readable tar ({error})")
                problems.extend(f"{shard}: {o}" for o in oversized)
                if counts and expected is not None and n != expected:
                    problems.append(f"{shard}: {n} samples, task.json says {expected}")
            if counts and meta.get("counts", {}).get(split) not in (None, total) and not problems:
                problems.append(f"{task_dir}: split {split} has {total} samples, task.json says "
                                f"{meta['counts'][split]}")
    return problems
