"""Task sequences: a YAML file naming the tasks to learn in order (and zero-shot-only held-out tasks).

A sequence is addressed by a shipped name (``moecl/sequences/<name>.yaml``), by a path, or, when the data
root carries its own ``sequence.yaml`` with that name (the synthetic builder writes one), by that file:
the data's own description wins because it matches what was actually built. Task names in a sequence file
are folder names under the data root: plain names only (no paths, URLs or commands), checked like task.json.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import DataError
from ..shipped import find, folder, shipped
from .shards import ShardLimits
from .task import TaskInfo, read_task
from .untrusted import check_plain_name, regular_file_problem

SEQUENCE_DIR = folder("sequence")
KINDS = ("mtil", "cil")
MAX_SEQUENCE_FILE_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors/aliases: a sequence file never needs them, and an alias bomb expands to
    gigabytes when walked."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"YAML aliases (*{event.anchor}) are not allowed in a sequence file "
                                 f"({event.start_mark})")
        return super().compose_node(parent, index)

FIELDS = {"name": "the sequence's name (a string)",
          "kind": "mtil (each task scored on its own classes) or cil (class-incremental); default mtil",
          "description": "free text (optional)",
          "tasks": "task folder names under data.root, in training order (a non-empty list)",
          "held_out": "task folder names only ever evaluated zero-shot (optional list)",
          "build": "the command that builds the data; {root} stands for data.root (optional)"}


@dataclass
class Sequence:
    """Tasks in training order plus held-out tasks that are only ever evaluated zero-shot."""
    name: str
    kind: str
    tasks: list[TaskInfo]
    held_out: list[TaskInfo] = field(default_factory=list)
    path: Optional[Path] = None
    root: Optional[Path] = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def all_tasks(self) -> list[TaskInfo]:
        """Training tasks then held-out tasks (the columns of an accuracy matrix with zero-shot sets)."""
        return [*self.tasks, *self.held_out]

    def task(self, name: str) -> TaskInfo:
        for t in self.all_tasks():
            if t.name == name:
                return t
        raise DataError(f"sequence '{self.name}' has no task '{name}'; it has: "
                        + ", ".join(t.name for t in self.all_tasks()))


def shipped_sequences() -> dict[str, Path]:
    """Sequence files shipped inside the package, by name."""
    return shipped("sequence")


def _read_yaml(path: Path) -> dict:
    problem = regular_file_problem(path)
    if problem:
        raise DataError(f"sequence file {path} {problem}")
    if path.stat().st_size > MAX_SEQUENCE_FILE_BYTES:
        raise DataError(f"sequence file {path} is {path.stat().st_size} bytes; a sequence file is a short YAML list")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise DataError(f"sequence file {path} is not readable YAML: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"sequence file {path} must be a mapping with fields 'name', 'tasks' and optionally "
                        "'kind', 'held_out', 'build', 'description'")
    return data


def resolve_sequence(root: str | Path, sequence: str | Path) -> Path:
    """Find the YAML file of a sequence given as a path, the root's own file, or a shipped name."""
    candidate = Path(sequence)
    looks_like_path = candidate.suffix in (".yaml", ".yml") or "/" in str(sequence) or candidate.is_file()
    if looks_like_path and candidate.is_dir():
        candidate = candidate / "sequence.yaml"
    if looks_like_path:
        if not candidate.is_file():
            raise DataError(f"sequence file {candidate} does not exist")
        return candidate
    own = Path(root) / "sequence.yaml"
    if own.is_file() and _read_yaml(own).get("name") == str(sequence):
        return own
    found, hint = find("sequence", str(sequence))
    if found is not None:
        return found
    raise DataError(f"no sequence named '{sequence}'{hint} (shipped: {', '.join(shipped_sequences())}; "
                    "or give a path to a sequence YAML file)")


def _build_hint(build: Any) -> Optional[str]:
    """A sequence file's ``build`` command, shown in messages only when it is a data_tools command (a data
    folder's own sequence.yaml must not get to suggest arbitrary commands)."""
    if isinstance(build, str) and build.startswith("python -m data_tools ") and "\n" not in build:
        return build
    return None


