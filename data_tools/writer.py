"""Writing one split of one task into WebDataset tar shards: planned, parallel, resumable, checksummed.

Items are shuffled (seeded) and cut into shards by sample count and/or estimated bytes before anything is
written, so a shard's content is fixed by its plan. Each shard is written by a pool worker to a temporary
name and renamed when complete, with a small progress record (fingerprint, count, sha256, bad images)
beside it: a re-run skips every shard whose record matches its plan, and rewrites the rest.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image

from moecl.data.decode import image_error, to_rgb

FORMAT_VERSION = 2
PROGRESS_DIR = ".progress"


@dataclass
class Item:
    """One sample to write: where its image comes from, its label, and what goes into its ``.json``.

    Exactly one image source: ``path`` (a file, kept byte-for-byte when PNG/JPEG), ``data`` (encoded image
    bytes) or ``make`` (a picklable callable returning a PIL image, e.g. the synthetic world's painter).
    """
    label: int
    source: str
    path: Optional[str] = None
    data: Optional[bytes] = None
    make: Optional[Callable[[], Image.Image]] = None
    meta: dict[str, Any] = field(default_factory=dict)
    text: Optional[str] = None
    est_bytes: Optional[int] = None

    def estimated_bytes(self) -> int:
        if self.est_bytes is not None:
            return self.est_bytes
        if self.data is not None:
            return len(self.data)
        if self.path is not None:
            try:
                return os.path.getsize(self.path)
            except OSError:
                return 0
        return 4096


@dataclass
class WriteOptions:
    """How shards are cut and images stored."""
    shard_size: int = 1000              # samples per shard (at most)
    shard_bytes: Optional[int] = None   # estimated bytes per shard (at most), if set
    workers: int = 0                    # processes writing shards in parallel (0 = in this process)
    progress: bool = True
    image_format: str = "keep"          # keep (PNG/JPEG bytes as they are), png or jpg
    resize: Optional[int] = None        # shrink images whose shorter side is larger than this
    jpeg_quality: int = 95
    shuffle_seed: Optional[int] = 0     # order of samples across shards (None: keep the given order)

    def encoding_key(self) -> dict[str, Any]:
        return {"image_format": self.image_format, "resize": self.resize, "jpeg_quality": self.jpeg_quality}


@dataclass
class SplitResult:
    """What was written for one split: shard names in order, their sample counts and sha256, bad images."""
    shards: list[str]
    counts: list[int]
    sha256: list[str]
    bad: list[dict[str, str]]

    @property
    def total(self) -> int:
        return sum(self.counts)


def parse_bytes(text: str | int | None) -> Optional[int]:
    """``"500MB"`` -> 500_000_000; ``"1GiB"`` -> 2**30; plain numbers are bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot read a size from {text!r}; use e.g. 500MB or 1GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(m.group(2) or " "))


# ---------------------------------------------------------------------------------------------------------
# Encoding one image

def _encode(img: Image.Image, fmt: str, quality: int) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if fmt == "jpg":
        img = to_rgb(img)
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg"
    if img.mode not in ("RGB", "L", "RGBA"):
        img = to_rgb(img)  # 16-bit / float: scaled by range, not clipped to white
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), "png"


def load_image_bytes(item: Item, opts: WriteOptions) -> tuple[bytes, str]:
    """Image bytes and extension to store for an item; raises on unreadable images."""
    if item.make is not None:
        return _encode(item.make(), "jpg" if opts.image_format == "jpg" else "png", opts.jpeg_quality)
    raw = item.data if item.data is not None else Path(item.path).read_bytes()
    with Image.open(io.BytesIO(raw)) as img:
        fmt = img.format
        img.load()  # full decode: a truncated or corrupt file fails here, at build time
        if opts.resize and min(img.size) > opts.resize:
            w, h = img.size
            s = opts.resize / min(w, h)
            small = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
            target = opts.image_format if opts.image_format != "keep" else ("jpg" if fmt == "JPEG" else "png")
            return _encode(small, target, opts.jpeg_quality)
        if opts.image_format == "keep" and fmt in ("JPEG", "PNG"):
            return raw, "jpg" if fmt == "JPEG" else "png"
        if opts.image_format == "jpg" and fmt == "JPEG":
            return raw, "jpg"
        if opts.image_format == "png" and fmt == "PNG":
            return raw, "png"
        return _encode(img, "jpg" if opts.image_format == "jpg" else "png", opts.jpeg_quality)


# ---------------------------------------------------------------------------------------------------------
# Planning and writing shards

