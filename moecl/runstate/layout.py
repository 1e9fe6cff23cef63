"""One checkpoint folder: what it holds, its one write and its one read (trainer, resume, eval, import).

    trainer.json                          where the run stands (:class:`Progress`), kind (task end / mid-task),
                                          world shape, method, DDAS tasks, backbone identity
    adapters/adapters.{safetensors,json}  moe-adapters / dense-adapter: the adapter state (any ep_size)
    backbone.safetensors                  full-ft: the whole fine-tuned CLIP
    ddas.{safetensors,json}               the DDAS selector, once it holds a task
    optimizer-rankR.*, rng-rankR.*        mid-task only: every rank's optimizer state and RNG
    MANIFEST.json                         checksums of all of the above, written last (:mod:`.files`)

Which files a checkpoint of a given kind must hold is :func:`files.required_files`; the method table
(:mod:`moecl.methods`) says which weights a method keeps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import CheckpointError
from ..methods import Method
from . import files
from .adapters import load_adapter_state, save_adapter_state

TRAINER = "trainer.json"
ADAPTERS = "adapters"
BACKBONE = "backbone.safetensors"
DDAS_TENSORS, DDAS_META = "ddas.safetensors", "ddas.json"


@dataclass
class Progress:
    """Everything about where the run stands, saved in every checkpoint's trainer.json."""
    task: int = 0  # the task being trained (or next to train)
    step: int = 0  # optimizer steps done in that task
    rows: dict[str, list[list[float]]] = field(default_factory=dict)  # mode -> accuracy-matrix rows
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)  # mode -> last row's routing confusion
    frozen: list[dict[str, list[int]]] = field(default_factory=list)  # per finished task: newly frozen experts
    ddas: list[dict[str, Any]] = field(default_factory=list)  # per task: threshold, hold-out acceptance
    skipped_steps: int = 0
    wall_time_s: float = 0.0
    resources: list[dict[str, int]] = field(default_factory=list)  # per finished task: RSS, open files
    zero_shot: list[list[float]] = field(default_factory=list)  # per row: the untouched backbone's accuracies
    eval_work: list[dict[str, int]] = field(default_factory=list)  # per row: images plain / routed / decoded


# ---- write ---------------------------------------------------------------------------------------------

def write_shared(folder: Path, state: dict[str, Any], *, model=None, method: Optional[Method] = None,
                 selector=None, adapter_meta: Optional[dict[str, Any]] = None, is_main: bool = True) -> None:
    """The files every checkpoint shares: ``method``'s weights, the DDAS selector, trainer.json (``state``).
    Every rank calls it (gathering sharded experts is collective); rank 0 (``is_main``) writes."""
    weights = method.weights_file if method is not None else None
    if weights == "adapters":
        save_adapter_state(model, folder / ADAPTERS, adapter_meta)
    if not is_main:
        return
    from safetensors.torch import save_file
    if weights == "backbone":
        save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, str(folder / BACKBONE))
    if selector is not None and selector.num_tasks:
        tensors, meta = selector.to_state()
        save_file(tensors, str(folder / DDAS_TENSORS))
        (folder / DDAS_META).write_text(json.dumps(meta))
    (folder / TRAINER).write_text(json.dumps(state, indent=1))


def write_rank(folder: Path, rank: int, optimizer_state: Any, rng: dict[str, torch.Tensor]) -> None:
    """A mid-task checkpoint's part of one rank: its optimizer state and RNG (named by global rank)."""
    files.save_nested(optimizer_state, folder, f"optimizer-rank{rank}")
    files.save_nested(rng, folder, f"rng-rank{rank}")


# ---- read ----------------------------------------------------------------------------------------------

def read_state(folder: Path) -> dict[str, Any]:
    """trainer.json as a dict ({} when the folder has none)."""
    path = Path(folder) / TRAINER
    return json.loads(path.read_text()) if path.is_file() else {}


def load_weights(folder: Path, model, ddas_cfg, device: Optional[torch.device] = None
                 ) -> tuple[dict[str, Any], Any]:
    """Put the checkpoint's weights into ``model`` (adapters at any ep_size, or the fine-tuned backbone) and
    rebuild its DDAS selector. Returns (the adapter metadata or {}, the selector or None); the selector is
    where :func:`moecl.ddas.load_selector` puts it (the caller moves it)."""
    from safetensors.torch import load_file
    folder = Path(folder)
    meta: dict[str, Any] = {}
    if (folder / ADAPTERS).is_dir():
        meta = load_adapter_state(model, folder / ADAPTERS)
    if (folder / BACKBONE).is_file():
        model.clip.load_state_dict(load_file(str(folder / BACKBONE), device=str(device or "cpu")))
    selector = None
    if (folder / DDAS_TENSORS).is_file() and (folder / DDAS_META).is_file():
        from ..ddas import load_selector
        selector = load_selector(load_file(str(folder / DDAS_TENSORS)), json.loads((folder / DDAS_META).read_text()),
                                 ddas_cfg)
    return meta, selector


def read_optimizer(folder: Path, rank: int) -> Any:
    return files.load_nested(folder, f"optimizer-rank{rank}")


def read_rng(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    return files.load_nested(folder, f"rng-rank{rank}")


# ---- which checkpoint ----------------------------------------------------------------------------------

def resolve(run_dir: Path, checkpoint: Optional[str | Path] = None, kind: str = "task") -> Path:
    """The checkpoint folder to load: the given one (a path, or a name under RUN/checkpoints), or the latest
    valid one of ``kind`` (task: task-end only; any). Verified against its manifest; a CheckpointError names
    the folder otherwise."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        path = files.latest_valid(run_dir, kind=kind)
        if path is None:
            found = [p.name for p in files.list_checkpoints(run_dir)]
            what = (f"none of {', '.join(found)} is a complete task-end checkpoint" if found
                    else "it holds no checkpoints")
            raise CheckpointError(f"no valid task-end checkpoint in {run_dir / 'checkpoints'}: {what} (has the "
                                  "run finished its first task? pass --checkpoint to choose one)")
        return path
    path = Path(checkpoint)
    if not path.is_dir() and (run_dir / "checkpoints" / str(checkpoint)).is_dir():
        path = run_dir / "checkpoints" / str(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist (checkpoints of {run_dir}: "
                              + (", ".join(p.name for p in files.list_checkpoints(run_dir)) or "none") + ")")
    problem = files.verify(path)
    if problem:
        raise CheckpointError(f"{path} is not a valid checkpoint: {problem}")
    return path
