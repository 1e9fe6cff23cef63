"""Class-incremental benchmarks: CIFAR100 in 10/20/50 steps, TinyImageNet 100 base classes + 5/10/20 steps.

Each step is a task whose labels are local (0..n-1 over the step's classes); ``class_ids`` in task.json
give the dataset's global id of each, and the ``cil`` block lists every class seen up to that step so an
evaluator can score "all classes seen so far". Class orders are those of the published code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from moecl.errors import DataError

from .common import benchmark, build_task, list_images
from .mtil import read_cifar100
from .writer import Item, WriteOptions

DATASETS = ("cifar100", "tinyimagenet")


def sequence_name(dataset: str, steps: int) -> str:
    """``cifar100_10``, ``tinyimagenet_100_5``: the names of the shipped sequence files."""
    spec = benchmark("cil")[dataset]
    return f"{dataset}_{steps}" if not spec["initial"] else f"{dataset}_{spec['initial']}_{steps}"


def step_classes(dataset: str, steps: int) -> list[list[int]]:
    """Global class ids of each step, in the published class order."""
    spec = benchmark("cil")[dataset]
    order, initial = spec["order"], spec["initial"]
    rest = order[initial:]
    if steps < 1 or len(rest) % steps:
        raise DataError(f"{dataset}: {len(rest)} incremental classes cannot be cut into {steps} equal steps")
    inc = len(rest) // steps
    out = [order[:initial]] if initial else []
    out += [rest[i * inc:(i + 1) * inc] for i in range(steps)]
    return out


def task_names(dataset: str, steps: int) -> list[str]:
    name = sequence_name(dataset, steps)
    return [f"{name}-{i:02d}" for i in range(len(step_classes(dataset, steps)))]


def read_tinyimagenet(base: Path) -> dict[str, list[Item]]:
    """``tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*, val/val_annotations.txt}``;
    global ids follow the line order of wnids.txt (as the published code's class table)."""
    if not (base / "wnids.txt").is_file():
        raise DataError(f"{base / 'wnids.txt'} not found: expected the tiny-imagenet-200 folder")
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().splitlines() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        train.extend(Item(label=index[w], source=str(p.relative_to(base.parent)), path=str(p))
                     for p in list_images(base / "train" / w))
    ann = base / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DataError(f"{ann} not found: expected TinyImageNet's validation annotations")
    test = []
    for line in ann.read_text().splitlines():
        if line.strip():
            fname, wnid = line.split("\t")[:2]
            p = base / "val" / "images" / fname
            test.append(Item(label=index[wnid], source=str(p.relative_to(base.parent)), path=str(p)))
    return {"train": train, "test": test}


def _load(dataset: str, src: Path, trust_pickle: bool) -> tuple[list[str], dict[str, list[Item]]]:
    spec = benchmark("cil")[dataset]
    if dataset == "cifar100":
        base = src / "cifar100"
        if not base.exists() and not trust_pickle:
            raise DataError(f"{base} not found: expected an image-folder export cifar100/{{train,test}}/<class>/ "
                            f"under {src} (or --trust-pickle with the official cifar-100-python folder)")
        _, splits = read_cifar100(base, {}, trust_pickle=trust_pickle)
        return list(spec["classnames"]), splits
    base = src / "tiny-imagenet-200"
    splits = read_tinyimagenet(base)
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().splitlines() if w.strip()]
    table = dict(zip(spec["wnids"], spec["classnames"]))
    missing = [w for w in wnids if w not in table]
    if missing or len(wnids) != len(spec["wnids"]):
        raise DataError(f"{base / 'wnids.txt'} does not list the 200 TinyImageNet classes (unknown: "
                        f"{', '.join(missing[:5])})")
    return [table[w] for w in wnids], splits


def convert_cil(dataset: str, src: str | Path, out_root: str | Path, *, steps: list[int],
                trust_pickle: bool = False, opts: Optional[WriteOptions] = None) -> list[Path]:
    """Write one task per step for each requested step count; returns the task folders."""
    if dataset not in DATASETS:
        raise DataError(f"unknown CIL dataset '{dataset}'; choose from {', '.join(DATASETS)}")
    bench = benchmark("cil")
    allowed = bench[dataset]["steps"]
    for s in steps:
        step_classes(dataset, s)
        if s not in allowed:
            raise DataError(f"{dataset}: {s} steps is not a published setting ({allowed}); the shipped sequence "
                            "files cover those")
    names, splits = _load(dataset, Path(src), trust_pickle)
    by_class: dict[str, dict[int, list[Item]]] = {sp: {} for sp in splits}
    for sp, items in splits.items():
        for it in items:
            by_class[sp].setdefault(it.label, []).append(it)
    done = []
    for s in steps:
        groups = step_classes(dataset, s)
        seen: list[int] = []
        for t, (task, classes) in enumerate(zip(task_names(dataset, s), groups)):
            seen = seen + list(classes)
            local = {c: i for i, c in enumerate(classes)}
            task_splits = {sp: [Item(label=local[c], source=it.source, path=it.path, data=it.data,
                                     meta={"class_id": c})
                                for c in classes for it in by_class[sp].get(c, [])]
                           for sp in splits}
            cil = {"dataset": dataset, "sequence": sequence_name(dataset, s), "step": t, "num_steps": len(groups),
                   "order": bench[dataset]["order"], "initial": bench[dataset]["initial"],
                   "seen_class_ids": seen, "seen_classnames": [names[c] for c in seen]}
            done.append(build_task(out_root, task, classnames=[names[c] for c in classes],
                                   train_template=bench["template"], eval_templates=[bench["template"]],
                                   splits=task_splits, opts=opts or WriteOptions(), class_ids=list(classes),
                                   cil=cil, source={"builder": "data_tools cil", "src": str(src),
                                                    "dataset": dataset}))
    return done
