"""Per-task batch streams: an infinite shuffled train stream and a finite exactly-once eval stream.

Train: shards drawn with replacement (or shuffled per epoch and split by rank and worker), a sample
shuffle buffer, decode, the caller's preprocessing, batches. Every rank yields batches forever, so any
fixed number of steps is the same on every rank (no hang at the end of an epoch).

Eval: shards (or, when there are fewer shards than ranks x workers, sample positions) are assigned to
(rank, worker) slots deterministically, so every sample is seen exactly once across all ranks and workers;
after the pass the count is checked against task.json. Each batch carries its sample keys.

Loader workers send count deltas with their batches: ``stream.stats`` in the main process is exact.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError
from .decode import BadSample, decode_json, decode_label, decode_sample_image, decode_text
from .shards import SKIP_KEY, ShardError, ShardLimits, expand_urls, read_shard
from .stats import StreamStats, bad_event
from .task import TaskInfo, read_task

log = logging.getLogger("moecl.data")

Preprocess = Callable[[Image.Image], torch.Tensor]
_WARNED: set = set()  # (stream, slots) already warned about, so a per-task eval loop logs it once


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _shard_name(url: str) -> str:
    tail = url.rstrip(" -").split()[-1] if url.startswith("pipe:") else url
    return tail.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------------------
# Which samples a (rank, worker) slot reads

class _Assignment:
    """Deterministic split of shards (or sample positions) over ``slots`` readers.

    ``shard`` mode: shard i belongs to slot ``i % slots``. ``sample`` mode (fewer shards than slots):
    every slot reads every shard and keeps global positions ``g`` with ``g % slots == slot``. A cap
    (``max_samples``) keeps global positions ``g < cap`` only.
    """

    def __init__(self, counts: Optional[list[int]], num_shards: int, slots: int, cap: Optional[int]):
        self.counts = counts
        self.num_shards = num_shards
        self.slots = slots
        self.mode = "shard" if num_shards >= slots else "sample"
        self.cap = cap
        self.offsets: Optional[list[int]] = None
        if counts is not None:
            self.offsets = [0]
            for c in counts[:-1]:
                self.offsets.append(self.offsets[-1] + c)

    def global_pos(self, shard: int, pos: int) -> int:
        return self.offsets[shard] + pos if self.offsets is not None else shard + pos

    def shards_for(self, slot: int) -> list[int]:
        shards = range(self.num_shards)
        if self.mode == "shard":
            shards = [i for i in shards if i % self.slots == slot]
        if self.cap is not None and self.offsets is not None:
            shards = [i for i in shards if self.offsets[i] < self.cap]
        return list(shards)

    def keeps(self, slot: int, shard: int, pos: int) -> bool:
        g = self.global_pos(shard, pos)
        if self.cap is not None and self.offsets is not None and g >= self.cap:
            return False
        return self.mode == "shard" or g % self.slots == slot

    def kept_between(self, slot: int, shard: int, start: int, stop: int) -> int:
        """How many positions in [start, stop) of a shard this slot keeps (needs counts)."""
        if self.offsets is None:
            return 0
        lo, hi = self.offsets[shard] + start, self.offsets[shard] + stop
        if self.cap is not None:
            hi = min(hi, self.cap)
        if hi <= lo:
            return 0
        if self.mode == "shard":
            return hi - lo if shard % self.slots == slot else 0
        first = lo + ((slot - lo) % self.slots)
        return 0 if first >= hi else (hi - 1 - first) // self.slots + 1

    def expected(self, slot: int) -> Optional[int]:
        if self.counts is None:
            return None
        return sum(self.kept_between(slot, i, 0, self.counts[i]) for i in range(self.num_shards))


# ---------------------------------------------------------------------------------------------------------
# The worker side

class _ShardDataset(IterableDataset):
    """Runs inside each loader worker: read assigned shards, decode, preprocess, batch."""

    def __init__(self, *, urls: list[str], counts: Optional[list[int]], mode: str, batch_size: int, rank: int,
                 world_size: int, seed: int, preprocess: Preprocess, shuffle_buffer: int, resampled: bool,
                 num_classes: Optional[int], where: str, max_samples: Optional[int] = None,
                 captions: bool = False, classnames: Optional[list[str]] = None,
                 limits: Optional[ShardLimits] = None, local: bool = True):
        super().__init__()
        self.limits, self.local = limits or ShardLimits(), local
        self.urls, self.counts, self.mode = urls, counts, mode
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.preprocess, self.shuffle_buffer, self.resampled = preprocess, shuffle_buffer, resampled
        self.num_classes, self.where, self.max_samples, self.captions = num_classes, where, max_samples, captions
        self.classnames = classnames
        self._events: list[dict[str, Any]] = []
        self.skip_decode: frozenset[str] = frozenset()  # eval: keys kept in place without decoding their image
        self.skipped_shape: Optional[tuple[int, ...]] = None

    # -- reading ------------------------------------------------------------------------------------------
    def _read(self, shard: int, keep: Optional[Callable[[int, int], bool]],
              missing: Callable[[int, int], int]) -> Iterator[tuple[str, dict[str, Any]]]:
        """(name/key, raw sample) pairs of one shard that ``keep(shard, pos)`` selects; losses -> events."""
        url = self.urls[shard]
        name = _shard_name(url)
        expected = self.counts[shard] if self.counts is not None else None
        pos = 0
        try:
            for raw in read_shard(url, self.limits, local=self.local):
                if expected is not None and pos >= expected:
                    raise DataError(f"{self.where}: shard {url} holds more samples than task.json says "
                                    f"({expected}); the shard was replaced after task.json was written: "
                                    "rebuild the task or run `python -m data_tools verify`")
                if keep is None or keep(shard, pos):
                    yield f"{name}/{raw['__key__']}", raw
                pos += 1
        except ShardError as e:
            lost = missing(shard, pos) if expected is not None else 1
            if lost:
                self._events.append(bad_event(url, None, f"shard unreadable after {e.completed} samples "
                                                         f"({e.reason})", lost))
            return
        if expected is not None and pos < expected:
            lost = missing(shard, pos)
            if lost:
                self._events.append(bad_event(url, None, f"shard ended after {pos} of {expected} samples "
                                                         "(truncated?)", lost))

    def _decode(self, key: str, raw: dict[str, Any], rng: random.Random, url: str):
        if key in self.skip_decode:  # its image is not needed: the label only (cheap), a zero image in its place
            try:
                target = decode_label(raw, self.num_classes)
                self._check_classname(raw, target, url, key)
            except BadSample as e:
                self._events.append(bad_event(url, key, str(e)))
                return None
            return torch.zeros(self.skipped_shape), target, key
        try:
            if SKIP_KEY in raw:  # a member over data.max_member_bytes: never read
                raise BadSample(raw[SKIP_KEY])
            image = decode_sample_image(raw)
            if self.captions:
                meta = decode_json(raw)
                options = meta.get("captions")
                target: Any = rng.choice(options) if isinstance(options, list) and options else decode_text(raw)
            else:
                target = decode_label(raw, self.num_classes)
                self._check_classname(raw, target, url, key)
            tensor = self.preprocess(image)
        except BadSample as e:
            self._events.append(bad_event(url, key, str(e)))
            return None
        return tensor, target, key

    def _check_classname(self, raw: dict[str, Any], label: int, url: str, key: str) -> None:
        """A sample whose stored class name disagrees with task.json means the shards and task.json come from
        different builds: every label could be wrong, so this stops the run instead of skipping."""
        if not self.classnames or "json" not in raw:
            return
        name = decode_json(raw).get("classname")
        if name is not None and name != self.classnames[label]:
            raise DataError(f"{self.where}: shard {url} sample {key} has label {label} = {name!r} but task.json "
                            f"names class {label} {self.classnames[label]!r}; the shards and task.json come from "
                            "different builds: rebuild the task")

    # -- batching -----------------------------------------------------------------------------------------
    def _batch(self, items: list) -> dict[str, Any]:
        images = torch.stack([t for t, _, _ in items])
        targets = [y for _, y, _ in items]
        out: dict[str, Any] = {"images": images, "keys": [k for _, _, k in items],
                               "stats": {"samples": len(items), "bad": self._take_events()}}
        out["targets"] = targets if self.captions else torch.tensor(targets, dtype=torch.long)
        return out

    def _take_events(self) -> list[dict[str, Any]]:
        events, self._events = self._events, []
        return events

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self._events = []
        if self.mode == "eval":
            yield from self._eval(worker, workers)
        else:
            yield from self._train(worker, workers)

    def _eval(self, worker: int, workers: int):
        slot, slots = self.rank * workers + worker, self.world_size * workers
        assign = _Assignment(self.counts, len(self.urls), slots, self.max_samples)
        rng = random.Random(_seed(self.seed, "eval", slot))
        missing = lambda shard, pos: assign.kept_between(slot, shard, pos, self.counts[shard])  # noqa: E731
        keep = lambda shard, pos: assign.keeps(slot, shard, pos)  # noqa: E731
        cap_local = None
        if self.max_samples is not None and self.counts is None:  # no per-shard counts: approximate cap
            cap_local = math.ceil(self.max_samples / slots)
        batch: list = []
        taken = 0
        for shard in assign.shards_for(slot):
            for key, raw in self._read(shard, keep, missing):
                if cap_local is not None and taken >= cap_local:
                    break
                item = self._decode(key, raw, rng, self.urls[shard])
                taken += 1
                if item is not None:
                    batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._batch(batch)
                    batch = []
                elif self._events:
                    yield {"stats": {"samples": 0, "bad": self._take_events()}}
        if batch:
            yield self._batch(batch)
        if self._events:
            yield {"stats": {"samples": 0, "bad": self._take_events()}}

    def _raw_stream(self, worker: int, workers: int, rng: random.Random):
        n = len(self.urls)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        assign = _Assignment(self.counts, n, slots, None)
        missing_all = lambda shard, pos: self.counts[shard] - pos  # noqa: E731
        missing_mine = lambda shard, pos: assign.kept_between(slot, shard, pos, self.counts[shard])  # noqa: E731
        epoch = 0
        fruitless = 0
        while True:
            got = 0
            if self.resampled:
                order, keep, missing = [rng.randrange(n) for _ in range(max(n, 1))], None, missing_all
            else:
                order = list(range(n))
                random.Random(_seed(self.seed, "epoch", epoch)).shuffle(order)
                if assign.mode == "shard":
                    order, keep, missing = order[slot::slots], None, missing_all
                else:
                    keep, missing = (lambda s, p: assign.keeps(slot, s, p)), missing_mine
            for shard in order:
                for key, raw in self._read(shard, keep, missing):
                    got += 1
                    yield key, raw, self.urls[shard]
                if not got and self._events:
                    yield None  # let the batcher flush loss events even when nothing decodes
            fruitless = fruitless + 1 if not got else 0
            if fruitless >= 3:
                raise DataError(f"{self.where}: no readable sample in three passes over shards "
                                f"{', '.join(self.urls[:4])}{' ...' if n > 4 else ''}; check them with "
                                "`python -m data_tools verify ROOT`")
            epoch += 1

    def _train(self, worker: int, workers: int):
        rng = random.Random(_seed(self.seed, "train", self.rank, worker))
        buffer: list = []
        batch: list = []
        for entry in self._raw_stream(worker, workers, rng):
            if entry is not None:
                if self.shuffle_buffer > 1:
                    buffer.append(entry)
                    if len(buffer) < self.shuffle_buffer:
                        entry = None
                    else:
                        i = rng.randrange(len(buffer))
                        buffer[i], buffer[-1] = buffer[-1], buffer[i]
                        entry = buffer.pop()
            if entry is not None:
                key, raw, url = entry
                item = self._decode(key, raw, rng, url)
                if item is not None:
                    batch.append(item)
            if len(batch) == self.batch_size:
                yield self._batch(batch)
                batch = []
            elif self._events:
                yield {"stats": {"samples": 0, "bad": self._take_events()}}


# ---------------------------------------------------------------------------------------------------------
# The main-process side

class _Batches:
    """An iterable of batches whose ``stats`` the caller reads; one DataLoader per pass."""

    def __init__(self, dataset: _ShardDataset, workers: int, max_bad_fraction: float, where: str,
                 seed: int, pin_memory: bool):
        self.dataset, self.workers, self.max_bad_fraction = dataset, workers, max_bad_fraction
        self.where, self.seed, self.pin_memory = where, seed, pin_memory
        self.stats = StreamStats()

    def _loader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
                          generator=torch.Generator().manual_seed(self.seed % (2 ** 63)),
                          prefetch_factor=2 if self.workers else None)

    def _items(self) -> Iterator[dict[str, Any]]:
        self.stats = StreamStats()
        for item in self._loader():
            self.stats.merge(item["stats"])
            self.stats.check(self.max_bad_fraction, self.where)
            if "images" in item:
                yield item


class TrainStream(_Batches):
    """Infinite ``(images [B,3,H,W] float, labels [B] long)`` batches (captions: a list of str).

    ``shards``: samples yielded so far in this pass, per shard name (which shards this rank trained on)."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        self.shards: dict[str, int] = {}
        for item in self._items():
            for key in item["keys"]:
                name = key.split("/", 1)[0]
                self.shards[name] = self.shards.get(name, 0) + 1
            yield item["images"], item["targets"]


