"""One task's metadata (``<root>/<task>/task.json``): what the shard builder wrote and the streams trust.

The file is the single source of truth for a task's class names, prompt templates, sample counts, shard
list and checksums; streams use the per-shard counts to check that every sample was seen exactly once.
It comes from the data folder, so it is untrusted: every field is type-checked and every shard entry must be
a plain file name (never a path, URL or ``pipe:`` command); URL templates come only from the user.
"""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import DataError
from .shards import ShardLimits
from .untrusted import NAME_RULE, check_plain_name, plain_name_problem, regular_file_problem

TASK_FORMAT = "moecl-task/1"
URL_TEMPLATE_ENV = "MOECL_SHARD_URL_TEMPLATE"

_REQUIRED = ("name", "classnames", "templates", "counts", "shards")
MAX_TASK_FILE_BYTES = 64 << 20  # a task.json of a million shards is ~50 MB


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
    remote: bool = False  # shard URLs made by the user's URL template (else local files under root)
    limits: ShardLimits = field(default_factory=ShardLimits)

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


TEMPLATE_FIELDS = ("root", "task", "split", "shard")


def check_url_template(template: str, source: str) -> str:
    """A shard URL template from the user (config key or environment variable ``source``): only the
    placeholders ``{root}``, ``{task}``, ``{split}``, ``{shard}``."""
    valid = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
    try:
        parts = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"{source}={template!r} is not a valid template ({e}); placeholders: {valid}") from None
    fields = [f for f, _, _ in parts]
    unknown = [f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "")
               for f, spec, conv in parts if f not in TEMPLATE_FIELDS or spec or conv]
    if unknown:
        raise DataError(f"{source}={template!r} has unknown placeholder(s) "
                        f"{', '.join('{' + f + '}' for f in unknown)}; valid placeholders: {valid}")
    if "shard" not in fields:
        raise DataError(f"{source}={template!r} has no {{shard}} placeholder: every shard would be the same URL; "
                        f"valid placeholders: {valid}")
    return template


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def task_problems(meta: Any, path: str | Path) -> list[str]:
    """Every way ``meta`` (a parsed task.json at ``path``) breaks the task file rules, each naming the field.

    One set of rules for the loaders and ``python -m data_tools verify``: field types and counts, and names
    (splits, shards) that are plain file names, never paths, URLs or commands (see ``untrusted``).
    """
    if not isinstance(meta, dict):
        return [f"{path} must hold a JSON object, found {type(meta).__name__}"]
    out: list[str] = []

    def bad(field_name: str, text: str) -> None:
        out.append(f"{path}: field '{field_name}' {text}")

    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        out.append(f"{path} lacks field(s) {', '.join(missing)}; rebuild the task with python -m data_tools")
    if meta.get("url_template") is not None:
        bad("url_template", "is not allowed in a data folder (a URL template can run commands); set "
                            f"data.shard_url_template in your own config or {URL_TEMPLATE_ENV} instead")
    if "name" in meta and (not isinstance(meta["name"], str) or not meta["name"].strip()):
        bad("name", f"must be a non-empty string, found {meta['name']!r:.60}")
    if "kind" in meta and not isinstance(meta["kind"], str):
        bad("kind", f"must be a string, found {meta['kind']!r:.60}")
    classnames = meta.get("classnames")
    if "classnames" in meta:
        if not _is_str_list(classnames) or not classnames:
            bad("classnames", f"must be a non-empty list of strings, found {classnames!r:.80}")
            classnames = None
        elif not all(c.strip() for c in classnames):
            bad("classnames", f"holds an empty class name at position {[c.strip() for c in classnames].index('')}")
    templates = meta.get("templates")
    if "templates" in meta:
        if not isinstance(templates, dict) or not isinstance(templates.get("train"), str) \
                or not _is_str_list(templates.get("eval")) or not templates["eval"]:
            bad("templates", f"must be {{\"train\": str, \"eval\": [str, ...]}}, found {templates!r:.120}")
        else:
            for t in [templates["train"], *templates["eval"]]:
                if "{}" not in t:
                    bad("templates", f"template {t!r} has no '{{}}' placeholder for the class name")
    shards = meta.get("shards")
    if "shards" in meta:
        if not isinstance(shards, dict) or not shards:
            bad("shards", f"must be a non-empty mapping split -> [shard file name, ...], found {shards!r:.80}")
            shards = {}
        for split, names in list(shards.items()):
            problem = plain_name_problem(split)
            if problem:
                bad(f"shards.{split}", f"has a split name that {problem}; it must be {NAME_RULE}")
            if not isinstance(names, list):
                bad(f"shards.{split}", f"must be a list of shard file names, found {names!r:.80}")
                shards[split] = []
                continue
            for i, name in enumerate(names):
                problem = plain_name_problem(name)
                if problem:
                    bad(f"shards.{split}[{i}]", f"{problem}; a shard entry must be {NAME_RULE}, relative to "
                                                 "the task folder. A data folder never runs commands or names "
                                                 "remote URLs: a pipe:/remote URL template belongs in your own "
                                                 f"config (data.shard_url_template) or {URL_TEMPLATE_ENV}")
            dup = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
            if dup:
                bad(f"shards.{split}", f"lists {', '.join(dup)} more than once")
    else:
        shards = {}
    counts = meta.get("counts")
    if "counts" in meta:
        if not isinstance(counts, dict):
            bad("counts", f"must be a mapping split -> number of samples, found {counts!r:.80}")
            counts = {}
        for split, n in counts.items():
            if not _is_count(n):
                bad(f"counts.{split}", f"must be a non-negative integer, found {n!r:.40}")
        for split in shards:
            if split not in counts:
                bad("counts", f"has no entry for split '{split}'")
    per_shard = meta.get("shard_counts")
    if per_shard is not None:
        if not isinstance(per_shard, dict):
            bad("shard_counts", f"must be a mapping split -> [count per shard], found {per_shard!r:.80}")
        else:
            for split, per in per_shard.items():
                if not isinstance(per, list) or not all(_is_count(c) for c in per):
                    bad(f"shard_counts.{split}", f"must be a list of non-negative integers, found {per!r:.80}")
                elif isinstance(shards.get(split), list) and isinstance(counts, dict) and \
                        (len(per) != len(shards[split]) or sum(per) != counts.get(split)):
                    bad(f"shard_counts.{split}", f"does not match shards.{split} / counts.{split}; the file was "
                                                 "edited or the build was interrupted: rebuild the task")
    class_ids = meta.get("class_ids")
    if class_ids is not None:
        if not isinstance(class_ids, list) or not all(_is_count(c) for c in class_ids):
            bad("class_ids", f"must be a list of non-negative integers, found {class_ids!r:.80}")
        elif classnames is not None and len(class_ids) != len(classnames):
            bad("class_ids", f"has {len(class_ids)} entries for {len(classnames)} class names")
    sha = meta.get("sha256")
    if sha is not None and (not isinstance(sha, dict) or not all(isinstance(v, str) for v in sha.values())):
        bad("sha256", f"must be a mapping shard file name -> hex digest, found {sha!r:.80}")
    if meta.get("cil") is not None and not isinstance(meta["cil"], dict):
        bad("cil", f"must be a mapping, found {meta['cil']!r:.60}")
    return out


