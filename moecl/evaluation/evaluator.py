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
from ..ddas.block import single_pass

ZERO_SHOT = -1


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


class Evaluator:
    """Scores test sets for one row of the accuracy matrix (create a new one after adapters change)."""

    def __init__(self, model, tokenizer, preprocess: Callable, *, device: torch.device, batch_size: int,
                 rank: int = 0, world_size: int = 1, workers: int = 0, autocast: Optional[Callable] = None,
                 max_samples: Optional[int] = None, collective_routes: bool = False,
                 max_bad_fraction: float = 0.01):
        self.model, self.tokenizer, self.preprocess = model, tokenizer, preprocess
        self.device, self.batch_size = device, batch_size
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.autocast = autocast or contextlib.nullcontext
        self.max_samples = max_samples
        self.max_bad_fraction = max_bad_fraction  # data.max_bad_fraction
        # with experts sharded over ranks every forward is a collective: every rank must run the same ones
        self.collective_routes = collective_routes
        self._heads: dict[tuple[str, int], torch.Tensor] = {}
        self.read: dict[str, dict[str, int]] = {}  # "task/split" -> samples this rank read per shard

    def head(self, labels: LabelSet, route: int) -> torch.Tensor:
        """[D, C] normalised class embeddings of ``labels`` through route ``route``'s text adapters."""
        key = (labels.key, route)
        if key not in self._heads:
            templates = [partial(lambda c, t: fill_template(t, c), t=t) for t in labels.templates]
            with torch.no_grad(), self.autocast():
                w = build_zero_shot_classifier(_RoutedText(self.model, route), self.tokenizer, labels.classnames,
                                               templates, num_classes_per_batch=max(1, 256 // len(templates)),
                                               device=self.device)
            self._heads[key] = w.float()
        return self._heads[key]

    def routes_for(self, images: torch.Tensor, mode: str, oracle_route: int, selector: Optional[DDASSelector],
                   decision: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Route per image and the plain-CLIP features (computed once: DDAS reads them, zero-shot uses them)."""
        plain = self.model.encode_image(images, ZERO_SHOT, normalize=True).float()
        if mode == "oracle" or selector is None or selector.num_tasks == 0:
            route = oracle_route if mode == "oracle" else ZERO_SHOT
            return torch.full((images.shape[0],), route, dtype=torch.long, device=images.device), plain
        inputs = images if getattr(selector, "reads_images", False) else plain  # the reference DDAS reads pixels
        return selector.select(inputs, decision=decision).to(images.device), plain

    @torch.no_grad()
    def evaluate(self, task: TaskInfo, labels: LabelSet, *, mode: str, oracle_route: int,
                 selector: Optional[DDASSelector] = None, decision: str = "sample", label_offset: int = 0,
                 split: str = "test", trained: int = 0, zero_shot: bool = False) -> SetResult:
        """Top-1 accuracy of one test set. ``label_offset`` shifts labels into a bigger (CIL) label space.
        ``zero_shot``: also count what the untouched backbone (route -1) gets right on the same images, from
        the plain features computed anyway (meaningful while route -1 is the frozen CLIP)."""
        self.model.eval()
        result = SetResult(zero_shot_correct=0 if zero_shot else None)
        stream = eval_batches(task, split, batch_size=self.batch_size, rank=self.rank, world_size=self.world_size,
                              workers=self.workers, preprocess=self.preprocess, max_samples=self.max_samples,
                              equal_batches=self.collective_routes, max_bad_fraction=self.max_bad_fraction)
        if self.collective_routes:  # heads of every route first, in the same order on every rank
            for r in [ZERO_SHOT, *range(trained)]:
                self.head(labels, r)
        read = self.read.setdefault(f"{task.name}/{split}", {})
        for images, targets, keys in stream:
            for key in keys:
                if key:  # padding rows of equal-batch streams have no key
                    read[key.split("/", 1)[0]] = read.get(key.split("/", 1)[0], 0) + 1
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device)
            with self.autocast():
                # issue 16 single-pass layout (ddas.feature=block): DDAS decides inside the one image forward
                one = single_pass(self.model, images, selector, decision) if mode != "oracle" else None
                if one is not None:
                    feats, routes, _ = one
                    plain = self.model.encode_image(images, ZERO_SHOT, normalize=True).float() if zero_shot else None
                else:
                    routes, plain = self.routes_for(images, mode, oracle_route, selector, decision)
                    if bool((routes >= 0).any()) or self.collective_routes:
                        feats = self.model.encode_image(images, routes, normalize=True).float()
                    else:
                        feats = plain
            valid = targets >= 0  # padding rows of equal-batch streams carry label -1
            preds = torch.empty_like(targets)
            for r in routes.unique().tolist():
                m = routes == r
                preds[m] = (feats[m] @ self.head(labels, int(r))).argmax(dim=1)
            result.correct += int(((preds == targets + label_offset) & valid).sum())
            if zero_shot:
                zs = (plain @ self.head(labels, ZERO_SHOT)).argmax(dim=1)
                result.zero_shot_correct += int(((zs == targets + label_offset) & valid).sum())
            result.total += int(valid.sum())
            for r, n in zip(*routes[valid].unique(return_counts=True)):
                result.routes[int(r)] = result.routes.get(int(r), 0) + int(n)
        if self.max_samples is None:
            check_eval_count(stream)
        return self._reduce(result)

    def _reduce(self, result: SetResult) -> SetResult:
        if self.world_size == 1:
            return result
        import torch.distributed as dist
        keys = sorted(set(range(-1, 64)) | set(result.routes))
        zs = result.zero_shot_correct
        t = torch.tensor([result.correct, result.total, zs or 0] + [result.routes.get(k, 0) for k in keys],
                         dtype=torch.long)
        dist.all_reduce(t)
        routes = {k: int(v) for k, v in zip(keys, t[3:].tolist()) if v}
        return SetResult(int(t[0]), int(t[1]), routes, None if zs is None else int(t[2]))


def confusion_row(result: SetResult, num_tasks: int) -> list[int]:
    """Samples of one test set per route: tasks 0..T-1, then zero-shot."""
    return [result.routes.get(r, 0) for r in range(num_tasks)] + [result.routes.get(ZERO_SHOT, 0)]