class EvalStream(_Batches):
    """Finite ``(images, labels, keys)`` batches: each sample once over all ranks and workers."""

    def __init__(self, *args, task: Optional[TaskInfo], split: str, rank: int, world_size: int,
                 expected: Optional[int], expected_total: Optional[int], planned_batches: Optional[int],
                 equal_batches: bool, batch_size: int, **kw):
        super().__init__(*args, **kw)
        self.task, self.split, self.rank, self.world_size = task, split, rank, world_size
        self.expected, self.expected_total = expected, expected_total
        self.planned_batches, self.equal_batches, self.batch_size = planned_batches, equal_batches, batch_size
        self.batches = 0

    @property
    def seen(self) -> int:
        return self.stats.samples

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        self.batches = 0
        shape = None
        for item in self._items():
            self.batches += 1
            shape = item["images"].shape[1:]
            yield item["images"], item["targets"], item["keys"]
        self.stats.check(self.max_bad_fraction, self.where, final=True)
        self._check_count()
        if self.equal_batches and self.planned_batches is not None:
            if shape is None:
                shape = self.dataset.preprocess(Image.new("RGB", (64, 64))).shape
            while self.batches < self.planned_batches:
                self.batches += 1
                yield (torch.zeros((self.batch_size, *shape)), torch.full((self.batch_size,), -1, dtype=torch.long),
                       [""] * self.batch_size)

    def _check_count(self) -> None:
        if self.expected is None:
            return
        got = self.stats.samples + self.stats.bad_samples
        if got != self.expected:
            raise DataError(f"{self.where}: rank {self.rank} read {self.stats.samples} samples "
                            f"(+{self.stats.bad_samples} skipped) but task.json expects {self.expected} for this "
                            "rank; the shards changed after task.json was written: run "
                            "`python -m data_tools verify ROOT` and rebuild")
        if self.stats.bad_samples:
            log.warning("%s: %d sample(s) skipped as unusable (bad shards: %s)", self.where,
                        self.stats.bad_samples, ", ".join(self.stats.bad_shards))


