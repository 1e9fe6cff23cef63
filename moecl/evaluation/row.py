"""One row of the accuracy matrix: every test set scored in every routing mode, by one function.

The trainer (after each task), ``moecl eval`` (a saved checkpoint, also on other shards), the full
fine-tuning baseline's zero-shot row and the demo's pretraining check all call :func:`evaluate_row`; the
routing modes come from :func:`eval_modes` and the oracle route of a test set from the method table
(``moecl.methods``), matched by task name. MTIL: one accuracy per test set (held-out sets always take the
zero-shot route). CIL: one accuracy over every class seen so far (each seen task's images, labels shifted
into the union label space).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from ..methods import Method, get_method
from .evaluator import Evaluator, RouteMode, SetResult, Work, cil_label_set, confusion_row, label_set


@dataclass
class EvalMode:
    """One way of routing test images: ``kind`` oracle (task id given) or agnostic (DDAS)."""
    name: str  # oracle | agnostic | agnostic-reference
    kind: str  # oracle | agnostic
    selector: Any = None  # DDASSelector for agnostic kinds
    decision: str = "sample"  # DDAS decision: per sample or per batch (reference)


ORACLE = EvalMode("oracle", "oracle")


def eval_modes(cfg: Any, selector: Any) -> list[EvalMode]:
    """oracle / agnostic / agnostic-reference as ``cfg`` configures them (methods without DDAS: oracle only)."""
    if not get_method(cfg.train.method).ddas:
        return [EvalMode("oracle", "oracle")]
    have_ddas = cfg.ddas.enabled and selector is not None and selector.num_tasks > 0
    modes = []
    for mode in cfg.eval.modes:
        if mode == "oracle":
            modes.append(EvalMode("oracle", "oracle"))
        elif have_ddas:
            modes.append(EvalMode("agnostic", "agnostic", selector, cfg.ddas.decision))
    if cfg.eval.reference_ddas and have_ddas:
        modes.append(EvalMode("agnostic-reference", "agnostic", fixed_threshold(selector, cfg.ddas.fixed_threshold),
                              "batch"))
    return modes


def fixed_threshold(selector: Any, threshold: float) -> Any:
    """The same autoencoders with one hand-set threshold for every task (the reference setting)."""
    from ..ddas import DDASSelector
    if hasattr(selector, "with_threshold"):  # the reference selector rebuilds itself (AlexNet is not in its state)
        return selector.with_threshold(threshold)
    tensors, meta = selector.to_state()
    meta = dict(meta, thresholds=[float(threshold)] * len(meta["thresholds"]))
    tensors = dict(tensors, thresholds=torch.full_like(tensors["thresholds"], float(threshold)))  # the buffer wins
    return DDASSelector.from_state(tensors, meta)


@dataclass
class ModeResult:
    """One mode's share of a row: per column (CIL: the one seen-classes column) the set's result."""
    mode: EvalMode
    results: list[SetResult]
    read: dict[str, dict[str, int]] = field(default_factory=dict)  # "task/split" -> samples read per shard
    seconds: float = 0.0  # the whole row's (modes share one pass over the data)
    work: Work = field(default_factory=Work)  # the whole row's images, summed over ranks

    @property
    def row(self) -> list[float]:
        return [r.accuracy for r in self.results]

    @property
    def zero_shot_row(self) -> Optional[list[float]]:
        """The untouched backbone's accuracies on the same images (when asked for), else None."""
        if any(r.zero_shot_correct is None for r in self.results):
            return None
        return [r.zero_shot_accuracy for r in self.results]  # type: ignore[misc]

    def confusion(self, num_routes: int) -> list[list[int]]:
        """Samples per (column, route): routes 0..num_routes-1, then zero-shot."""
        return [confusion_row(r, num_routes) for r in self.results]


def evaluate_row(ev: Evaluator, seq: Any, method: Method | str, modes: Sequence[EvalMode],
                 trained_names: Sequence[str], *, trained: Optional[int] = None, cil: bool = False,
                 templates: str = "ensemble", zero_shot: bool = False) -> dict[str, ModeResult]:
    """Score ``seq``'s test sets in every mode after ``trained`` tasks (default: ``len(trained_names)``),
    whose names, in training order, are the route ids. ``zero_shot``: the first mode also counts the
    untouched backbone's hits on the same images (MTIL: every set; CIL: the seen classes).

    Each test set is scored in all modes at once (:meth:`Evaluator.evaluate_set`), so the modes share one
    reading of the set and, with a frozen-feature cache, the plain and routed forwards. Every mode's result
    carries the row's cost (``work``: images through the frozen and the adapted forward, images decoded)."""
    method = get_method(method) if isinstance(method, str) else method
    trained = len(trained_names) if trained is None else trained
    names = list(trained_names)[:trained]
    tic = time.time()
    ev.read = read = {}
    ev.work = Work()

    def routing(task: Any, held_out: bool = False) -> list[RouteMode]:
        route = method.oracle_route(task.name, names, held_out=held_out)
        return [RouteMode(m.kind, route, m.selector, m.decision) for m in modes]

    with torch.no_grad():
        if cil:
            seen = seq.tasks[:trained]
            labels = cil_label_set(seen, templates)
            totals = [SetResult(zero_shot_correct=0 if zero_shot and k == 0 else None) for k in range(len(modes))]
            offset = 0
            for task in seen:
                for total, r in zip(totals, ev.evaluate_set(task, labels, routing(task), label_offset=offset,
                                                            trained=trained, zero_shot=zero_shot)):
                    total.correct, total.total = total.correct + r.correct, total.total + r.total
                    if total.zero_shot_correct is not None:
                        total.zero_shot_correct += r.zero_shot_correct or 0
                    for route, n in r.routes.items():
                        total.routes[route] = total.routes.get(route, 0) + n
                offset += task.num_classes
            per_mode = [[total] for total in totals]
        else:
            n_train = len(seq.tasks)
            per_mode = [[] for _ in modes]
            for j, task in enumerate(seq.all_tasks()):
                for results, r in zip(per_mode, ev.evaluate_set(task, label_set(task, templates),
                                                                routing(task, held_out=j >= n_train),
                                                                trained=trained, zero_shot=zero_shot)):
                    results.append(r)
    work = ev.reduce_work()
    seconds = round(time.time() - tic, 3)
    return {mode.name: ModeResult(mode, results, read, seconds, work) for mode, results in zip(modes, per_mode)}
