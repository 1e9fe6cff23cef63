"""One task's metadata (``<root>/<task>/task.json``): what the shard builder wrote and the streams trust.

The file is the single source of truth for a task's class names, prompt templates, sample counts, shard
list and checksums; streams use the per-shard counts to check that every sample was seen exactly once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import DataError

TASK_FORMAT = "moecl-task/1"
URL_TEMPLATE_ENV = "MOECL_SHARD_URL_TEMPLATE"

_REQUIRED = ("name", "classnames", "templates", "counts", "shards")


@dataclass
class TaskInfo:
    """A task as the trainer and evaluator see it: names, prompts, counts and shard URLs per split."""
    name: str
    root: Path
    classnames: list[str]
    train_template: str
    eval_templates: list[str]
    counts: dict[str, int]
    shards: dict[str, list[str]]
    class_ids: Optional[list[int]] = None
    shard_counts: dict[str, list[int]] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    cil: Optional[dict[str, Any]] = None
    kind: str = "classification"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def splits(self) -> list[str]:
        return list(self.shards)

    def urls(self, split: str) -> list[str]:
        """Full shard URLs (local paths, or what the URL template made of them) of one split."""
        self._check_split(split)
        return list(self.shards[split])

    def count(self, split: str) -> int:
        self._check_split(split)
        return int(self.counts[split])

    def _check_split(self, split: str) -> None:
        if split not in self.shards:
            have = ", ".join(self.shards) or "none"
            raise DataError(f"task '{self.name}' ({self.root / 'task.json'}) has no split '{split}'; "
                            f"it has: {have}")

    def prompts(self, classname: str, which: str = "eval") -> list[str]:
        """The prompts of one class name: the eval ensemble, or the single training prompt."""
        templates = self.eval_templates if which == "eval" else [self.train_template]
        return [fill_template(t, classname) for t in templates]


def fill_template(template: str, classname: str) -> str:
    """``"a photo of a {}."`` -> ``"a photo of a dog."`` (no str.format: class names may hold braces)."""
    return template.replace("{}", classname)


URL_PLACEHOLDERS = ("task", "split", "shard", "root")


def check_url_template(template: str, source: str) -> str:
    """Refuse a shard URL template whose placeholders are not {task} {split} {shard} {root}, naming ``source``
    (the environment variable, file or argument it came from) and the valid placeholders."""
    import string
    try:
        bad = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None and f not in URL_PLACEHOLDERS]
        problem = f"unknown placeholder(s) {', '.join('{' + f + '}' for f in bad)}" if bad else ""
        if not problem:  # nested fields in a format spec, bad conversions
            template.format(**{p: p for p in URL_PLACEHOLDERS})
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        problem = f"not a valid template ({type(e).__name__}: {e})"
    if problem:
        raise DataError(f"{source}={template!r}: {problem}; the valid placeholders are "
                        + ", ".join("{" + p + "}" for p in URL_PLACEHOLDERS) + " (write {{ and }} for literal braces)")
    return template


def env_url_template() -> Optional[str]:
    """``MOECL_SHARD_URL_TEMPLATE``, checked (None when unset or empty)."""
    value = os.environ.get(URL_TEMPLATE_ENV)
    return check_url_template(value, URL_TEMPLATE_ENV) if value else None


def _shard_url(task_dir: Path, task: str, split: str, shard: str, template: Optional[str]) -> str:
    if not template:
        return str(task_dir / shard)
    return template.format(task=task, split=split, shard=shard, root=str(task_dir.parent))


def read_task(task_dir: str | Path, url_template: Optional[str] = None) -> TaskInfo:
    """Load and validate ``task_dir/task.json``.

    Shard URLs are ``task_dir/<shard>`` unless a URL template is given (argument, the task file's
    ``url_template`` or the ``MOECL_SHARD_URL_TEMPLATE`` environment variable), e.g.
    ``pipe:aws s3 cp s3://bucket/mtil/{task}/{shard} -``: metadata stays local, shards stream remotely.
    """
    task_dir = Path(task_dir)
    path = task_dir / "task.json"
    if not path.is_file():
        raise DataError(f"{path} does not exist; build the task's shards with `python -m data_tools ...` "
                        "(see `python -m data_tools --help`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); rebuild the task with python -m data_tools") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object, found {type(meta).__name__}")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise DataError(f"{path} lacks field(s) {', '.join(missing)}; rebuild the task with python -m data_tools")
    templates = meta["templates"]
    if not isinstance(templates, dict) or not isinstance(templates.get("train"), str) \
            or not isinstance(templates.get("eval"), list) or not templates["eval"]:
        raise DataError(f"{path}: field 'templates' must be {{\"train\": str, \"eval\": [str, ...]}}, "
                        f"found {templates!r}")
    for t in [templates["train"], *templates["eval"]]:
        if "{}" not in t:
            raise DataError(f"{path}: template {t!r} has no '{{}}' placeholder for the class name")
    classnames = meta["classnames"]
    if not isinstance(classnames, list) or not all(isinstance(c, str) for c in classnames):
        raise DataError(f"{path}: field 'classnames' must be a list of strings")
    name = str(meta["name"])
    template = url_template or meta.get("url_template") or env_url_template() or None
    shards: dict[str, list[str]] = {}
    for split, names in meta["shards"].items():
        if not isinstance(names, list):
            raise DataError(f"{path}: shards.{split} must be a list of shard file names")
        shards[split] = [_shard_url(task_dir, task_dir.name, split, str(s), template) for s in names]
    counts = {str(k): int(v) for k, v in meta["counts"].items()}
    for split in shards:
        if split not in counts:
            raise DataError(f"{path}: counts has no entry for split '{split}'")
    shard_counts = {str(k): [int(c) for c in v] for k, v in (meta.get("shard_counts") or {}).items()}
    for split, per in shard_counts.items():
        if split in shards and (len(per) != len(shards[split]) or sum(per) != counts.get(split)):
            raise DataError(f"{path}: shard_counts.{split} does not match shards.{split} / counts.{split}; "
                            "the file was edited or the build was interrupted: rebuild the task")
    class_ids = meta.get("class_ids")
    if class_ids is not None:
        class_ids = [int(c) for c in class_ids]
        if len(class_ids) != len(classnames):
            raise DataError(f"{path}: class_ids has {len(class_ids)} entries for {len(classnames)} class names")
    return TaskInfo(
        name=name, root=task_dir, classnames=list(classnames), train_template=templates["train"],
        eval_templates=list(templates["eval"]), counts=counts, shards=shards, class_ids=class_ids,
        shard_counts=shard_counts, sha256=dict(meta.get("sha256") or {}), cil=meta.get("cil"),
        kind=str(meta.get("kind", "classification")), meta=meta)
