"""Any labelled image collection into one task: a class-per-subfolder tree or a CSV/JSONL manifest.

Tree: ``SRC/<class>/...images`` (one split, ``--split``), or ``SRC/<split>/<class>/...`` for several
splits (e.g. ``train/`` and ``test/``; an image-folder export of CIFAR100 has this shape).
Manifest: CSV with a header or JSONL, fields ``path`` and ``label`` (class name or integer id) and an
optional ``split``; relative paths are relative to the manifest's folder.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Optional, Union

from moecl.errors import DataError

from .common import build_task, list_images, random_split
from .writer import Item, WriteOptions

SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def _display(name: str, keep_underscores: bool) -> str:
    return name if keep_underscores else name.replace("_", " ")


ClassNames = Union[list[str], dict[str, str]]


def _mapping_pairs(entries: list[str], where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries:
        key, sep, name = entry.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise DataError(f"{where}: '{entry}' is not LABEL=NAME (e.g. 4=four)")
        if key.strip() in out:
            raise DataError(f"{where}: label '{key.strip()}' is named twice")
        out[key.strip()] = name.strip()
    return out


def _two_columns(line: str) -> Optional[tuple[str, str]]:
    """``LABEL,NAME`` / ``LABEL<TAB>NAME`` / ``LABEL=NAME`` / ``LABEL NAME`` -> (label, name)."""
    parts = re.split(r"\s*[,\t=]\s*", line, maxsplit=1) if re.search(r"[,\t=]", line) else line.split(None, 1)
    return (parts[0], parts[1]) if len(parts) == 2 and parts[0] and parts[1] else None


def read_classnames_arg(value: Optional[str]) -> Optional[ClassNames]:
    """``--classnames``: class names by position (``a,b,c`` or a file with one name per line: label 0 is
    the first), or a mapping from folder/label to name (``4=four,5=five`` or a file of two columns
    ``LABEL NAME`` / ``LABEL,NAME`` / ``LABEL<TAB>NAME``)."""
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        cols = [_two_columns(line) for line in lines]
        if lines and all(c is not None for c in cols) and (
                any(re.search(r"[,\t=]", line) for line in lines) or all(c[0].lstrip("-").isdigit() for c in cols)):
            return _mapping_pairs([f"{k}={v}" for k, v in cols], str(path))
        names = lines
    else:
        entries = [c.strip() for c in value.split(",") if c.strip()]
        if any("=" in e for e in entries):
            return _mapping_pairs(entries, "--classnames")
        names = entries
    if len(set(names)) != len(names):
        raise DataError(f"--classnames lists a class twice: {names}")
    return names


def _label_key(label: str) -> tuple:
    """Integer labels in numeric order (2 before 10), then the others alphabetically."""
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


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


def read_source(src: str | Path, *, split: str = "train", classnames: Optional[ClassNames] = None,
                keep_underscores: bool = False) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Class names and ``{split: [(image path, class index), ...]}`` of a tree or a manifest.

    Labels become classes this way: with no ``classnames``, the folder names / label texts sorted (they
    are the names; integers are refused: nobody can read "4" as a class); with a list, an integer label
    ``i`` is the list's ``i``-th name (0 = first) and a text label must be one of the names; with a
    mapping (``4=four``), each label is looked up as written.
    """
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src} does not exist")
    raw = scan_manifest(src, split) if src.is_file() else scan_tree(src, split)
    labels_seen = sorted({lab for items in raw.values() for _, lab in items}, key=_label_key)
    integers = [lab for lab in labels_seen if lab.lstrip("-").isdigit()]
    how = ("give --classnames as a mapping from label to name, e.g. --classnames "
           + ",".join(f"{lab}=NAME" for lab in labels_seen[:3]) + (",..." if len(labels_seen) > 3 else "")
           + " (or a file of two columns: LABEL NAME), or as names by position (a,b,c: integer label 0 is the "
           "first name)")
    if isinstance(classnames, dict):
        index = {lab: i for i, lab in enumerate(sorted(classnames, key=_label_key))}
        names = [classnames[lab] for lab in sorted(classnames, key=_label_key)]
        if len(set(names)) != len(names):
            raise DataError(f"--classnames gives two labels the same name: {names}")
        unknown = [lab for lab in labels_seen if lab not in index]
        if unknown:
            raise DataError(f"{src}: label(s) {', '.join(unknown[:5])} have no name in the --classnames mapping "
                            f"(it names {', '.join(list(classnames)[:5])}); add LABEL=NAME for each")
    elif classnames is not None:
        index = {}
        for i, name in enumerate(classnames):
            index[name] = i
            index.setdefault(name.replace(" ", "_"), i)
            index.setdefault(str(i), i)
        names = list(classnames)
        unknown = [lab for lab in labels_seen if lab not in index]
        if unknown:
            raise DataError(f"{src}: label(s) {', '.join(unknown[:5])} are not in --classnames: a list of names is "
                            f"read by position (integer label i = the i-th name, 0..{len(names) - 1} here) or by "
                            f"name; to name folders/labels as they are written, give a mapping, e.g. --classnames "
                            + ",".join(f"{lab}=NAME" for lab in unknown[:3]))
    else:
        if integers:
            raise DataError(f"{src}: label(s) {', '.join(integers[:5])} are integers, which are not class names; "
                            + how)
        index = {lab: i for i, lab in enumerate(labels_seen)}
        names = [_display(lab, keep_underscores) for lab in labels_seen]
    return names, {sp: [(p, index[lab]) for p, lab in items] for sp, items in raw.items()}


