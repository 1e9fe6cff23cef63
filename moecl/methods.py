"""What each ``train.method`` does, as one record per method, looked up once (no ``if method == ...``).

A method decides which adapter the model carries, what trains during a task, how a test image of a task is
routed when its task id is given (the oracle route), whether DDAS is fitted, and the name it has in reports.
The trainer, ``moecl eval``, ``moecl predict``, the checkpoint layout and the demo read these records.

No heavy imports: the config validates ``train.method`` against :data:`NAMES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .routes import ZERO_SHOT


@dataclass(frozen=True)
class Method:
    """One continual-learning method (or baseline) as behaviour."""
    name: str  # the train.method value
    report_name: str  # its name in report.json / results.json
    adapter: Optional[str]  # "moe" (one router per task over shared experts), "dense" (one adapter), None
    trains: Optional[str]  # "task-router": task t's router + unfrozen experts; "adapter"; "backbone"; None
    ddas: bool  # a DDAS autoencoder is fitted per task (task-agnostic routing exists)
    # route -1 is the untouched CLIP (every method but full fine-tuning, which moves the backbone itself)
    zero_shot_is_frozen: bool = True

    @property
    def trains_anything(self) -> bool:
        return self.trains is not None

    @property
    def per_task_routes(self) -> bool:
        """One route (router) per learned task; otherwise the model has at most one adapter route, 0."""
        return self.adapter == "moe"

    @property
    def weights_file(self) -> Optional[str]:
        """What a checkpoint must hold of the model: the adapter state, the full backbone, or nothing."""
        return "adapters" if self.adapter else ("backbone" if self.trains == "backbone" else None)

    def train_route(self, task: int) -> int:
        """The route the text (and images) take while task ``task`` trains."""
        if self.trains == "backbone":
            return ZERO_SHOT
        return task if self.per_task_routes else 0

    def trainable_task(self, task: int) -> int:
        """The task index whose parameters ``MoECLIP.trainable_parameters`` selects."""
        return task if self.per_task_routes else 0

    def oracle_route(self, task_name: str, trained: Sequence[str], held_out: bool = False) -> int:
        """The route of a test set when its task is given: the task's own router once trained (MoE), the
        one adapter once anything trained (dense), otherwise the plain (or fine-tuned) backbone."""
        if held_out or not self.adapter or not trained:
            return ZERO_SHOT
        if self.per_task_routes:
            return list(trained).index(task_name) if task_name in trained else ZERO_SHOT
        return 0

    def default_route(self, trained: int) -> int:
        """The route of an image when nothing chooses one (no DDAS, no task given)."""
        return 0 if self.adapter == "dense" and trained else ZERO_SHOT

    def route_name(self, route: int, trained_names: Sequence[str]) -> str:
        """A route id as people read it: the task name, ``adapter``, ``zero-shot`` or ``fine-tuned``."""
        if route < 0:
            return "zero-shot" if self.zero_shot_is_frozen else "fine-tuned"
        if self.adapter == "dense":
            return "adapter"
        return trained_names[route] if route < len(trained_names) else f"task {route}"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("moe-adapters", "moecl", adapter="moe", trains="task-router", ddas=True),
    Method("dense-adapter", "dense-adapter", adapter="dense", trains="adapter", ddas=False),
    Method("full-ft", "continual-ft", adapter=None, trains="backbone", ddas=False, zero_shot_is_frozen=False),
    Method("zero-shot", "zero-shot", adapter=None, trains=None, ddas=False),
)}
NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    """The record of ``train.method`` ``name`` (a ValueError lists the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(NAMES)}") from None


def report_name(name: str) -> str:
    """A method's name in reports (unknown names pass through: reports of other tools)."""
    return METHODS[name].report_name if name in METHODS else name
