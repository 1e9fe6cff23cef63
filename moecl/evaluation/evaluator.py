"""Accuracy-matrix rows: every test set of the sequence after each task, with oracle or DDAS routing.

Class heads come from open_clip's zero-shot classifier helper, computed with the text adapters of the route
each image takes, and cached per (label set, route) for the lifetime of one evaluator (one row: the adapters
change between rows).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from ..data import TaskInfo, check_eval_count, eval_batches, fill_template
from ..ddas import DDASSelector
from ..ddas.block import is_single_pass, single_pass

from ..routes import ZERO_SHOT
from .frozen import FrozenCache, SetFeatures


@dataclass
class LabelSet:
    """What a test set is scored against: its class names and prompt templates."""
    key: str
    classnames: list[str]
    templates: list[str]


@dataclass
class SetResult:
    correct: int = 0
    total: int = 0
    routes: dict[int, int] = field(default_factory=dict)  # route -> samples
    zero_shot_correct: Optional[int] = None  # the frozen backbone's own hits on the same images (zero_shot=True)

    @property
    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.total, 1)

    @property
    def zero_shot_accuracy(self) -> Optional[float]:
        return None if self.zero_shot_correct is None else 100.0 * self.zero_shot_correct / max(self.total, 1)


class _RoutedText:
    """The adapted model seen through open_clip's helper: ``encode_text`` with a fixed route."""

    def __init__(self, model, route: int):
        self.model, self.route = model, route

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # prompts encoded up to the longest prompt's EOT token (exact; MoECLIP.trim_prompts)
        return self.model.encode_text(self.model.trim_prompts(tokens), task_ids=self.route, normalize=normalize)


def label_set(task: TaskInfo, templates: str = "ensemble") -> LabelSet:
    tpl = task.eval_templates if templates == "ensemble" and task.eval_templates else [task.train_template]
    return LabelSet(f"{task.name}:{templates}", list(task.classnames), list(tpl))


def cil_label_set(tasks: list[TaskInfo], templates: str = "train") -> LabelSet:
    """Class-incremental: every class seen so far, in task order."""
    names = [c for t in tasks for c in t.classnames]
    tpl = [tasks[0].train_template] if templates == "train" else tasks[0].eval_templates
    return LabelSet("cil:" + "+".join(t.name for t in tasks), names, list(tpl))


def select_routes(images: Optional[torch.Tensor], plain: torch.Tensor, mode: str, oracle_route: int,
                  selector: Optional[DDASSelector], decision: str) -> torch.Tensor:
    """Route per image from its plain-CLIP features (or pixels, for the reference DDAS). ``mode`` oracle: every
    image takes ``oracle_route``; agnostic: DDAS decides (zero-shot without one)."""
    if mode == "oracle" or selector is None or selector.num_tasks == 0:
        route = oracle_route if mode == "oracle" else ZERO_SHOT
        return torch.full((plain.shape[0],), route, dtype=torch.long, device=plain.device)
    inputs = images if getattr(selector, "reads_images", False) else plain  # the reference DDAS reads pixels
    return selector.select(inputs, decision=decision).to(plain.device)


def routes_for(model, images: torch.Tensor, mode: str, oracle_route: int, selector: Optional[DDASSelector],
               decision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Route per image and the plain-CLIP features (computed once: DDAS reads them, zero-shot uses them).
    The one routing rule of evaluation and ``moecl predict`` (:func:`select_routes`)."""
    plain = model.encode_image(images, ZERO_SHOT, normalize=True).float()
    return select_routes(images, plain, mode, oracle_route, selector, decision), plain


@dataclass
class RouteMode:
    """How one evaluation mode routes one test set: ``kind`` oracle (``oracle_route`` for every image) or
    agnostic (``selector`` decides per sample or per batch)."""
    kind: str
    oracle_route: int
    selector: Optional[DDASSelector] = None
    decision: str = "sample"


@dataclass
class Work:
    """Images one row cost: through the frozen backbone (plain), through an adapted route (routed), and read
    from shards (decoded). The frozen backbone's features are reused across rows (``eval.frozen_cache``)."""
    plain: int = 0
    routed: int = 0
    decoded: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"plain": self.plain, "routed": self.routed, "decoded": self.decoded}

    @property
    def forwards(self) -> int:
        return self.plain + self.routed