def _shard_url(task_dir: Path, task: str, split: str, shard: str, template: Optional[str]) -> str:
    if not template:
        return str(task_dir / shard)
    return template.format(task=task, split=split, shard=shard, root=str(task_dir.parent))


def read_task(task_dir: str | Path, url_template: Optional[str] = None, *,
              template_source: str = "url_template", limits: Optional[ShardLimits] = None) -> TaskInfo:
    """Load and validate ``task_dir/task.json`` (see ``task_problems`` for the rules).

    Shard URLs are ``task_dir/<shard>`` unless the user gives a URL template (the argument, named
    ``template_source`` in messages, or the ``MOECL_SHARD_URL_TEMPLATE`` environment variable), e.g.
    ``pipe:aws s3 cp s3://bucket/mtil/{task}/{shard} -``: metadata stays local, shards stream remotely.
    A task.json never supplies a template. ``limits`` caps what one shard may decompress to.
    """
    task_dir = Path(task_dir)
    path = task_dir / "task.json"
    problem = regular_file_problem(path)
    if problem == "does not exist":
        raise DataError(f"{path} does not exist; build the task's shards with `python -m data_tools ...` "
                        "(see `python -m data_tools --help`)")
    if problem:
        raise DataError(f"{path} {problem}; a task.json must be a plain JSON file")
    size = path.stat().st_size
    if size > MAX_TASK_FILE_BYTES:
        raise DataError(f"{path} is {size} bytes, more than a task.json ever needs ({MAX_TASK_FILE_BYTES}); "
                        "rebuild the task with python -m data_tools")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); rebuild the task with python -m data_tools") from None
    problems = task_problems(meta, path)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError("; ".join(problems[:5]) + more)
    if url_template:
        template: Optional[str] = check_url_template(url_template, template_source)
    elif os.environ.get(URL_TEMPLATE_ENV):
        template = check_url_template(os.environ[URL_TEMPLATE_ENV], URL_TEMPLATE_ENV)
    else:
        template = None
    if template:  # the folder name goes into the URL (a command, for pipe:)
        check_plain_name(task_dir.name, str(task_dir), "the task folder name")
    shards = {split: [_shard_url(task_dir, task_dir.name, split, s, template) for s in names]
              for split, names in meta["shards"].items()}
    counts = {k: int(v) for k, v in meta["counts"].items()}
    shard_counts = {k: list(v) for k, v in (meta.get("shard_counts") or {}).items()}
    class_ids = meta.get("class_ids")
    return TaskInfo(
        name=meta["name"], root=task_dir, classnames=list(meta["classnames"]),
        train_template=meta["templates"]["train"], eval_templates=list(meta["templates"]["eval"]), counts=counts,
        shards=shards, class_ids=list(class_ids) if class_ids is not None else None, shard_counts=shard_counts,
        sha256=dict(meta.get("sha256") or {}), cil=meta.get("cil"), kind=str(meta.get("kind", "classification")),
        meta=meta, remote=template is not None, limits=limits or ShardLimits())