def check_eval_count(stream: EvalStream, group: Any = None) -> int:
    """After a pass: the number of samples seen over all ranks (all-reduced when torch.distributed is up),
    checked against task.json; returns it. Skipped (corrupt) samples count as seen for the check."""
    seen, bad = stream.stats.samples, stream.stats.bad_samples
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([seen, bad], dtype=torch.long)
        torch.distributed.all_reduce(t, group=group)
        seen, bad = int(t[0]), int(t[1])
        expected = stream.expected_total
    else:
        expected = stream.expected_total if stream.world_size == 1 else stream.expected
    if expected is not None and seen + bad != expected:
        raise DataError(f"{stream.where}: {seen} samples seen (+{bad} skipped) over all ranks, task.json "
                        f"expects {expected}; run `python -m data_tools verify ROOT`")
    return seen


# ---------------------------------------------------------------------------------------------------------
# Public constructors

def _task_urls(task: TaskInfo, split: str) -> tuple[list[str], Optional[list[int]]]:
    urls = expand_urls(task.urls(split))
    counts = task.shard_counts.get(split)
    if counts is not None and len(counts) != len(urls):
        counts = None
    if not urls:
        raise DataError(f"task '{task.name}' split '{split}' has no shards ({task.root / 'task.json'}); rebuild it")
    if task.counts.get(split) == 0:
        raise DataError(f"task '{task.name}' split '{split}' has no samples ({task.root / 'task.json'} counts 0); "
                        "an empty task cannot be trained or evaluated: rebuild it or drop it from the sequence")
    return urls, counts