def _check_templates(template: str, eval_templates: Optional[list[str]]) -> None:
    if "{}" not in template or any("{}" not in t for t in eval_templates or []):
        raise DataError("templates need a '{}' where the class name goes, e.g. 'a photo of a {}.'")


def _split_test(pairs: dict[str, list], src: Path, test_fraction: Optional[float], seed: int) -> dict[str, list]:
    if test_fraction is None:
        return pairs
    if len(pairs) != 1:
        raise DataError(f"{src} already has splits {', '.join(pairs)}; --test-fraction needs a single split")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    (only,) = pairs.values()
    train_idx, test_idx = random_split(len(only), 1.0 - test_fraction, seed)
    return {"train": [only[i] for i in train_idx], "test": [only[i] for i in test_idx]}


def _item(src: Path, path: str, label: int, **extra) -> Item:
    return Item(label=label, source=str(Path(path).relative_to(src.parent)) if src.is_dir() else path, path=path,
                **extra)


def convert_folder(src: str | Path, out_root: str | Path, *, task: Optional[str] = None, split: str = "train",
                   classnames: Optional[ClassNames] = None, template: str = "a photo of a {}.",
                   eval_templates: Optional[list[str]] = None, test_fraction: Optional[float] = None,
                   seed: int = 42, keep_underscores: bool = False, opts: Optional[WriteOptions] = None) -> Path:
    """Convert a tree or manifest into ``out_root/<task>``; returns the task folder."""
    src = Path(src)
    _check_templates(template, eval_templates)
    task = task or (src.stem if src.is_file() else src.name)
    names, pairs = read_source(src, split=split, classnames=classnames, keep_underscores=keep_underscores)
    pairs = _split_test(pairs, src, test_fraction, seed)
    splits = {sp: [_item(src, p, lab) for p, lab in items] for sp, items in pairs.items()}
    return build_task(out_root, task, classnames=names, train_template=template,
                      eval_templates=eval_templates or [template], splits=splits, opts=opts or WriteOptions(),
                      source={"builder": "data_tools folder", "src": str(src)})