def _missing_task_message(task: str, task_dir: Path, seq_name: str, build: Optional[str], root: Path) -> str:
    how = (build or "python -m data_tools --help").replace("{root}", str(root))
    return (f"sequence '{seq_name}' names task '{task}' but {task_dir / 'task.json'} does not exist; "
            f"build it with: {how}")


def check_sequence_fields(data: dict, path: Path | str) -> None:
    """Every field of a sequence file, checked; each error names the file, the field and what it takes."""
    def bad(key: str, got) -> DataError:
        return DataError(f"sequence file {path}: field '{key}' is {got!r}; it must be {FIELDS[key]}")
    for key in data:
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), list(FIELDS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise DataError(f"sequence file {path}: unknown field '{key}'; {hint}(fields: {', '.join(FIELDS)})")
    for key in ("name", "tasks"):
        if key not in data:
            raise DataError(f"sequence file {path} lacks field '{key}': {FIELDS[key]}")
    if not isinstance(data["name"], (str, int)) or isinstance(data["name"], bool) or not str(data["name"]).strip():
        raise bad("name", data["name"])
    if str(data.get("kind", "mtil")) not in KINDS:
        raise DataError(f"sequence file {path}: field 'kind': kind '{data.get('kind')}' is not one of "
                        f"{', '.join(KINDS)} ({FIELDS['kind']})")
    tasks = data["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, (str, int)) for t in tasks):
        raise bad("tasks", tasks)
    held = data.get("held_out")
    if held is not None and (not isinstance(held, list) or not all(isinstance(t, (str, int)) for t in held)):
        raise bad("held_out", held)
    for key in ("build", "description"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise bad(key, data[key])


def read_sequence_file(path: Path) -> dict[str, Any]:
    """A sequence file's mapping, checked (the loaders and ``python -m data_tools verify`` share this): a name,
    a known kind, a non-empty task list, task names that are plain folder names (no paths, URLs, commands)."""
    data = _read_yaml(path)
    check_sequence_fields(data, path)
    kind = str(data.get("kind", "mtil"))
    names, held = [str(n) for n in data["tasks"]], [str(n) for n in data.get("held_out") or []]
    for i, task in enumerate(names):
        check_plain_name(task, f"sequence file {path}", f"tasks[{i}]")
    for i, task in enumerate(held):
        check_plain_name(task, f"sequence file {path}", f"held_out[{i}]")
    dup = {n for n in [*names, *held] if [*names, *held].count(n) > 1}
    if dup:
        raise DataError(f"sequence file {path} lists task(s) more than once: {', '.join(sorted(dup))}")
    return {**data, "kind": kind, "tasks": names, "held_out": held}


def data_options(data: Any) -> dict[str, Any]:
    """``load_sequence`` keyword arguments from a config's ``data`` section (URL template, shard limits)."""
    defaults = ShardLimits()
    return {"url_template": getattr(data, "shard_url_template", None), "template_source": "data.shard_url_template",
            "limits": ShardLimits(getattr(data, "max_member_bytes", defaults.max_member_bytes),
                                  getattr(data, "max_shard_bytes", defaults.max_shard_bytes))}


def load_sequence(root: str | Path, sequence: str | Path, *, url_template: Optional[str] = None,
                  template_source: str = "url_template", limits: Optional[ShardLimits] = None) -> Sequence:
    """Read a sequence file and the ``task.json`` of each task it names under ``root``.

    ``url_template`` (named ``template_source`` in messages) and ``limits``: see ``read_task``;
    ``**data_options(cfg.data)`` passes the config's."""
    root = Path(root)
    path = resolve_sequence(root, sequence)
    data = read_sequence_file(path)
    kind, names, held = data["kind"], data["tasks"], data.get("held_out") or []
    if not root.is_dir():
        how = _build_hint(data.get("build")) or "python -m data_tools --help"
        raise DataError(f"data root {root} does not exist; build the data first: " + how.replace("{root}", str(root)))

    def load(task: str) -> TaskInfo:
        task_dir = root / str(task)
        if not (task_dir / "task.json").exists():
            raise DataError(_missing_task_message(task, task_dir, data["name"], _build_hint(data.get("build")), root))
        info = read_task(task_dir, url_template=url_template, template_source=template_source, limits=limits)
        return info

    return Sequence(name=str(data["name"]), kind=kind, tasks=[load(t) for t in names],
                    held_out=[load(t) for t in held], path=path, root=root)
