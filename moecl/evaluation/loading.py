"""Load a trained run for evaluation or prediction in one plain process (no torch.distributed needed).

``load_run(RUN)`` rebuilds exactly the model the trainer evaluated at its latest task end (or at a given
checkpoint): the run's own config, the backbone (a random-init backbone is rebuilt from ``train.seed`` the
way the trainer built it), the adapter state (expert-parallel-size independent: loaded at ``ep_size=1``),
the full fine-tuned backbone of the ``full-ft`` baseline and the DDAS selector. It also carries what
scoring needs: tokenizer, eval transform, autocast, the test sequence (the run's own, or other shards) and
the routing rules the trainer used (``oracle_route``, ``eval_modes``), so ``moecl eval`` reproduces the
trainer's accuracy-matrix rows.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from ..config import Config, ConfigError, load_config, parse_overrides
from ..errors import CheckpointError, DataError
from ..methods import Method, get_method
from ..routes import ZERO_SHOT  # noqa: F401  (re-exported: moecl.evaluation.loading.ZERO_SHOT)
from .row import EvalMode, eval_modes, fixed_threshold  # noqa: F401  (fixed_threshold: re-exported)

log = logging.getLogger("moecl")

EVAL_OVERRIDE_SECTIONS = ("eval", "ddas")
# how the test shards are read (not which, not the model): an eval may change these too
EVAL_OVERRIDE_KEYS = ("data.max_bad_fraction", "data.max_member_bytes", "data.max_shard_bytes",
                      "data.shard_url_template")


@dataclass
class LoadedRun:
    """A run's checkpoint, ready to score images (model in eval mode, on ``device``)."""
    run_dir: Path
    cfg: Config
    model: Any  # MoECLIP
    selector: Any  # DDASSelector or None
    sequence: Any  # moecl.data.Sequence to evaluate on / take class names from
    tokenizer: Any
    eval_tf: Callable
    checkpoint: Path
    num_trained_tasks: int
    trained_task_names: list[str]  # the run's own training tasks 0..num_trained_tasks-1 (route ids)
    device: torch.device
    autocast: Callable[[], Any] = contextlib.nullcontext
    trainer_state: dict[str, Any] = field(default_factory=dict)
    predict_tf: Optional[Callable] = None  # always the deterministic test transform (eval.transform=train or not)

    @property
    def method(self) -> Method:
        return get_method(self.cfg.train.method)

    def route_of(self, task_name: str, held_out: bool = False) -> int:
        """The oracle route of a test set named ``task_name`` (the trainer's rule, matched by task name)."""
        return self.method.oracle_route(task_name, self.trained_task_names[: self.num_trained_tasks], held_out)

    def route_name(self, route: int) -> str:
        """A route id as people read it: the task name, ``adapter``, ``zero-shot`` or ``fine-tuned``."""
        return self.method.route_name(route, self.trained_task_names)

    def eval_modes(self) -> list[EvalMode]:
        """Every evaluation mode of this run (the trainer's ``eval_modes`` on the loaded state)."""
        return eval_modes(self.cfg, self.selector)


# ---------------------------------------------------------------------------------------------------------

