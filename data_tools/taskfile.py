"""The files beside a task's shards: ``task.json``, ``sizes.json`` (open_clip's format), ``bad_images.json``,
and sequence YAML files. Written atomically; a split written later is merged into an existing task.json.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from moecl.data.task import TASK_FORMAT
from moecl.errors import DataError

from .writer import SplitResult


def _dump_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_task(task_dir: str | Path, *, name: str, classnames: list[str], train_template: str,
               eval_templates: list[str], splits: dict[str, SplitResult], class_ids: Optional[list[int]] = None,
               cil: Optional[dict[str, Any]] = None, kind: str = "classification",
               source: Optional[dict[str, Any]] = None, extra: Optional[dict[str, Any]] = None) -> Path:
    """Write (or merge into) ``task_dir/task.json`` and refresh ``sizes.json`` and ``bad_images.json``."""
    task_dir = Path(task_dir)
    path = task_dir / "task.json"
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("classnames") not in (None, classnames):
            keep = [s for s in old.get("shards", {}) if s not in splits]
            if keep:
                raise DataError(f"{path} already holds split(s) {', '.join(keep)} with other class names; "
                                "write every split with the same classes, or remove the task folder first")
            old = {}
    shards = {k: v for k, v in old.get("shards", {}).items() if k not in splits}
    shard_counts = {k: v for k, v in old.get("shard_counts", {}).items() if k not in splits}
    counts = {k: v for k, v in old.get("counts", {}).items() if k not in splits}
    sha = {s: h for s, h in old.get("sha256", {}).items()
           if not any(s.startswith(f"{sp}-") for sp in splits)}
    for split, res in splits.items():
        shards[split] = res.shards
        shard_counts[split] = res.counts
        counts[split] = res.total
        sha.update(dict(zip(res.shards, res.sha256)))
    meta: dict[str, Any] = {
        "format": TASK_FORMAT, "name": name, "kind": kind, "classnames": classnames,
        "templates": {"train": train_template, "eval": list(eval_templates)},
        "counts": counts, "shards": shards, "shard_counts": shard_counts, "sha256": sha,
        "class_ids": class_ids, "cil": cil, "source": source or old.get("source"),
    }
    if extra:
        meta.update(extra)
    task_dir.mkdir(parents=True, exist_ok=True)
    _dump_atomic(path, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    sizes = {s: c for split in shards for s, c in zip(shards[split], shard_counts[split])}
    _dump_atomic(task_dir / "sizes.json", json.dumps(sizes, indent=1) + "\n")
    bad_path = task_dir / "bad_images.json"
    bad: dict[str, Any] = {}
    if bad_path.is_file():
        try:
            bad = {k: v for k, v in json.loads(bad_path.read_text()).items() if k not in splits}
        except (OSError, json.JSONDecodeError):
            bad = {}
    bad.update({split: res.bad for split, res in splits.items()})
    _dump_atomic(bad_path, json.dumps(bad, indent=1, ensure_ascii=False) + "\n")
    return path


def write_sequence(path: str | Path, *, name: str, kind: str, tasks: list[str], held_out: Optional[list[str]] = None,
                   build: Optional[str] = None, description: Optional[str] = None) -> Path:
    """A sequence YAML file: ``name``, ``kind``, ``tasks`` in training order, optional ``held_out``."""
    path = Path(path)
    data: dict[str, Any] = {"name": name, "kind": kind}
    if description:
        data["description"] = description
    data["tasks"] = list(tasks)
    if held_out:
        data["held_out"] = list(held_out)
    if build:
        data["build"] = build
    path.parent.mkdir(parents=True, exist_ok=True)
    _dump_atomic(path, yaml.safe_dump(data, sort_keys=False, width=120))
    return path