def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def plan_shards(items: list[Item], opts: WriteOptions) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` cutting items into shards by count and estimated bytes."""
    if opts.shard_size < 1:
        raise ValueError(f"shard size must be >= 1 sample, got {opts.shard_size}")
    chunks, start, size = [], 0, 0
    for i, item in enumerate(items):
        if i > start and (i - start >= opts.shard_size
                          or (opts.shard_bytes is not None and size + item.estimated_bytes() > opts.shard_bytes)):
            chunks.append((start, i))
            start, size = i, 0
        size += item.estimated_bytes() + 1536  # tar headers of the image, .cls and .json members
    if start < len(items):
        chunks.append((start, len(items)))
    return chunks


def _fingerprint(split: str, index: int, start: int, items: list[Item], classnames: list[str],
                 opts: WriteOptions) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, split, index, start, opts.encoding_key()]).encode())
    for it in items:
        name = classnames[it.label] if 0 <= it.label < len(classnames) else None
        h.update(json.dumps([it.source, it.label, name, it.meta, it.text], sort_keys=True, default=str).encode())
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a pool worker: write one shard to a temp name, rename it, record its progress."""
    import webdataset as wds

    task_dir, split, index = Path(job["task_dir"]), job["split"], job["index"]
    items: list[Item] = job["items"]
    opts: WriteOptions = job["opts"]
    classnames: list[str] = job["classnames"]
    final = task_dir / shard_name(split, index)
    tmp = task_dir / f".{final.name}.tmp-{os.getpid()}"
    bad: list[dict[str, str]] = []
    count = 0
    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)  # int mtime: reproducible, no PAX header per member
            for k, item in enumerate(items):
                try:
                    data, ext = load_image_bytes(item, opts)
                except Exception as e:  # noqa: BLE001 - anything PIL or the file system raises
                    bad.append({"source": item.source, "error": image_error(e, str(item.source))})
                    continue
                meta = {"label": item.label, "classname": classnames[item.label], "source": item.source,
                        **item.meta}
                sample = {"__key__": f"{job['start'] + k:08d}", ext: data, "cls": str(item.label).encode(),
                          "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}
                if item.text is not None:
                    sample["txt"] = item.text.encode("utf-8")
                writer.write(sample)
                count += 1
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    record = {"fingerprint": job["fingerprint"], "shard": final.name, "count": count, "sha256": digest,
              "bytes": final.stat().st_size, "bad": bad}
    _write_json_atomic(task_dir / PROGRESS_DIR / f"{final.name}.json", record)
    return record


def _completed(task_dir: Path, name: str, fingerprint: str) -> Optional[dict[str, Any]]:
    rec_path = task_dir / PROGRESS_DIR / f"{name}.json"
    shard = task_dir / name
    if not (rec_path.is_file() and shard.is_file()):
        return None
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("fingerprint") != fingerprint or rec.get("bytes") != shard.stat().st_size:
        return None
    return rec


def write_split(task_dir: str | Path, split: str, items: list[Item], classnames: list[str],
                opts: WriteOptions, desc: Optional[str] = None) -> SplitResult:
    """Write ``items`` as ``task_dir/<split>-NNNNNN.tar`` shards; complete shards from a past run are kept."""
    from tqdm import tqdm

    task_dir = Path(task_dir)
    (task_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    for it in items:
        if not 0 <= it.label < len(classnames):
            raise ValueError(f"{it.source}: label {it.label} outside 0..{len(classnames) - 1}")
    items = list(items)
    if opts.shuffle_seed is not None:
        random.Random(opts.shuffle_seed).shuffle(items)
    chunks = plan_shards(items, opts)
    records: dict[int, dict[str, Any]] = {}
    jobs = []
    for index, (start, stop) in enumerate(chunks):
        fp = _fingerprint(split, index, start, items[start:stop], classnames, opts)
        rec = _completed(task_dir, shard_name(split, index), fp)
        if rec is not None:
            records[index] = rec
        else:
            jobs.append({"task_dir": str(task_dir), "split": split, "index": index, "start": start,
                         "items": items[start:stop], "opts": opts, "classnames": classnames, "fingerprint": fp})
    # Shards of an earlier, larger plan would be picked up by brace patterns: remove them.
    pattern = re.compile(rf"^{re.escape(split)}-(\d{{6}})\.tar$")
    for p in task_dir.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) >= len(chunks):
            p.unlink()
            (task_dir / PROGRESS_DIR / f"{p.name}.json").unlink(missing_ok=True)
    bar = tqdm(total=len(items), initial=sum(stop - start for i, (start, stop) in enumerate(chunks) if i in records),
               unit="img", desc=desc or f"{task_dir.name}/{split}", disable=not opts.progress, leave=False)
    try:
        if opts.workers > 0 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=min(opts.workers, len(jobs))) as pool:
                futures = {pool.submit(_write_shard, job): job for job in jobs}
                for fut in as_completed(futures):
                    job = futures[fut]
                    records[job["index"]] = fut.result()
                    bar.update(len(job["items"]))
        else:
            for job in jobs:
                records[job["index"]] = _write_shard(job)
                bar.update(len(job["items"]))
    finally:
        bar.close()
    ordered = [records[i] for i in range(len(chunks))]
    return SplitResult(shards=[r["shard"] for r in ordered], counts=[int(r["count"]) for r in ordered],
                       sha256=[r["sha256"] for r in ordered], bad=[b for r in ordered for b in r["bad"]])
