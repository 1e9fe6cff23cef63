"""A moecl task as a CLIP_benchmark WebDataset dataset, so a moecl backbone can be scored with the usual tool.

CLIP_benchmark's ``wds/<name>`` layout (its ``build_wds_dataset``)::

    OUT/<split>/0.tar 1.tar ...      the task's shards, renamed (same samples: image .png/.jpg + .cls)
    OUT/<split>/nshards.txt          number of shards of the split
    OUT/classnames.txt               one class name per line, in label order
    OUT/zeroshot_classification_templates.txt   one prompt per line, {c} where the class name goes
    OUT/dataset_type.txt             classification

Then: ``clip_benchmark eval --dataset wds/NAME --dataset_root OUT --model moecl-tiny --pretrained FILE``.
Shards are hard-linked when OUT is on the same file system, copied otherwise, and checked against the
sha256 that ``task.json`` records.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from moecl.data.task import read_task
from moecl.errors import DataError

from .writer import sha256_file



def _place(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def export_clip_benchmark(task_dir: str | Path, out: str | Path, splits: Optional[list[str]] = None,
                          templates: str = "eval") -> Path:
    """Write ``task_dir``'s shards and metadata in CLIP_benchmark's layout under ``out``; returns ``out``."""
    task_dir = Path(task_dir)
    if not (task_dir / "task.json").is_file():
        raise DataError(f"{task_dir / 'task.json'} does not exist: give a task folder (DATA_ROOT/TASK) written "
                        "by python -m data_tools")
    task = read_task(task_dir)
    splits = splits or task.splits
    missing = [s for s in splits if s not in task.shards]
    if missing:
        raise DataError(f"task '{task.name}' has no split(s) {', '.join(missing)}; it has: {', '.join(task.splits)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in splits:
        folder = out / split
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        for i, name in enumerate(task.shards[split]):
            src = task_dir / name
            if not src.is_file():
                raise DataError(f"shard {src} (listed in {task_dir / 'task.json'}) does not exist")
            expected = task.sha256.get(name)
            if expected and sha256_file(src) != expected:
                raise DataError(f"shard {src} does not match its sha256 in task.json; rebuild it "
                                "(python -m data_tools verify finds every such shard)")
            _place(src, folder / f"{i}.tar")
        (folder / "nshards.txt").write_text(f"{len(task.shards[split])}\n")
    if any("\n" in c for c in task.classnames):
        raise DataError(f"task '{task.name}': a class name holds a line break; classnames.txt is one name a line")
    (out / "classnames.txt").write_text("".join(f"{c}\n" for c in task.classnames), encoding="utf-8")
    prompts = task.eval_templates if templates == "eval" and task.eval_templates else [task.train_template]
    (out / "zeroshot_classification_templates.txt").write_text(
        "".join(t.replace("{}", "{c}") + "\n" for t in prompts), encoding="utf-8")
    (out / "dataset_type.txt").write_text("classification\n")
    return out