class Evaluator:
    """Scores test sets for one row of the accuracy matrix (create a new one after adapters change).

    With a :class:`~moecl.evaluation.frozen.FrozenCache` (``frozen``) a test set is scored in every mode in
    one pass: the frozen backbone's features come from the cache after the first row, each image runs the
    adapted forward once per distinct route its modes chose (oracle and DDAS agreeing: once), zero-shot-routed
    images reuse the plain features, and a set with no routed image is scored without reading its shards.
    Without it every mode reads and encodes the set on its own (the published evaluator's cost).
    """

    def __init__(self, model, tokenizer, preprocess: Callable, *, device: torch.device, batch_size: int,
                 rank: int = 0, world_size: int = 1, workers: int = 0, autocast: Optional[Callable] = None,
                 max_samples: Optional[int] = None, collective_routes: bool = False,
                 max_bad_fraction: float = 0.01, frozen: Optional[FrozenCache] = None):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.device, self.batch_size = device, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.autocast = autocast or contextlib.nullcontext
        self.max_samples = max_samples
        self.max_bad_fraction = max_bad_fraction  # data.max_bad_fraction
        # with experts sharded over ranks every forward is a collective: every rank must run the same ones
        self.collective_routes = collective_routes
        self.frozen = frozen
        self._heads: dict[tuple[str, int], torch.Tensor] = {}
        self.read: dict[str, dict[str, int]] = {}  # "task/split" -> samples this rank read per shard
        self.work = Work()  # this rank's images, summed over every set scored (see reduce_work)

    def head(self, labels: LabelSet, route: int) -> torch.Tensor:
        """[D, C] normalised class embeddings of ``labels`` through route ``route``'s text adapters."""
        key = (labels.key, route)
        frozen_key = f"{labels.key}|{len(labels.classnames)}|{'|'.join(labels.templates)}"
        if route == ZERO_SHOT and self.frozen is not None and frozen_key in self.frozen.heads:
            return self.frozen.heads[frozen_key]
        if key not in self._heads:
            templates = [partial(lambda c, t: fill_template(t, c), t=t) for t in labels.templates]
            with torch.no_grad(), self.autocast():
                w = build_zero_shot_classifier(_RoutedText(self.model, route), self.tokenizer, labels.classnames,
                                               templates, num_classes_per_batch=max(1, 256 // len(templates)),
                                               device=self.device)
            self._heads[key] = w.float()
            if route == ZERO_SHOT and self.frozen is not None:
                self.frozen.heads[frozen_key] = self._heads[key]
        return self._heads[key]

    def routes_for(self, images: torch.Tensor, mode: str, oracle_route: int, selector: Optional[DDASSelector],
                   decision: str) -> tuple[torch.Tensor, torch.Tensor]:
        return routes_for(self.model, images, mode, oracle_route, selector, decision)

    def _stream(self, task: TaskInfo, split: str, skip: Optional[frozenset[str]] = None,
                shape: Optional[tuple[int, ...]] = None):
        return eval_batches(task, split, batch_size=self.batch_size, rank=self.rank, world_size=self.world_size,
                            workers=self.workers, preprocess=self.preprocess, max_samples=self.max_samples,
                            equal_batches=self.collective_routes, max_bad_fraction=self.max_bad_fraction,
                            skip_decode=skip, skipped_shape=shape)

    def _count_read(self, read: dict[str, int], keys) -> None:
        for key in keys:
            if key:  # padding rows of equal-batch streams have no key
                shard = key.split("/", 1)[0]
                read[shard] = read.get(shard, 0) + 1

    def _score(self, result: SetResult, labels: LabelSet, feats: torch.Tensor, routes: torch.Tensor,
               targets: torch.Tensor, label_offset: int) -> None:
        valid = targets >= 0  # padding rows of equal-batch streams carry label -1
        preds = torch.empty_like(targets)
        for r in routes.unique().tolist():
            m = routes == r
            preds[m] = (feats[m] @ self.head(labels, int(r))).argmax(dim=1)
        result.correct += int(((preds == targets + label_offset) & valid).sum())
        result.total += int(valid.sum())
        for r, n in zip(*routes[valid].unique(return_counts=True)):
            result.routes[int(r)] = result.routes.get(int(r), 0) + int(n)

    def _score_zero_shot(self, result: SetResult, labels: LabelSet, plain: torch.Tensor, targets: torch.Tensor,
                         label_offset: int) -> None:
        valid = targets >= 0
        zs = (plain @ self.head(labels, ZERO_SHOT)).argmax(dim=1)
        result.zero_shot_correct += int(((zs == targets + label_offset) & valid).sum())

    @torch.no_grad()
    def evaluate(self, task: TaskInfo, labels: LabelSet, *, mode: str, oracle_route: int,
                 selector: Optional[DDASSelector] = None, decision: str = "sample", label_offset: int = 0,
                 split: str = "test", trained: int = 0, zero_shot: bool = False) -> SetResult:
        """Top-1 accuracy of one test set in one mode, reading and encoding the set on its own.
        ``label_offset`` shifts labels into a bigger (CIL) label space. ``zero_shot``: also count what the
        untouched backbone (route -1) gets right on the same images, from the plain features computed anyway
        (meaningful while route -1 is the frozen CLIP)."""
        self.model.eval()
        result = SetResult(zero_shot_correct=0 if zero_shot else None)
        stream = self._stream(task, split)
        if self.collective_routes:  # heads of every route first, in the same order on every rank
            for r in [ZERO_SHOT, *range(trained)]:
                self.head(labels, r)
        read = self.read.setdefault(f"{task.name}/{split}", {})
        for images, targets, keys in stream:
            self._count_read(read, keys)
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device)
            n = images.shape[0]
            self.work.decoded += n
            with self.autocast():
                # issue 16 single-pass layout (ddas.feature=block): DDAS decides inside the one image forward
                one = single_pass(self.model, images, selector, decision) if mode != "oracle" else None
                if one is not None:
                    feats, routes, _ = one
                    self.work.routed += n  # one forward: the shared prefix, then each image's own tail
                    plain = None
                    if zero_shot:
                        plain = self.model.encode_image(images, ZERO_SHOT, normalize=True).float()
                        self.work.plain += n
                else:
                    routes, plain = self.routes_for(images, mode, oracle_route, selector, decision)
                    self.work.plain += n
                    if bool((routes >= 0).any()) or self.collective_routes:
                        feats = self.model.encode_image(images, routes, normalize=True).float()
                        self.work.routed += n
                    else:
                        feats = plain
            self._score(result, labels, feats, routes, targets, label_offset)
            if zero_shot:
                self._score_zero_shot(result, labels, plain, targets, label_offset)
        if self.max_samples is None:
            check_eval_count(stream)
        return self._reduce(result)

    # ---- every mode in one pass (frozen features reused) ------------------------------------------------
    def _settings(self) -> dict:
        with self.autocast():
            dtype = str(torch.get_autocast_dtype(self.device.type)) if torch.is_autocast_enabled(self.device.type) \
                else "float32"
        return {"rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "workers": self.workers, "max_samples": self.max_samples, "equal_batches": self.collective_routes,
                "transform": repr(self.preprocess), "device": self.device.type, "compute": dtype}

    def _agreed(self, have: bool) -> bool:
        """Every rank uses the cached features or none does (forwards stay collective-safe)."""
        if self.world_size == 1:
            return have
        import torch.distributed as dist
        t = torch.tensor([int(have)], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def _routed(self, images: torch.Tensor, plain: torch.Tensor, routes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Features per mode: the adapted forward once per distinct (image, route >= 0); plain elsewhere."""
        n = plain.shape[0]
        if self.collective_routes:  # every rank runs the same forwards: whole batches, as without the cache
            self.work.routed += n * len(routes)
            return [self.model.encode_image(images, r, normalize=True).float() for r in routes]
        where: dict[tuple[int, int], int] = {}
        for r in routes:
            for i, route in enumerate(r.tolist()):
                if route >= 0 and (i, route) not in where:
                    where[(i, route)] = len(where)
        if not where:
            return [plain for _ in routes]
        rows = torch.tensor([i for i, _ in where], dtype=torch.long, device=images.device)
        ids = torch.tensor([r for _, r in where], dtype=torch.long, device=images.device)
        adapted = self.model.encode_image(images.index_select(0, rows), ids, normalize=True).float()
        self.work.routed += len(where)
        out = []
        for r in routes:
            pos = [(i, where[(i, route)]) for i, route in enumerate(r.tolist()) if route >= 0]
            f = plain
            if pos:
                f = plain.clone()
                f[torch.tensor([i for i, _ in pos], device=f.device)] = \
                    adapted[torch.tensor([p for _, p in pos], device=f.device)]
            out.append(f)
        return out

    @torch.no_grad()
    def evaluate_set(self, task: TaskInfo, labels: LabelSet, modes: list[RouteMode], *, split: str = "test",
                     trained: int = 0, label_offset: int = 0, zero_shot: bool = False) -> list[SetResult]:
        """One test set in every mode (one :class:`SetResult` per mode, in order). ``zero_shot``: the first
        mode's result also counts the untouched backbone's hits."""
        if self.frozen is None or any(m.kind != "oracle" and is_single_pass(m.selector) for m in modes):
            # each mode on its own (the single-pass layout routes inside its one forward: nothing to share)
            return [self.evaluate(task, labels, mode=m.kind, oracle_route=m.oracle_route, selector=m.selector,
                                  decision=m.decision, label_offset=label_offset, split=split, trained=trained,
                                  zero_shot=zero_shot and k == 0) for k, m in enumerate(modes)]
        self.model.eval()
        results = [SetResult(zero_shot_correct=0 if zero_shot and k == 0 else None) for k in range(len(modes))]
        if self.collective_routes:  # heads of every route first, in the same order on every rank
            for r in [ZERO_SHOT, *range(trained)]:
                self.head(labels, r)
        read = self.read.setdefault(f"{task.name}/{split}", {})
        key = self.frozen.key(task, split, self._settings())
        cached = self.frozen.get(key)
        if not self._agreed(cached is not None):
            cached = None
        pixels = any(m.kind != "oracle" and getattr(m.selector, "reads_images", False) for m in modes)
        skip: Optional[frozenset[str]] = None
        if cached is not None and not pixels and not self.collective_routes:
            plans = [[select_routes(None, p, m.kind, m.oracle_route, m.selector, m.decision) for m in modes]
                     for p in cached.plain]
            # images no mode routes are not decoded (their features are cached); the others are
            skip = frozenset(k for keys, plan in zip(cached.keys, plans)
                             for i, k in enumerate(keys) if not any(int(r[i]) >= 0 for r in plan))
            if not any(bool((r >= 0).any()) for plan in plans for r in plan):  # nothing routed: no reading at all
                for plain, targets, plan in zip(cached.plain, cached.targets, plans):
                    for res, r in zip(results, plan):
                        self._score(res, labels, plain, r, targets, label_offset)
                    if zero_shot:
                        self._score_zero_shot(results[0], labels, plain, targets, label_offset)
                for shard, n in cached.read.items():
                    read[shard] = read.get(shard, 0) + n
                return [self._reduce(r) for r in results]
        fresh = SetFeatures([], [], [], {}) if cached is None else None
        stream = self._stream(task, split, skip, cached.image_shape if skip else None)
        for b, (images, targets, keys) in enumerate(stream):
            self._count_read(read, keys)
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device)
            n = images.shape[0]
            self.work.decoded += n - (sum(k in skip for k in keys) if skip else 0)
            with self.autocast():
                if cached is not None and b < len(cached.keys) and cached.keys[b] == list(keys):
                    plain = cached.plain[b].to(self.device)
                else:
                    plain = self.model.encode_image(images, ZERO_SHOT, normalize=True).float()
                    self.work.plain += n
                    if cached is not None:  # the stream should be deterministic: never trust a misaligned entry
                        raise RuntimeError(f"frozen-feature cache of {task.name}/{split}: batch {b} holds other "
                                           "samples than the stream yields; delete RUN/cache/frozen and rerun")
                routes = [select_routes(images, plain, m.kind, m.oracle_route, m.selector, m.decision) for m in modes]
                feats = self._routed(images, plain, routes)
            for res, f, r in zip(results, feats, routes):
                self._score(res, labels, f, r, targets, label_offset)
            if zero_shot:
                self._score_zero_shot(results[0], labels, plain, targets, label_offset)
            if fresh is not None:
                fresh.image_shape = tuple(images.shape[1:])
                fresh.keys.append(list(keys))
                fresh.targets.append(targets.cpu())
                fresh.plain.append(plain.cpu())
        if self.max_samples is None:
            check_eval_count(stream)
        if fresh is not None:
            fresh.read = dict(read)
            self.frozen.put(key, fresh)
        return [self._reduce(r) for r in results]

    def reduce_work(self) -> Work:
        """The images every rank's scoring cost, summed over ranks."""
        if self.world_size == 1:
            return Work(**self.work.as_dict())
        import torch.distributed as dist
        t = torch.tensor([self.work.plain, self.work.routed, self.work.decoded], dtype=torch.long)
        dist.all_reduce(t)
        return Work(*(int(v) for v in t.tolist()))

    def _reduce(self, result: SetResult) -> SetResult:
        if self.world_size == 1:
            return result
        import torch.distributed as dist
        # one vector length on every rank: route ids up to the largest any rank saw (ranks see different routes)
        top = torch.tensor([max(result.routes, default=ZERO_SHOT)], dtype=torch.long)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        keys = list(range(ZERO_SHOT, int(top) + 1))
        zs = result.zero_shot_correct
        t = torch.tensor([result.correct, result.total, zs or 0] + [result.routes.get(k, 0) for k in keys],
                         dtype=torch.long)
        dist.all_reduce(t)
        routes = {k: int(v) for k, v in zip(keys, t[3:].tolist()) if v}
        return SetResult(int(t[0]), int(t[1]), routes, None if zs is None else int(t[2]))


def confusion_row(result: SetResult, num_tasks: int) -> list[int]:
    """Samples of one test set per route: tasks 0..T-1, then zero-shot."""
    return [result.routes.get(r, 0) for r in range(num_tasks)] + [result.routes.get(ZERO_SHOT, 0)]