def run_config(run_dir: Path, overrides: Optional[list[str]] = None) -> Config:
    """The run's resolved ``config.yaml``, with eval-time overrides (``eval.*`` and ``ddas.*`` only)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a moecl run folder: {path} does not exist")
    overrides = list(overrides or [])
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.split(".", 1)[0] not in EVAL_OVERRIDE_SECTIONS and key not in EVAL_OVERRIDE_KEYS:
            raise ConfigError(f"override '{item}': only eval.* and ddas.* (and {', '.join(EVAL_OVERRIDE_KEYS)}) "
                              "can change when evaluating a trained run "
                              f"(the model, data and training settings are the run's own, from {path})")
    parse_overrides(overrides)  # unknown keys fail here, naming the key
    cfg = load_config(path, overrides)
    given = any(item.split("=", 1)[0].strip() == "data.shard_url_template" for item in overrides)
    if cfg.data.shard_url_template and not given:
        # A run folder can come from someone else: a URL template (pipe: runs a command) is taken only from
        # this command line, never from the folder's config.yaml.
        log.warning("%s sets data.shard_url_template=%r; ignored (a run folder never chooses how shards are "
                    "opened): pass data.shard_url_template=... to this command if you want it", path,
                    cfg.data.shard_url_template)
        cfg = load_config(path, [*overrides, "data.shard_url_template=null"])
    return cfg


def _trained_task_names(run_dir: Path, cfg: Config) -> list[str]:
    """Names of the run's training tasks, in order (route id = position): from its sequence file, else from
    report.json (the data may have moved since training)."""
    from ..data import resolve_sequence
    from ..data.sequence import read_sequence_file
    try:  # the checked reader: plain task names, no YAML aliases, bounded size
        return [str(t) for t in read_sequence_file(resolve_sequence(cfg.data.root, cfg.data.sequence))["tasks"]]
    except (DataError, OSError, KeyError, TypeError, yaml.YAMLError):
        pass
    report = run_dir / "report.json"
    if report.is_file():
        return [str(t) for t in json.loads(report.read_text()).get("tasks", [])]
    raise DataError(f"cannot tell which tasks {run_dir} was trained on: its sequence {cfg.data.sequence!r} "
                    f"(data.root {cfg.data.root}) cannot be read and it has no report.json")


def build_run_model(cfg: Config, device: torch.device):
    """The run's model before loading any checkpoint: built as the trainer built it (same seed first, so a
    randomly initialised backbone comes out identical), at expert-parallel size 1."""
    from ..model import build_model
    moe = cfg.moe.model_copy(update={"ep_size": 1})
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays untouched
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, moe, cfg.train.method)
    return model.to(device).eval()


def load_run(run_dir: str | Path, checkpoint: Optional[str | Path] = None, device: str | torch.device = "auto", *,
             data_root: Optional[str | Path] = None, sequence: Optional[str | Path] = None,
             overrides: Optional[list[str]] = None, load_sequence_data: bool = True) -> LoadedRun:
    """Load RUN's latest valid task-end checkpoint (or ``checkpoint``) for evaluation in this process.

    ``data_root`` / ``sequence`` choose other shards to evaluate on (default: the run's own);
    ``overrides`` are ``eval.*`` / ``ddas.*`` settings (and how shards are read: ``EVAL_OVERRIDE_KEYS``).
    ``device``: auto (GPU when present), cpu, cuda[:i].
    """
    from ..data import data_options, load_sequence, make_transforms
    from ..ds_config import autocast_for
    from ..model import image_size_of, tokenizer_for
    from ..runstate import layout
    from ..runstate.identity import backbone_identity, check_checkpoint
    from ..runtime import configure_accelerator_env, pick_device

    configure_accelerator_env()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    cfg = run_config(run_dir, overrides)
    path = layout.resolve(run_dir, checkpoint)
    dev = pick_device(device) if isinstance(device, str) and device in ("auto", "cpu", "cuda") else torch.device(device)
    state = layout.read_state(path)
    if state and not state.get("task_end", True):
        log.warning("%s is a mid-task checkpoint: the current task's router is only partly trained", path)
    progress = state.get("progress", {})

    check_checkpoint(path, backbone_identity(cfg), f"the run's config ({run_dir / 'config.yaml'})")
    model = build_run_model(cfg, dev)
    meta, selector = layout.load_weights(path, model, cfg.ddas, dev)
    model.eval()
    model.set_eval_gate_noise(cfg.eval.gate_noise)
    if selector is not None:
        selector = selector.to(dev)
        if cfg.ddas.threshold == "fixed":  # an eval-time ddas.threshold=fixed override
            selector = fixed_threshold(selector, cfg.ddas.fixed_threshold).to(dev)
    if "task" in progress:  # task-end checkpoints store the next task to train = tasks finished
        trained = int(progress["task"])
    else:
        trained = int(meta.get("num_tasks", 0))

    seq = None
    if load_sequence_data:
        seq = load_sequence(data_root if data_root is not None else cfg.data.root,
                            sequence if sequence is not None else cfg.data.sequence, **data_options(cfg.data))
    names = _trained_task_names(run_dir, cfg) if (sequence is not None or data_root is not None or seq is None) \
        else seq.task_names
    pcfg = getattr(model.clip.visual, "preprocess_cfg", {}) or {}
    train_tf, eval_tf = make_transforms(image_size_of(model.clip), cfg.data.train_crop_scale,
                                        mean=pcfg.get("mean"), std=pcfg.get("std"))
    predict_tf = eval_tf  # predictions are deterministic whatever the evaluation protocol
    if cfg.eval.transform == "train":  # the published CIL evaluation scores the training crop
        eval_tf = train_tf
    return LoadedRun(run_dir=run_dir, cfg=cfg, model=model, selector=selector, sequence=seq, predict_tf=predict_tf,
                     tokenizer=tokenizer_for(cfg.model), eval_tf=eval_tf, checkpoint=path, num_trained_tasks=trained,
                     trained_task_names=names, device=dev, autocast=autocast_for(cfg, dev), trainer_state=state)
