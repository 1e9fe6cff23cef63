"""Data throughput: shard writing and streaming (decode + augment) at 224 px and 32 px, images/s per worker.

    python -m benchmarks.data_throughput [--images-224 N] [--images-32 N] [--workers 0,1,2] [--json FILE]

Writes a throwaway dataset in a temporary folder (photo-like 320x240 JPEGs for the 224 px case, the
synthetic world's 32 px PNGs for the 32 px case), times ``data_tools`` shard writing and
``moecl.data.train_batches`` / ``eval_batches``, prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools.synthetic import render
from data_tools.taskfile import write_task
from data_tools.writer import Item, WriteOptions, write_split
from moecl.data import eval_batches, make_transforms, read_task, train_batches


def _photo(i: int) -> bytes:
    """A 320x240 JPEG with photo-like statistics (smooth gradients + noise), ~20 kB."""
    rng = np.random.default_rng(i)
    base = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize((320, 240), Image.BICUBIC)
    arr = np.clip(np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (240, 320, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sources(tmp: Path, kind: str, n: int) -> list[Item]:
    folder = tmp / f"src{kind}"
    folder.mkdir()
    items = []
    for i in range(n):
        if kind == "224":
            path = folder / f"{i}.jpg"
            path.write_bytes(_photo(i))
        else:
            path = folder / f"{i}.png"
            render("shapes", i % 8, 0, "train", i, 32).save(path)
        items.append(Item(label=i % 10, source=path.name, path=str(path)))
    return items


def bench_write(tmp: Path, items: list[Item], kind: str, workers: int) -> dict:
    task_dir = tmp / f"w{kind}_{workers}"
    opts = WriteOptions(shard_size=max(1, len(items) // 8), workers=workers, progress=False)
    t0 = time.perf_counter()
    res = write_split(task_dir, "train", items, [str(c) for c in range(10)], opts)
    dt = time.perf_counter() - t0
    write_task(task_dir, name="bench", classnames=[str(c) for c in range(10)], train_template="a {}.",
               eval_templates=["a {}."], splits={"train": res})
    ips = res.total / dt
    return {"stage": "write", "px": kind, "workers": workers, "images": res.total, "seconds": round(dt, 3),
            "images_per_s": round(ips, 1), "images_per_s_per_worker": round(ips / max(1, workers), 1),
            "_task": str(task_dir)}


def bench_stream(task_dir: str, kind: str, mode: str, workers: int, batches: int, batch_size: int) -> dict:
    task = read_task(task_dir)
    size = 224 if kind == "224" else 32
    train_tf, eval_tf = make_transforms(size, (0.9, 1.0))
    if mode == "train":
        stream = train_batches(task, batch_size=batch_size, workers=workers, seed=0, preprocess=train_tf,
                               shuffle_buffer=256)
    else:
        stream = eval_batches(task, "train", batch_size=batch_size, workers=workers, preprocess=eval_tf)
    it = iter(stream)
    next(it)  # start-up (worker processes) not timed
    n, t0 = 0, time.perf_counter()
    for _, batch in zip(range(batches), it):
        n += batch[0].shape[0]
    dt = time.perf_counter() - t0
    del it
    ips = n / dt
    return {"stage": f"stream-{mode}", "px": kind, "workers": workers, "images": n, "seconds": round(dt, 3),
            "images_per_s": round(ips, 1), "images_per_s_per_worker": round(ips / max(1, workers), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images-224", type=int, default=800, help="source images for the 224 px case")
    p.add_argument("--images-32", type=int, default=4000, help="source images for the 32 px case")
    p.add_argument("--workers", default="0,1,2", help="worker counts to time (comma-separated)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", default=None, help="also append the JSON line to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, n in (("224", args.images_224), ("32", args.images_32)):
            items = _sources(tmp, kind, n)
            tasks = {}
            for w in workers:
                r = bench_write(tmp, items, kind, w)
                tasks[w] = r.pop("_task")
                rows.append(r)
            task_dir = tasks[workers[0]]
            for mode in ("train", "eval"):
                for w in workers:
                    max_batches = max(2, (n // args.batch_size) - 2)
                    rows.append(bench_stream(task_dir, kind, mode, w, max_batches, args.batch_size))
    print(f"{'stage':<14}{'px':>5}{'workers':>9}{'images':>8}{'img/s':>10}{'img/s/worker':>14}")
    for r in rows:
        print(f"{r['stage']:<14}{r['px']:>5}{r['workers']:>9}{r['images']:>8}{r['images_per_s']:>10}"
              f"{r['images_per_s_per_worker']:>14}")
    record = {"benchmark": "data_throughput", "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "results": rows}
    line = json.dumps(record)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