def _check_common(batch_size: int, rank: int, world_size: int, workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")


def train_batches(task: TaskInfo, split: str = "train", *, batch_size: int, rank: int = 0, world_size: int = 1,
                  workers: int = 0, seed: int = 0, preprocess: Preprocess, shuffle_buffer: int = 1000,
                  resampled: bool = True, max_bad_fraction: float = 0.01,
                  pin_memory: bool = False) -> TrainStream:
    """Infinite stream of ``(images [B,3,H,W], labels [B])`` for one rank (``batch_size`` is per rank).

    ``resampled``: shards drawn with replacement with a per-(seed, rank, worker) generator; otherwise
    shards are reshuffled each epoch (seeded) and split by rank and worker (by sample position when there
    are fewer shards than ranks x workers). Read ``.stats`` for skipped samples.
    """
    _check_common(batch_size, rank, world_size, workers)
    urls, counts = _task_urls(task, split)
    where = f"task '{task.name}' split '{split}'"
    ds = _ShardDataset(urls=urls, counts=counts, mode="train", batch_size=batch_size, rank=rank,
                       world_size=world_size, seed=seed, preprocess=preprocess, shuffle_buffer=shuffle_buffer,
                       resampled=resampled, num_classes=task.num_classes, where=where,
                       classnames=task.classnames, limits=task.limits, local=not task.remote)
    return TrainStream(ds, workers, max_bad_fraction, where, _seed(seed, rank, "loader"), pin_memory)


def eval_batches(task: TaskInfo, split: str = "test", *, batch_size: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, preprocess: Preprocess, max_samples: Optional[int] = None,
                 max_bad_fraction: float = 0.01, equal_batches: bool = False,
                 pin_memory: bool = False, skip_decode: Optional[frozenset[str]] = None,
                 skipped_shape: Optional[tuple[int, ...]] = None) -> EvalStream:
    """Finite stream of ``(images, labels, keys)``: every sample exactly once over all ranks and workers.

    With fewer shards than ``world_size x workers`` each loader reads every shard and keeps every
    ``slots``-th sample (logged). ``max_samples`` keeps the first N samples of the split (shards are
    written shuffled, so that is a random subset). ``equal_batches`` pads every rank to the same number of
    batches with label -1 / key "" batches (for collective ops such as expert-parallel all-to-all).
    After the pass the rank's count is checked against task.json; ``check_eval_count`` checks the total.
    ``skip_decode``: sample keys whose image is not needed (the evaluator holds their features): they keep
    their place in the batch with a zero image of ``skipped_shape`` and their label, and are not decoded.
    """
    _check_common(batch_size, rank, world_size, workers)
    if skip_decode and skipped_shape is None:
        raise ValueError("skip_decode needs skipped_shape (the shape of one preprocessed image)")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    urls, counts = _task_urls(task, split)
    where = f"task '{task.name}' split '{split}'"
    per_rank = max(workers, 1)
    slots = world_size * per_rank
    assign = _Assignment(counts, len(urls), slots, max_samples)
    if assign.mode == "sample" and (where, slots) not in _WARNED:
        _WARNED.add((where, slots))
        log.warning("%s: %d shard(s) for %d rank(s) x %d worker(s): every loader reads every shard and keeps "
                    "every %d-th sample (write more, smaller shards to avoid the extra reading)",
                    where, len(urls), world_size, per_rank, slots)
    expected = planned = None
    if counts is not None:
        per_slot = [assign.expected(s) for s in range(slots)]
        expected = sum(per_slot[rank * per_rank:(rank + 1) * per_rank])
        planned = max(sum(math.ceil(per_slot[r * per_rank + w] / batch_size) for w in range(per_rank))
                      for r in range(world_size))
    elif equal_batches and world_size > 1:
        log.warning("%s: task.json has no per-shard counts, so equal_batches cannot pad ranks to the same "
                    "number of batches; rebuild the task with python -m data_tools", where)
    total = task.counts.get(split)
    if max_samples is not None and total is not None:
        total = min(total, max_samples)
    ds = _ShardDataset(urls=urls, counts=counts, mode="eval", batch_size=batch_size, rank=rank,
                       world_size=world_size, seed=0, preprocess=preprocess, shuffle_buffer=0, resampled=False,
                       num_classes=task.num_classes, where=where, max_samples=max_samples,
                       classnames=task.classnames, limits=task.limits, local=not task.remote)
    ds.skip_decode, ds.skipped_shape = skip_decode or frozenset(), skipped_shape
    return EvalStream(ds, workers, max_bad_fraction, where, _seed(rank, "eval"), pin_memory, task=task,
                      split=split, rank=rank, world_size=world_size, expected=expected, expected_total=total,
                      planned_batches=planned, equal_batches=equal_batches, batch_size=batch_size)


def pretrain_batches(root: str, *, batch_size: int, rank: int = 0, world_size: int = 1, workers: int = 0,
                     seed: int = 0, preprocess: Preprocess, shuffle_buffer: int = 1000, resampled: bool = True,
                     max_bad_fraction: float = 0.01, split: str = "train",
                     pin_memory: bool = False) -> TrainStream:
    """Infinite ``(images, captions: list[str])`` batches of the synthetic world's image-caption set.

    ``root`` is the world folder (holding ``pretrain/``) or the pretrain task folder itself; each sample's
    caption is drawn (seeded) from the captions stored with it.
    """
    _check_common(batch_size, rank, world_size, workers)
    base = Path(root)
    task_dir = base / "pretrain" if (base / "pretrain" / "task.json").is_file() else base
    if not (task_dir / "task.json").is_file():
        raise DataError(f"no image-caption set under {base} (expected {base / 'pretrain' / 'task.json'}); "
                        f"build it with `python -m data_tools synthetic --out {base}`")
    task = read_task(task_dir)
    urls, counts = _task_urls(task, split)
    where = f"pretrain set {task_dir} split '{split}'"
    ds = _ShardDataset(urls=urls, counts=counts, mode="train", batch_size=batch_size, rank=rank,
                       world_size=world_size, seed=seed, preprocess=preprocess, shuffle_buffer=shuffle_buffer,
                       resampled=resampled, num_classes=None, where=where, captions=True,
                       limits=task.limits, local=not task.remote)
    return TrainStream(ds, workers, max_bad_fraction, where, _seed(seed, rank, "loader"), pin_memory)