def class_order(names: list[str], order: Optional[list[str]] = None, seed: Optional[int] = None) -> list[int]:
    """Class indices in the order tasks take them: as listed (``order``, names or labels), a seeded
    permutation (``seed``, ``torch.randperm``, as Avalanche's ``nc_benchmark``), or index order."""
    if order is not None and seed is not None:
        raise DataError("--class-order and --class-seed exclude each other: give one")
    if order is not None:
        lookup = {n: i for i, n in enumerate(names)}
        for i, n in enumerate(names):  # a folder name as written (maple_tree) names the class maple tree too
            lookup.setdefault(n.replace(" ", "_"), i)
        bad = [o for o in order if o not in lookup]
        if bad:
            raise DataError(f"--class-order: {', '.join(bad[:5])} are not classes of this source "
                            f"(classes: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
        out = [lookup[o] for o in order]
        if sorted(out) != list(range(len(names))):
            missing = [n for i, n in enumerate(names) if i not in out]
            repeated = sorted({names[i] for i in out if out.count(i) > 1})
            raise DataError(f"--class-order must list every class once; missing: {', '.join(missing[:5]) or '-'}"
                            + (f"; repeated: {', '.join(repeated)}" if repeated else ""))
        return out
    if seed is not None:
        import torch
        return torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    return list(range(len(names)))


def task_groups(order: list[int], tasks: int) -> list[list[int]]:
    """``order`` cut into ``tasks`` consecutive groups; sizes differ by at most one (larger ones first)."""
    if tasks < 1 or tasks > len(order):
        raise DataError(f"--tasks {tasks}: choose between 1 and the number of classes ({len(order)})")
    base, extra = divmod(len(order), tasks)
    out, start = [], 0
    for k in range(tasks):
        size = base + (1 if k < extra else 0)
        out.append(order[start:start + size])
        start += size
    return out


def split_task_names(name: str, tasks: int) -> list[str]:
    """``digits-01``, ``digits-02``, ...: 1-based, zero-padded so they sort in training order."""
    width = max(2, len(str(tasks)))
    return [f"{name}-{k + 1:0{width}d}" for k in range(tasks)]


def convert_class_split(src: str | Path, out_root: str | Path, *, tasks: int, name: Optional[str] = None,
                        split: str = "train", classnames: Optional[ClassNames] = None,
                        order: Optional[list[str]] = None, order_seed: Optional[int] = None,
                        template: str = "a photo of a {}.", eval_templates: Optional[list[str]] = None,
                        test_fraction: Optional[float] = None, seed: int = 42, keep_underscores: bool = False,
                        opts: Optional[WriteOptions] = None, build: Optional[str] = None) -> tuple[list[Path], Path]:
    """One tree or manifest cut into ``tasks`` class-incremental tasks (disjoint classes, labels local to
    each task, ``class_ids`` and the ``cil`` block as the shipped CIL benchmarks have them) plus the
    sequence file ``out_root/<name>.yaml`` (``kind: cil``). Returns (task folders, sequence file)."""
    from .taskfile import write_sequence
    src = Path(src)
    _check_templates(template, eval_templates)
    name = name or (src.stem if src.is_file() else src.name)
    names, pairs = read_source(src, split=split, classnames=classnames, keep_underscores=keep_underscores)
    pairs = _split_test(pairs, src, test_fraction, seed)
    groups = task_groups(class_order(names, order, order_seed), tasks)
    task_list = split_task_names(name, tasks)
    done: list[Path] = []
    seen: list[int] = []
    for k, (task, classes) in enumerate(zip(task_list, groups)):
        seen = seen + list(classes)
        local = {c: i for i, c in enumerate(classes)}
        task_splits = {sp: [_item(src, p, local[lab], meta={"class_id": lab}) for p, lab in items if lab in local]
                       for sp, items in pairs.items()}
        cil = {"dataset": name, "sequence": name, "step": k, "num_steps": tasks,
               "order": [c for g in groups for c in g], "initial": 0, "seen_class_ids": seen,
               "seen_classnames": [names[c] for c in seen]}
        done.append(build_task(out_root, task, classnames=[names[c] for c in classes], train_template=template,
                               eval_templates=eval_templates or [template], splits=task_splits,
                               opts=opts or WriteOptions(), class_ids=list(classes), cil=cil,
                               source={"builder": "data_tools folder --tasks", "src": str(src)}))
    desc = (f"{src.name} cut into {tasks} class-incremental tasks: "
            + "; ".join(f"{t}: {', '.join(names[c] for c in g)}" for t, g in zip(task_list, groups)))
    seq = write_sequence(Path(out_root) / f"{name}.yaml", name=name, kind="cil", tasks=task_list,
                         build=build, description=desc)
    return done, seq
