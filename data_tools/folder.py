"""Any labelled image collection into one task: a class-per-subfolder tree or a CSV/JSONL manifest.

Tree: ``SRC/<class>/...images`` (one split, ``--split``), or ``SRC/<split>/<class>/...`` for several
splits (e.g. ``train/`` and ``test/``; an image-folder export of CIFAR100 has this shape).
Manifest: CSV with a header or JSONL, fields ``path`` and ``label`` (class name or integer id) and an
optional ``split``; relative paths are relative to the manifest's folder.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from moecl.errors import DataError

from .common import build_task, list_images, random_split
from .writer import Item, WriteOptions

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def _display(name: str, keep_underscores: bool) -> str:
    return name if keep_underscores else name.replace("_", " ")


def read_classnames_arg(value: Optional[str]) -> Optional[list[str]]:
    """``--classnames``: a file with one name per line, or a comma-separated list."""
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [c.strip() for c in value.split(",") if c.strip()]
    if len(set(names)) != len(names):
        raise DataError(f"--classnames lists a class twice: {names}")
    return names


def scan_tree(src: Path, split: str) -> dict[str, list[tuple[str, str]]]:
    """``{split: [(image path, class folder name), ...]}`` of a class-per-subfolder tree."""
    subdirs = sorted(p for p in src.iterdir() if p.is_dir())
    split_dirs = [p for p in subdirs if p.name.lower() in SPLIT_NAMES]
    if split_dirs and len(split_dirs) == len(subdirs):
        roots = {p.name.lower(): p for p in split_dirs}
    else:
        roots = {split: src}
    out: dict[str, list[tuple[str, str]]] = {}
    for name, root in roots.items():
        pairs = []
        for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
            pairs.extend((str(img), cdir.name) for img in list_images(cdir))
        if not pairs:
            raise DataError(f"no images found in class subfolders of {root}; expected {root}/<class>/<image>")
        out[name] = pairs
    return out


def scan_manifest(path: Path, split: str) -> dict[str, list[tuple[str, str]]]:
    """``{split: [(image path, label text), ...]}`` of a CSV or JSONL manifest."""
    rows: list[dict] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    out: dict[str, list[tuple[str, str]]] = {}
    for n, row in enumerate(rows, 1):
        if "path" not in row or "label" not in row:
            raise DataError(f"{path}: row {n} lacks 'path' or 'label' (found fields {sorted(row)})")
        img = Path(str(row["path"]))
        if not img.is_absolute():
            img = path.parent / img
        out.setdefault(str(row.get("split") or split), []).append((str(img), str(row["label"]).strip()))
    if not out:
        raise DataError(f"{path}: the manifest lists no images")
    return out


def convert_folder(src: str | Path, out_root: str | Path, *, task: Optional[str] = None, split: str = "train",
                   classnames: Optional[list[str]] = None, template: str = "a photo of a {}.",
                   eval_templates: Optional[list[str]] = None, test_fraction: Optional[float] = None,
                   seed: int = 42, keep_underscores: bool = False, opts: Optional[WriteOptions] = None) -> Path:
    """Convert a tree or manifest into ``out_root/<task>``; returns the task folder."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src} does not exist")
    if "{}" not in template or any("{}" not in t for t in eval_templates or []):
        raise DataError("templates need a '{}' where the class name goes, e.g. 'a photo of a {}.'")
    task = task or (src.stem if src.is_file() else src.name)
    pairs = scan_manifest(src, split) if src.is_file() else scan_tree(src, split)
    labels_seen = sorted({lab for items in pairs.values() for _, lab in items})
    if classnames is None and all(lab.lstrip("-").isdigit() for lab in labels_seen):
        raise DataError(f"{src}: labels are integers; give --classnames (a file or comma list) to name them")
    if classnames is not None:
        index = {}
        for i, name in enumerate(classnames):
            index[name] = i
            index.setdefault(name.replace(" ", "_"), i)
            index.setdefault(str(i), i)
        names = list(classnames)
    else:
        index = {lab: i for i, lab in enumerate(labels_seen)}
        names = [_display(lab, keep_underscores) for lab in labels_seen]
    unknown = sorted({lab for items in pairs.values() for _, lab in items if lab not in index})
    if unknown:
        raise DataError(f"{src}: label(s) {', '.join(unknown[:5])} are not in --classnames")
    if test_fraction is not None:
        if len(pairs) != 1:
            raise DataError(f"{src} already has splits {', '.join(pairs)}; --test-fraction needs a single split")
        (only,) = pairs.values()
        train_idx, test_idx = random_split(len(only), 1.0 - test_fraction, seed)
        pairs = {"train": [only[i] for i in train_idx], "test": [only[i] for i in test_idx]}
    splits = {sp: [Item(label=index[lab], source=str(Path(p).relative_to(src.parent)) if src.is_dir() else p,
                        path=p) for p, lab in items] for sp, items in pairs.items()}
    return build_task(out_root, task, classnames=names, train_template=template,
                      eval_templates=eval_templates or [template], splits=splits, opts=opts or WriteOptions(),
                      source={"builder": "data_tools folder", "src": str(src)})
