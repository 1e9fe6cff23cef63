"""The continual task loop: for each task, train -> activate-freeze -> DDAS -> evaluate a row -> checkpoint."""
from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from .. import compat
from ..config import Config, check_batch_fits, check_per_task
from ..data import (Sequence, data_options, eval_batches, fill_template, load_sequence, make_transforms,
                    train_batches)
from ..ddas.block import fit_scorer, new_selector, selector_input  # issue 16: ddas.feature / ddas.scorer
from ..errors import CheckpointError, MoeclError
from ..folder_lock import FolderLock
from ..methods import Method, get_method
from ..evaluation.evaluator import Evaluator
from ..evaluation.row import ORACLE, EvalMode, eval_modes, evaluate_row
from ..model import build_model, image_size_of, tokenizer_for
from ..model.clip import MoECLIP
from ..runtime import DistInfo, init_distributed
from ..seeding import seed_all, stable_seed
from ..runstate import files as ckpt
from ..runstate import layout
from ..runstate.identity import backbone_identity, check_checkpoint
from ..runstate.layout import Progress
from . import cluster, reshard
from .faults import fault_hooks, resources
from .interrupt import Interrupted, StopRequest, interrupted_line
from .step_stats import StepStats
from ..ds_config import autocast_for, ds_config, micro_batch
from .engine import build_engine, lr_at

log = logging.getLogger("moecl")


class TrainingError(MoeclError):
    """Training cannot go on (non-finite loss, ...)."""


def _set_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


# Config keys that may differ on --resume without --allow-config-change: where and how it runs, not what it
# computes (expert sharding follows the cluster shape; a checkpoint loads at any ep_size).
RESUME_FREE_KEYS = ("runtime.", "moe.ep_size")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def config_changes(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting (outside RESUME_FREE_KEYS) that differs."""
    a, b = _flatten(saved), _flatten(ours)
    missing = "(unset)"
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing) and not k.startswith(RESUME_FREE_KEYS)]


def _check_resume_path(resume: Optional[str], run_dir: Path) -> None:
    """``--resume PATH`` must name an existing checkpoint folder (checked before the run folder is created)."""
    if resume in (None, "auto") or Path(resume).is_dir():
        return
    found = ", ".join(p.name for p in ckpt.list_checkpoints(run_dir)) or "none"
    what = "is not a folder" if Path(resume).exists() else "does not exist"
    raise CheckpointError(f"--resume {resume}: {what}; give a checkpoint folder (checkpoints in "
                          f"{run_dir / 'checkpoints'}: {found}) or --resume auto for the latest valid one")


def class_tokens(tokenizer, task) -> torch.Tensor:
    """The training prompts of ``task``'s classes, in label order (one row per class)."""
    return tokenizer([fill_template(task.train_template, c) for c in task.classnames])


def task_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The training objective: CLIP logits against the task's class prompts, cross-entropy (fp32)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


@dataclass
class _TaskSteps:
    """What the steps of one task share (made by ``ContinualTrainer._start_task``)."""
    t: int
    task: Any
    engine: Any
    optimizer: Any
    params: list[torch.nn.Parameter]
    tokens: torch.Tensor  # the task's class prompts, trimmed
    route: int  # the route the task trains (moecl.methods)
    total: int  # steps of the task
    peak: float  # peak learning rate
    chunk: int  # steps between checkpoints (the task's length without mid-task checkpoints)
    stats: StepStats
    bar: Any
    tic: float
    seen: int = 0  # images, all ranks
    lr: float = 0.0  # of the last step
    grad_norm: Optional[float] = None  # of the last logging step (this rank's)


class ContinualTrainer:
    """Runs a whole task sequence; see ``moecl train --help``."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: Optional[str] = None,
                 allow_config_change: bool = False):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.allow_config_change = allow_config_change
        _check_resume_path(resume, self.run_dir)
        self.info: DistInfo = init_distributed(cfg.runtime.device, cfg.runtime.collective_timeout_s)
        created = not self.run_dir.exists()
        try:
            self._setup(cfg)
        except BaseException:
            self._close_run_log()
            if created and self.is_main:  # a run that never started leaves no half-made run folder behind
                self._drop_run_dir()
            raise

    def _drop_run_dir(self) -> None:
        self._close_run_log()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _open_run_log(self) -> None:
        """RUN/train.log gets the 'moecl' logger's lines, DEBUG included, while this trainer runs; what is
        changed here is undone by :meth:`_close_run_log` (a library leaves the process's logging as it was)."""
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self._log_handler, self._log_level = handler, log.level
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)  # DEBUG lines (resources, DeepSpeed set-up) go to train.log only

    def _close_run_log(self) -> None:
        handler = getattr(self, "_log_handler", None)
        if handler is None:
            return
        log.removeHandler(handler)
        handler.close()
        log.setLevel(self._log_level)
        self._log_handler = None

    def _setup(self, cfg: Config) -> None:
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.device = self.info.device
        self.method: Method = get_method(cfg.train.method)
        self.lock = FolderLock(self.run_dir, "moecl train")
        self.stop = StopRequest()
        self.faults = fault_hooks(self.info.rank)  # no-ops unless a fault-tolerance test asks for faults
        self._skips_in_a_row = 0
        self._setup_run_dir()
        try:
            self._init_rest()
        except BaseException:
            self.lock.release()
            self._close_run_log()
            raise

    def _init_rest(self) -> None:
        cfg = self.cfg
        self.rank_log = cluster.RankLog(self.run_dir, self.info, {"ep_size": cfg.moe.ep_size})
        self.backbone_id = backbone_identity(cfg)
        self.seq: Sequence = load_sequence(cfg.data.root, cfg.data.sequence, **data_options(cfg.data))
        if not self.seq.tasks:
            raise MoeclError(f"sequence {self.seq.name!r} names no tasks")
        check_batch_fits(cfg, self.seq.tasks)
        check_per_task(cfg, self.seq.task_names)
        self.ds = ds_config(cfg, self.info.world_size, self.device)
        self.micro = micro_batch(cfg, self.info.world_size)
        self.autocast = autocast_for(cfg, self.device, self.ds)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_all(cfg.train.seed)
        self._prepare_backbone_weights()
        self.model: MoECLIP = build_model(cfg.model, cfg.moe, self.method.name).to(self.device)
        if self.method.per_task_routes and cfg.moe.ep_size > 1:
            self.model.setup_expert_parallel()
        self.tokenizer = tokenizer_for(cfg.model)
        pcfg = getattr(self.model.clip.visual, "preprocess_cfg", {}) or {}
        self.train_tf, self.eval_tf = make_transforms(image_size_of(self.model.clip), cfg.data.train_crop_scale,
                                                      mean=pcfg.get("mean"), std=pcfg.get("std"))
        self.selector = new_selector(cfg, self.model)
        if cfg.ddas.kind == "reference" and self.method.ddas and cfg.ddas.enabled:
            from ..ddas.reference import ReferenceSelector, load_alexnet_features
            self.selector = ReferenceSelector(load_alexnet_features(cfg.ddas.alexnet_weights)).to(self.device)
            self.selector.future_slots_vote = cfg.ddas.future_slots_vote
        self.model.set_eval_gate_noise(cfg.eval.gate_noise)
        self.progress = Progress()
        self.writer = self._tensorboard()

    # ---- run folder, logs ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def _setup_run_dir(self) -> None:
        """Rank 0: lock the folder, check a resume against the saved config, write config.yaml, open train.log.
        Its verdict reaches every rank, so a refusal stops them all (no rank left waiting at a barrier)."""
        problem = None
        cluster.check_shared_run_dir(self.run_dir, self.info)  # every node sees the same folder, or stop now
        if self.is_main:
            try:
                self._setup_run_dir_main()
            except Exception as e:  # noqa: BLE001 - told to every rank, then raised as it is here
                self.lock.release()
                problem = e
        if dist.is_initialized() and dist.get_world_size() > 1:
            verdict = [str(problem) if problem is not None else None]
            dist.broadcast_object_list(verdict, src=0)
            if problem is None and verdict[0] is not None:
                problem = CheckpointError(verdict[0])
        if problem is not None:
            raise problem

    def _setup_run_dir_main(self) -> None:
        cfg_path = self.run_dir / "config.yaml"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire(hint="wait for that run to finish or choose another --out")
        import atexit
        atexit.register(self.lock.release)
        notes = []
        if self.resume and cfg_path.is_file():
            notes = self._check_resume_config(cfg_path)
        elif cfg_path.is_file() and ckpt.list_checkpoints(self.run_dir):
            raise CheckpointError(f"{self.run_dir} already holds a run; pass --resume auto to continue it "
                                  "or choose another --out")
        cfg_path.write_text(self.cfg.to_yaml())
        self._open_run_log()
        for note in notes:
            log.warning(note)

    def _prepare_backbone_weights(self) -> None:
        """``model.init_checkpoint=demo``: rank 0 builds the demo's pretrained tiny CLIP into the cache once
        (the other ranks wait, then read it). No weights at all: say so, once, before anything trains."""
        mcfg = self.cfg.model
        if mcfg.init_checkpoint and self.is_main:
            from ..pretrain import build_init_checkpoint
            build_init_checkpoint(mcfg.init_checkpoint, mcfg.name, progress=self.cfg.runtime.progress)
        self._barrier()
        if self.is_main and not mcfg.pretrained and not mcfg.init_checkpoint:
            log.warning("the backbone %s is randomly initialised (no model.pretrained, no model.init_checkpoint): "
                        "accuracies will be near chance. For a small backbone that has learned something use "
                        "model.init_checkpoint=demo (the demo's pretrained moecl-tiny)", mcfg.name)

    def _check_resume_config(self, path: Path) -> list[str]:
        """Refuse a resume whose config changes the model; list any other change and refuse it too unless
        ``--allow-config-change`` (then the old config is kept beside the new one). Returns lines to log."""
        saved = yaml.safe_load(path.read_text())
        if not isinstance(saved, dict):
            raise CheckpointError(f"--resume: {path} is not a moecl config (a YAML mapping); restore it or start a "
                                  "new run with another --out")
        ours = self.cfg.model_dump(mode="json")
        for section, keys in (("model", None), ("moe", ("num_experts", "top_k", "width", "towers", "routing",
                                                        "shared_router", "text_route_token")),
                              ("train", ("method",)), ("data", ("sequence",))):
            for key in keys or ours[section]:
                if saved.get(section, {}).get(key) != ours[section][key]:
                    raise CheckpointError(
                        f"--resume: {path} has {section}.{key}={saved.get(section, {}).get(key)!r} but this "
                        f"command has {ours[section][key]!r}; resume with the run's own config "
                        f"(--config {path})")
        target = ckpt.latest_valid(self.run_dir) if self.resume == "auto" else Path(self.resume)
        if target is None:  # nothing to continue: this is a fresh start with this command's config
            return []
        check_checkpoint(target, backbone_identity(self.cfg), "this command's config")  # before config.yaml changes
        try:
            saved = Config.model_validate(saved).model_dump(mode="json")  # defaults filled in, as ours
        except ValueError:
            pass
        changes = config_changes(saved, ours)
        if not changes:
            return []
        listed = "; ".join(changes)
        if not self.allow_config_change:
            raise CheckpointError(f"--resume: this command's config differs from the run's ({path}): {listed}. "
                                  f"Resume with the run's own config (--config {path}), or pass "
                                  "--allow-config-change if the change is intended")
        n = 1
        while (kept := self.run_dir / f"config.before-resume-{n}.yaml").exists():
            n += 1
        shutil.copyfile(path, kept)
        return [f"--allow-config-change: resuming with a changed config ({listed}); the previous config is "
                f"kept as {kept}"]

    def _tensorboard(self):
        if not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.run_dir / "tb"))

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def where(self) -> str:
        """Where the run stands, for messages: task, its name, step."""
        t = self.progress.task
        name = f" ({self.seq.tasks[t].name})" if t < len(self.seq.tasks) else ""
        return f"task {t}{name} step {self.progress.step}"

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """The whole sequence (or what is left of it); the run folder is locked throughout."""
        self.stop.where = lambda: (self.progress.task, self.progress.step)
        try:
            with self.stop:
                return self._run()
        finally:
            self.lock.release()
            self._close_run_log()

    def _stop_requested(self) -> bool:
        """True on every rank when any rank got SIGTERM / SIGINT (polled at step boundaries)."""
        flag = self.stop.signum is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([int(flag)], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def _interrupt(self) -> None:
        line = interrupted_line(self.progress.task, self.progress.step)
        if self.is_main:
            log.warning(line)
        raise Interrupted(line, self.stop.signum or signal.SIGTERM)

    def _run(self) -> dict[str, Any]:
        start = time.time()
        self._maybe_resume()
        num_tasks = len(self.seq.tasks)
        if self.is_main:
            log.info("run %s: %d tasks (%s), method %s, %d rank(s) on %s", self.run_dir, num_tasks,
                     ", ".join(self.seq.task_names), self.method.name, self.info.world_size, self.device)
        wall_before = self.progress.wall_time_s
        self._full_ft_zero_shot()
        while self.progress.task < num_tasks:
            t = self.progress.task
            task = self.seq.tasks[t]
            if self.method.trains_anything:
                self._train_task(t, task)
            if self.method.per_task_routes:
                self._activate_freeze(t)
            if self.method.ddas and self.cfg.ddas.enabled:
                self._fit_ddas(t, task)
            self._evaluate_row(t)
            self.progress.wall_time_s = wall_before + time.time() - start
            self.progress.task, self.progress.step = t + 1, 0
            self.progress.resources.append(resources())
            self._save(task_end=True)
            self._write_report()
            if self.is_main:
                log.debug("task %d done: %s", t + 1, json.dumps(self.progress.resources[-1]))
            self.faults.at("between", t)
            if self.progress.task < num_tasks and self._stop_requested():
                self._interrupt()
            if self.method.per_task_routes:
                self.model.reset_counts()
        if self.writer:
            self.writer.close()
        return self._report()

    def iterations(self, t: int) -> int:
        if self.cfg.train.epochs:
            count = self.seq.tasks[t].count("train")
            return max(1, math.ceil(self.cfg.train.epochs * count / self.cfg.data.batch_size))
        return int(self.cfg.per_task("iterations", t, self.seq.task_names))

    def _train_task(self, t: int, task) -> None:
        """Task t's steps, in chunks (the steps between two checkpoints, each with its own data stream)."""
        cfg = self.cfg
        ts, rng_later = self._start_task(t, task)
        while self.progress.step < ts.total:
            step0 = self.progress.step
            stream = train_batches(task, batch_size=self.micro, rank=self.info.rank, world_size=self.info.world_size,
                                   workers=cfg.data.workers, seed=stable_seed(cfg.train.seed, t, step0 // ts.chunk),
                                   preprocess=self.train_tf, shuffle_buffer=cfg.data.shuffle_buffer,
                                   resampled=cfg.data.resampled, max_bad_fraction=cfg.data.max_bad_fraction,
                                   pin_memory=self.device.type == "cuda")
            batches = iter(stream)
            if rng_later is not None:  # resumed inside a chunk: replay its data up to the checkpoint, then its RNG
                for _ in range((step0 % ts.chunk) * cfg.train.grad_accum):
                    next(batches)
                _set_rng(rng_later)
                rng_later = None
            end = min((step0 // ts.chunk + 1) * ts.chunk, ts.total)
            while self.progress.step < end:
                self._train_step(ts, batches)
                self.progress.step += 1
                self._log_step(ts, end)
                if self._stop_requested():
                    if ts.bar is not None:
                        ts.bar.close()
                    self._save(task_end=False, optimizer=ts.optimizer)
                    self._interrupt()
            del batches
            self.rank_log.train_pass(t, step0, end - step0, getattr(stream, "shards", {}))
            if cfg.train.checkpoint_every and self.progress.step < ts.total:
                self._save(task_end=False, optimizer=ts.optimizer)
        if rng_later is not None:  # interrupted right at the task's last step
            _set_rng(rng_later)
        if ts.bar is not None:
            ts.bar.close()
        ts.engine.destroy()
        self.model.eval()

    def _start_task(self, t: int, task) -> tuple[_TaskSteps, Optional[dict[str, torch.Tensor]]]:
        """Task t's engine over what the method trains, its seed (or the checkpoint's optimizer and RNG), its
        prompts. Returns the task's step state and, when resumed inside a chunk, the RNG to restore later."""
        cfg = self.cfg
        while self.model.num_tasks <= t:
            self.model.add_task()
        params = self.model.trainable_parameters(self.method.trainable_task(t))
        total = self.iterations(t)
        peak = float(cfg.per_task("lr", t, self.seq.task_names))
        engine, optimizer = build_engine(self.model, params, cfg, self.ds, lr_at(0, total, peak, cfg.train.warmup))
        if hasattr(optimizer, "check_grad_overflow"):  # ZeRO: let it check its partitioned gradients (skips)
            optimizer.check_grad_overflow = True
        chunk = cfg.train.checkpoint_every or total
        rng_later = None
        if self.progress.step:
            rng = self._load_optimizer(optimizer)
            if self.progress.step % chunk == 0:
                _set_rng(rng)  # the RNG of the chunk boundary
            else:  # a checkpoint taken inside a chunk (interrupted): replay the chunk's data up to it first
                rng_later = rng
        else:  # each task starts from its own seed, so a resume from a task end replays it exactly
            torch.manual_seed(stable_seed(cfg.train.seed, "task", t, self.info.rank) % 2**63)
        tokens = class_tokens(self.tokenizer, task).to(self.device)
        tokens = self.model.trim_prompts(tokens)  # once per task: to the longest prompt's EOT token (exact)
        bar = self._bar(task.name, total)
        if self.is_main:
            log.info("task %d/%d %s: %d steps, lr %g, %d classes, %d trainable parameters", t + 1,
                     len(self.seq.tasks), task.name, total, peak, task.num_classes, sum(p.numel() for p in params))
        self.model.train()
        ts = _TaskSteps(t, task, engine, optimizer, params, tokens, self.method.train_route(t), total, peak, chunk,
                        StepStats(self.device), bar, time.time())
        return ts, rng_later

    def _train_step(self, ts: _TaskSteps, batches) -> None:
        """One optimizer step: the learning rate, ``grad_accum`` micro-batches forward and backward, the
        non-finite policy, the optimizer step."""
        cfg, t, step = self.cfg, ts.t, self.progress.step
        ts.lr = lr_at(step, ts.total, ts.peak, cfg.train.warmup)
        for g in ts.optimizer.param_groups:
            g["lr"] = ts.lr
        # nan_policy=skip decides before the optimizer step (a host read per step, and the step is dropped
        # whole); stop keeps the step free of host syncs: the device flags it, the next read raises
        skip_mode, bad = cfg.train.nan_policy == "skip", None
        # a skipped step must not count its routing toward activate-freeze either
        counts = [s.counts.clone() for s in self.model.moe_sites()] if skip_mode else None
        logging_step = self.is_main and ((step + 1) % cfg.runtime.log_every == 0 or step + 1 == ts.total)
        # the load-balancing loss enters the loss only when weighted; otherwise it is computed when logged
        with_aux = bool(cfg.moe.aux_loss_weight) or logging_step
        ts.stats.new_step()
        for micro in range(cfg.train.grad_accum):
            images, labels = next(batches)
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
            with self.autocast():
                logits = ts.engine(images, ts.tokens, ts.route)
            loss = task_loss(logits, labels, cfg.train.label_smoothing)
            if self.faults.nan_loss(t, step):
                loss = loss * float("nan")
            aux = self.model.aux_loss().to(loss.device) if with_aux else None
            if cfg.moe.aux_loss_weight:
                loss = loss + cfg.moe.aux_loss_weight * aux
            if not skip_mode:
                loss = ts.stats.guard(loss, step)  # non-finite (on any rank): zero gradient, raised at the read
            elif not self._finite(loss):
                bad = f"loss ({loss.item()})"
                loss = loss * float("nan")  # every gradient non-finite too: the step is dropped whole
            ts.engine.backward(loss)
            if bad is None:
                ts.stats.add(loss, aux, 1.0 / cfg.train.grad_accum)
            ts.seen += images.shape[0] * self.info.world_size
            if micro < cfg.train.grad_accum - 1:
                # DeepSpeed counts micro-steps in step(): off the accumulation boundary it only advances that
                # count; the optimizer steps at the step() after the last micro-batch, below
                ts.engine.step()
        self.faults.at("step", t, step)
        ts.grad_norm = _grad_norm(ts.params) if logging_step else None  # before step() clears the gradients
        if skip_mode:
            self._optimizer_step(ts.engine, ts.optimizer, ts.params, bad, t, ts.task.name, step, counts)
        else:
            ts.engine.step()
        self.faults.step_done(t, step)

    def _log_step(self, ts: _TaskSteps, end: int) -> None:
        """After a step: read the step figures when logging (and at a chunk's end, before any checkpoint, where a
        non-finite loss under nan_policy=stop raises), TensorBoard, the progress bar."""
        step = self.progress.step
        log_now = step % self.cfg.runtime.log_every == 0 or step == ts.total
        if log_now or step == end:
            loss_sum, aux_sum = self._read_stats(ts.stats, ts.t, ts.task)
        if self.is_main and log_now:
            rate = ts.seen / max(time.time() - ts.tic, 1e-9)
            gstep = self._global_step(ts.t)
            self.writer.add_scalar("train/loss", loss_sum, gstep)
            self.writer.add_scalar("train/lr", ts.lr, gstep)
            self.writer.add_scalar("train/aux_loss", aux_sum, gstep)
            gn = ts.engine.get_global_grad_norm()  # set by DeepSpeed's ZeRO / bf16 optimizers only
            gn = ts.grad_norm if gn is None else gn
            if gn is not None:
                self.writer.add_scalar("train/grad_norm", float(gn), gstep)
            self.writer.add_scalar("train/images_per_s", rate, gstep)
            if ts.bar is not None:
                ts.bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{ts.lr:.2e}", ips=f"{rate:.0f}")
        if ts.bar is not None:
            ts.bar.update(1)

    def _optimizer_step(self, engine, optimizer, params: list[torch.nn.Parameter], bad: Optional[str], t: int,
                        name: str, step: int, counts: Optional[list[torch.Tensor]] = None) -> None:
        """``engine.step()`` when loss and gradients are finite. Otherwise the step is dropped whole: parameters
        and optimizer state stay exactly as they were (nan_policy=skip, logged, limited in a row) or the run
        stops naming the step (stop)."""
        cfg = self.cfg
        zero = int(self.ds.get("zero_optimization", {}).get("stage", 0) or 0)
        if bad is None and not zero and not self._all_ranks(self._grads_finite(params)):
            bad = "gradients"
        if bad is not None and cfg.train.nan_policy == "stop":
            raise TrainingError(f"non-finite {bad} at task {t} ({name}) step {step}; the last good checkpoint in "
                                f"{self.run_dir / 'checkpoints'} is kept (train.nan_policy=skip skips such steps)")
        if bad is not None and not zero:
            engine.zero_grad()  # no gradients: the optimizer leaves the parameters and their state alone
        engine.step()
        if zero and getattr(optimizer, "overflow", False):  # ZeRO found non-finite gradients and dropped the step
            if bad is None and cfg.train.nan_policy == "stop":
                raise TrainingError(f"non-finite gradients at task {t} ({name}) step {step}; the last good "
                                    f"checkpoint in {self.run_dir / 'checkpoints'} is kept (train.nan_policy=skip "
                                    "skips such steps)")
            bad = bad or "gradients"
        if bad is None:
            self._skips_in_a_row = 0
            return
        self.progress.skipped_steps += 1
        self._skips_in_a_row += 1
        for site, before in zip(self.model.moe_sites(), counts or []):
            site.counts.copy_(before)
        limit = cfg.train.max_consecutive_skips
        if self.is_main:
            log.warning("task %d (%s) step %d skipped: non-finite %s; parameters and optimizer state unchanged "
                        "(%d in a row, limit %d)", t, name, step, bad, self._skips_in_a_row, limit)
        if self._skips_in_a_row >= limit:
            raise TrainingError(
                f"{self._skips_in_a_row} steps in a row skipped for non-finite loss or gradients, the last at task "
                f"{t} ({name}) step {step}; stopping (train.max_consecutive_skips={limit}). The last good checkpoint "
                f"in {self.run_dir / 'checkpoints'} is kept; lower train.lr "
                f"({cfg.per_task('lr', t, self.seq.task_names)}) or check the data")

    @staticmethod
    def _grads_finite(params: list[torch.nn.Parameter]) -> bool:
        grads = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        return bool(torch.stack(grads).all()) if grads else True

    def _all_ranks(self, ok: bool) -> bool:
        """``ok`` on every rank (one all-reduce when there are several)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([int(ok)], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return bool(t.item())
        return ok

    def _read_stats(self, stats: StepStats, t: int, task) -> tuple[float, float]:
        """The host reads the step figures (every rank: the non-finite decision is the same on all of them)."""
        report = stats.read()
        if report.first_bad_step is not None and self.cfg.train.nan_policy == "stop":
            raise TrainingError(f"non-finite loss ({report.first_bad_loss}) at task {t} ({task.name}) step "
                                f"{report.first_bad_step}; the last good checkpoint in "
                                f"{self.run_dir / 'checkpoints'} is kept (train.nan_policy=skip skips such steps)")
        self.progress.skipped_steps += report.skipped
        return report.loss, report.aux

    def _finite(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).to(torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:  # all ranks take the same decision
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)

    def _global_step(self, t: int) -> int:
        return sum(self.iterations(i) for i in range(t)) + self.progress.step

    def _bar(self, name: str, total: int):
        import sys
        if not (self.is_main and self.cfg.runtime.progress and sys.stderr.isatty()):  # bars for people, not logs
            return None
        from tqdm import tqdm
        return tqdm(total=total, initial=self.progress.step, desc=f"task {name}", unit="step", dynamic_ncols=True)

    # ---- end of task -----------------------------------------------------------------------------------
    def _activate_freeze(self, t: int) -> None:
        counts = {name: site.reduced_counts() for name, site in self.model.named_moe_sites()}
        newly = {name: site.freeze_most_selected(self.cfg.moe.freeze_top, counts[name])
                 for name, site in self.model.named_moe_sites()}
        self.progress.frozen.append(newly)
        if self.is_main:
            for name, c in counts.items():
                ids = torch.arange(len(c)).repeat_interleave(c.cpu())
                if ids.numel():
                    self.writer.add_histogram(f"experts/{name.replace('.', '_block')}", ids, t, bins=len(c))
            total = sum(len(v) for v in self.model.frozen_experts().values())
            self.writer.add_scalar("experts/frozen_total", total, t)
            self.writer.add_text("experts/frozen", json.dumps(self.model.frozen_experts()), t)
            log.info("task %d: froze %s; %d experts frozen in all", t + 1, json.dumps(newly), total)

    @torch.no_grad()
    def _image_features(self, task, split: str, limit: int) -> torch.Tensor:
        """Frozen-CLIP image embeddings of up to ``limit`` images of ``task``, gathered from every rank."""
        stream = eval_batches(task, split, batch_size=self.cfg.eval.batch_size, rank=self.info.rank,
                              world_size=self.info.world_size, workers=self.cfg.eval.workers,
                              preprocess=self.eval_tf, max_samples=limit, equal_batches=True,
                              max_bad_fraction=self.cfg.data.max_bad_fraction)
        feats = []
        self.model.eval()
        for images, labels, _ in stream:
            with self.autocast():
                f = selector_input(self.selector, self.model, images.to(self.device)).float()
            feats.append(f[labels.to(self.device) >= 0].cpu())
        local = torch.cat(feats) if feats else torch.zeros(0, self.model.clip.visual.output_dim)
        if self.info.world_size == 1:
            return local
        parts: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(parts, local)
        return torch.cat(parts)

    def _fit_ddas(self, t: int, task) -> None:
        if self.cfg.ddas.kind == "reference":
            return self._fit_reference_ddas(t, task)
        feats = self._image_features(task, "train", self.cfg.ddas.max_images)
        self.faults.at("ddas", t)
        ae, stats = fit_scorer(feats, self.cfg.ddas, seed=stable_seed(self.cfg.train.seed, "ddas", t))
        threshold = stats.threshold
        self.selector.add_task(ae, threshold)
        info = stats.as_dict() if hasattr(stats, "as_dict") else {"threshold": threshold}
        info = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
        self.progress.ddas.append(info)
        if self.is_main:
            log.info("task %d: DDAS %s on %d images, threshold %.5f", t + 1, self.cfg.ddas.scorer, len(feats),
                     threshold)
            self.writer.add_scalar("ddas/threshold", threshold, t)

    def _fit_reference_ddas(self, t: int, task) -> None:
        """The published selector: the reference-domain slot first (once), then this task's slot."""
        from .reference_ddas import fit_reference_slot
        if t == 0 and self.cfg.ddas.reference_task and not self.selector.has_reference_slot:
            info = fit_reference_slot(self, None)
            if self.is_main:
                log.info("DDAS (reference): reference-domain slot fitted, final loss %.5f", info["final_loss"])
        info = fit_reference_slot(self, t, task)
        self.faults.at("ddas", t)
        self.progress.ddas.append(info)
        if self.is_main:
            log.info("task %d: DDAS (reference) autoencoder, final loss %.5f, threshold %.5f", t,
                     info["final_loss"], info["threshold"])

    def _evaluator(self) -> Evaluator:
        eval_tf = self.train_tf if self.cfg.eval.transform == "train" else self.eval_tf
        if not hasattr(self, "frozen"):  # one cache for the whole run: the frozen backbone never changes
            from ..evaluation.frozen import frozen_cache_for
            self.frozen = frozen_cache_for(self.cfg, self.backbone_id, self.run_dir, self.method)
        return Evaluator(self.model, self.tokenizer, eval_tf, device=self.device, frozen=self.frozen,
                         batch_size=self.cfg.eval.batch_size, rank=self.info.rank, world_size=self.info.world_size,
                         workers=self.cfg.eval.workers, autocast=self.autocast, max_samples=self.cfg.eval.max_samples,
                         max_bad_fraction=self.cfg.data.max_bad_fraction,
                         collective_routes=self.cfg.moe.ep_size > 1 and self.method.per_task_routes)

    def eval_modes(self) -> list[EvalMode]:
        """oracle / agnostic / agnostic-reference, the same rule ``moecl eval`` applies to a saved run."""
        return eval_modes(self.cfg, self.selector)

    def _evaluate_row(self, t: int) -> None:
        """Row t of the accuracy matrix (moecl.evaluation.row, the function ``moecl eval`` calls too), then
        its log lines, TensorBoard scalars and the first mode's zero-shot row."""
        trained = t + 1
        rows = evaluate_row(self._evaluator(), self.seq, self.method, self.eval_modes(),
                            self.seq.task_names[:trained], cil=self.cfg.eval.cil,
                            templates=self.cfg.eval.templates, zero_shot=self.method.zero_shot_is_frozen)
        zs_row: Optional[list[float]] = None
        for k, (name, result) in enumerate(rows.items()):
            row = result.row
            if k == 0:
                zs_row = result.zero_shot_row
            if not self.cfg.eval.cil:
                self.progress.confusion[name] = result.confusion(len(self.seq.tasks))
            self.progress.rows.setdefault(name, []).append(row)
            if self.is_main:
                cols = ["seen classes"] if self.cfg.eval.cil else [x.name for x in self.seq.all_tasks()]
                log.info("after task %d/%d (%s) [%s]: %s", trained, len(self.seq.tasks), self.seq.tasks[t].name,
                         name, ", ".join(f"{c} {a:.1f}" for c, a in zip(cols, row)))
                for j, a in enumerate(row):
                    self.writer.add_scalar(f"accuracy_{name}/{cols[j]}", a, t)
        self.rank_log.eval_row(t, {name: result.read for name, result in rows.items()})
        work = next(iter(rows.values())).work
        self.progress.eval_work.append(work.as_dict())
        if self.is_main:
            log.info("row %d cost %d image forwards (%d frozen, %d adapted) and %d decoded images", trained,
                     work.forwards, work.plain, work.routed, work.decoded)
        if zs_row:
            self.progress.zero_shot.append(zs_row)
        elif self.progress.zero_shot:  # full-ft: the row recorded before training
            self.progress.zero_shot.append(list(self.progress.zero_shot[-1]))
        if self.is_main:
            self._warn_row(t)

    def _full_ft_zero_shot(self) -> None:
        """full-ft: the zero-shot row is the model's before any training (MTIL test sets; not for CIL)."""
        if self.method.zero_shot_is_frozen or self.cfg.eval.cil or self.progress.zero_shot or self.progress.task:
            return
        row = evaluate_row(self._evaluator(), self.seq, "zero-shot", [ORACLE], [], templates=self.cfg.eval.templates)
        self.progress.zero_shot.append(row["oracle"].row)

    def _warn_row(self, t: int) -> None:
        """Console lines a person should not miss: a learned task now below zero-shot, weak DDAS routing."""
        from ..evaluation.report import ROUTING_WARN_BELOW, routing_accuracy
        names = [x.name for x in self.seq.tasks]
        zs = self.progress.zero_shot[-1] if self.progress.zero_shot else None
        oracle = self.progress.rows.get("oracle", [[]])[-1] if "oracle" in self.progress.rows else None
        if zs is not None and oracle is not None and not self.cfg.eval.cil:
            for j in range(t + 1):
                if oracle[j] < zs[j]:
                    log.warning("task %d (%s) ends at %.1f%% after task %d, below the zero-shot backbone's %.1f%%: "
                                "training made it worse than no training", j + 1, names[j], oracle[j], t + 1, zs[j])
        elif zs is not None and oracle is not None and oracle[0] < zs[0]:
            log.warning("after task %d the seen-class accuracy %.1f%% is below the zero-shot backbone's %.1f%%",
                        t + 1, oracle[0], zs[0])
        conf = self.progress.confusion.get("agnostic")
        if conf and not self.cfg.eval.cil:
            acc = routing_accuracy(conf, len(self.seq.tasks), trained=t + 1)
            if acc is not None and acc < ROUTING_WARN_BELOW:
                log.warning("task-agnostic routing after task %d: %.1f%% of test images went to their own task's "
                            "route (below %.0f%%): DDAS separates domains, not classes cut from one domain; read "
                            "the agnostic rows with care (docs/metrics.md, 'Routing')", t + 1, acc,
                            ROUTING_WARN_BELOW)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def _save(self, task_end: bool, optimizer=None) -> None:
        """Write a checkpoint: rank 0 the shared files, every rank its own part (named by global rank), all into
        a staging folder that rank 0 commits (manifest + rename) once every required part is there. A full disk
        on any rank removes the staging folder and stops every rank with the size needed; values that are not
        finite never reach a checkpoint."""
        t, step = self.progress.task, self.progress.step
        name = ckpt.task_dir_name(t - 1) if task_end else ckpt.step_dir_name(t, step)
        root = self.run_dir / "checkpoints"
        tmp = ckpt.staging_dir(root, name)
        self._check_finite_state(root / name)
        state = {"progress": asdict(self.progress), "task_end": task_end, "world_size": self.info.world_size,
                 "ep_size": self.cfg.moe.ep_size, "method": self.method.name, "ddas_tasks": self.selector.num_tasks,
                 "backbone": self.backbone_id}

        def prepare() -> None:
            if self.is_main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)

        def write_parts() -> None:
            layout.write_shared(tmp, state, model=self.model, method=self.method, selector=self.selector,
                                adapter_meta={"backbone": self.backbone_id}, is_main=self.is_main)
            if optimizer is not None:  # mid-task: optimizer and RNG of every rank
                rank = self.info.rank
                rng = {"torch": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng["cuda"] = torch.cuda.get_rng_state()
                layout.write_rank(tmp, rank, optimizer.state_dict(), rng)
                if not self.ds.get("zero_optimization", {}).get("stage"):  # ZeRO state is flat: no names
                    reshard.save_names(tmp, rank, self.model, optimizer)  # lets it resume on another cluster shape

        def commit() -> None:
            if self.is_main:
                ckpt.wait_for_parts(tmp, state)
                ckpt.finalize(tmp, root / name, {"task": t, "step": step, "task_end": task_end,
                                                 "world_size": self.info.world_size})
                self.faults.checkpoint_done(t, step)
                ckpt.prune_steps(self.run_dir, self.cfg.train.keep_checkpoints if not task_end else 0)
                log.info("checkpoint %s", root / name)

        self._checkpoint_phase(prepare, root / name, tmp, optimizer)
        self._checkpoint_phase(write_parts, root / name, tmp, optimizer)
        self.faults.at("checkpoint", t - 1 if task_end else t, None if task_end else step)
        self._checkpoint_phase(commit, root / name, tmp, optimizer)

    def _checkpoint_phase(self, work, final: Path, tmp: Path, optimizer) -> None:
        """Run one phase of a checkpoint write on every rank, then agree: 0 done, 1 disk full, 2 another error.
        On failure rank 0 removes the staging folder and every rank stops (none is left at a barrier)."""
        code, error = 0, None
        try:
            work()
        except Exception as e:  # noqa: BLE001 - reported to every rank below, then raised
            code, error = (1 if ckpt.is_disk_full(e) else 2), e
        worst = code
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([code], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            worst = int(flag.item())
        if worst == 0:
            return
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if worst == 1:
            need = max(1, math.ceil(self._checkpoint_bytes(optimizer) / 2**20))
            try:
                free = f", {shutil.disk_usage(final.parent).free // 2**20} MB free"
            except OSError:
                free = ""
            msg = (f"disk full while writing checkpoint {final} ({need} MB needed{free}); its staging folder was "
                   f"removed and the last complete checkpoint is kept: free space on that disk, then resume "
                   "with --resume auto")
            if self.is_main:
                log.error(msg)
            raise CheckpointError(msg) from None
        if error is not None:
            raise error
        raise CheckpointError(f"checkpoint {final} was not written: another rank failed while writing its part "
                              "(its error is in that rank's output)")

    def _checkpoint_bytes(self, optimizer) -> int:
        """About how much a checkpoint takes on disk: adapter or backbone tensors, DDAS, every rank's optimizer."""
        tensors: list[torch.Tensor] = []
        if self.method.weights_file == "backbone":
            tensors += list(self.model.clip.state_dict().values())
        for site in self.model.sites():
            tensors += list(site.state_dict().values())
        total = sum(t.numel() * t.element_size() for t in tensors) * (self.cfg.moe.ep_size if
                                                                       self.method.per_task_routes else 1)
        if self.selector.num_tasks:
            total += sum(t.numel() * t.element_size() for t in self.selector.to_state()[0].values())
        if optimizer is not None:
            per_rank = sum(v.numel() * v.element_size() for st in optimizer.state_dict().get("state", {}).values()
                           if isinstance(st, dict) for v in st.values() if isinstance(v, torch.Tensor))
            total += per_rank * self.info.world_size
        return total

    def _check_finite_state(self, final: Path) -> None:
        """Refuse to checkpoint NaN/inf weights (a checkpoint is a resume point: it must be a good one)."""
        if not self.method.trains_anything:
            return
        params = (self.model.clip.named_parameters() if self.method.weights_file == "backbone" else
                  ((f"{i}.{n}", p) for i, s in enumerate(self.model.sites()) for n, p in s.named_parameters()))
        bad = [n for n, p in params if not bool(torch.isfinite(p.detach()).all())]
        if self._all_ranks(not bad):
            return
        t, step = self.progress.task, self.progress.step
        raise TrainingError(f"non-finite weights at task {t} step {step} ({', '.join(bad[:3]) or 'on another rank'}"
                            f"{' ...' if len(bad) > 3 else ''}); {final} is not written and the last good "
                            f"checkpoint in {final.parent} is kept (lower train.lr, or train.nan_policy=skip)")

    def _maybe_resume(self) -> None:
        if not self.resume:
            return
        if self.resume == "auto":
            path = ckpt.latest_valid(self.run_dir)
            if path is None:
                if self.is_main:
                    log.info("--resume auto: no valid checkpoint in %s; starting from the beginning", self.run_dir)
                return
        else:
            path = layout.resolve(self.run_dir, self.resume)
        state = layout.read_state(path)
        self._saved_shape = (state["world_size"], state.get("ep_size", 1))
        reshape = self._saved_shape != (self.info.world_size, self.cfg.moe.ep_size)
        if not state["task_end"] and reshape and not (reshard.can_reshard(path, state["world_size"])
                                                      and not self.ds.get("zero_optimization", {}).get("stage")):
            raise CheckpointError(f"{path} is a mid-task checkpoint of {state['world_size']} rank(s) at moe.ep_size="
                                  f"{self._saved_shape[1]} that cannot be re-sharded (ZeRO stage > 0, or written "
                                  "by an older moecl); resume it with the same ranks and ep_size, or resume from "
                                  "its task-end checkpoint (those load at any size)")
        check_checkpoint(path, self.backbone_id, f"this run's config ({self.run_dir / 'config.yaml'})")
        self.progress = Progress(**state["progress"])
        _, sel = layout.load_weights(path, self.model, self.cfg.ddas)
        if sel is not None:
            self.selector = sel.to(self.device) if getattr(sel, "reads_images", False) else sel
        self._resume_path = path if not state["task_end"] else None
        if self.is_main:
            log.info("resumed from %s (task %d, step %d)", path, self.progress.task, self.progress.step)
            if reshape:
                t = self.progress.task
                total = self.iterations(t) if t < len(self.seq.tasks) else 0
                log.info("resumed on another cluster shape: %s", reshard.shape_change(
                    self.cfg, self._saved_shape, self.info.world_size, self.where(), total, state["task_end"]))

    def _load_optimizer(self, optimizer) -> dict[str, torch.Tensor]:
        """Mid-task resume: optimizer state; returns the RNG state as it was when the checkpoint was taken."""
        path = getattr(self, "_resume_path", None)
        if path is None:
            raise CheckpointError("internal: mid-task resume without a checkpoint")
        saved_world, saved_ep = getattr(self, "_saved_shape", (self.info.world_size, self.cfg.moe.ep_size))
        if (saved_world, saved_ep) != (self.info.world_size, self.cfg.moe.ep_size):
            restored = reshard.load_resharded(optimizer, self.model, path, saved_world)
            total = sum(len(g["params"]) for g in optimizer.param_groups)
            if self.is_main:
                log.info("optimizer state re-sharded by parameter name: %d of %d parameters restored", restored, total)
        elif compat.optimizer_loads_every_rank(optimizer):  # ZeRO 1/2: a list indexed by data-parallel rank
            optimizer.load_state_dict([layout.read_optimizer(path, r) for r in range(self.info.world_size)])
        else:
            optimizer.load_state_dict(layout.read_optimizer(path, self.info.rank))
        self._resume_path = None
        if self.info.rank < saved_world:
            return layout.read_rng(path, self.info.rank)
        gen = torch.Generator()  # a rank the old shape did not have: a seed of its own
        gen.manual_seed(stable_seed(self.cfg.train.seed, "task", self.progress.task, self.info.rank,
                                     self.progress.step) % 2**63)
        return {"torch": gen.get_state()}

    # ---- report ----------------------------------------------------------------------------------------
    def _report(self) -> dict[str, Any]:
        from ..evaluation.report import build_method_entry, new_report
        names = [t.name for t in self.seq.tasks]
        held = [t.name for t in self.seq.held_out]
        trainable = {"total": sum(p.numel() for s in self.model.sites() for p in s.parameters())}
        report = new_report(names, held, config=self.cfg.model_dump(mode="json"),
                            wall_time_s=self.progress.wall_time_s,
                            gpu_hours=(self.progress.wall_time_s / 3600 * self.info.world_size
                                       if self.device.type == "cuda" else 0.0),
                            peak_memory_bytes=(torch.cuda.max_memory_allocated() if self.device.type == "cuda"
                                               else _peak_rss()),
                            ddas=self.progress.ddas, frozen=self.progress.frozen,
                            resources=self.progress.resources,
                            skipped_steps=self.progress.skipped_steps)
        report["trainable_parameters"] = trainable
        report["eval_work"] = list(self.progress.eval_work)  # per row: images through each forward, decoded
        kind = "cil" if self.cfg.eval.cil else "mtil"
        entries = {}
        for mode, rows in self.progress.rows.items():
            matrix = [r[0] for r in rows] if kind == "cil" else rows
            entries[mode] = build_method_entry(matrix, kind, self.progress.confusion.get(mode),
                                               names=None if kind == "cil" else names + held,
                                               num_tasks=None if kind == "cil" else len(names))
        method = self.method.report_name
        zs = self.progress.zero_shot[: len(next(iter(self.progress.rows.values()), []))]
        if zs and self.method.trains_anything:  # every report carries the untouched backbone's row
            report["methods"]["zero-shot"] = {"oracle": build_method_entry(
                [r[0] for r in zs] if kind == "cil" else zs, kind,
                names=None if kind == "cil" else names + held, num_tasks=None if kind == "cil" else len(names))}
        main = {m: e for m, e in entries.items() if m in ("oracle", "agnostic")}
        report["methods"][method] = main
        if "agnostic-reference" in entries:
            report["methods"]["moe-adapters-reference"] = {"oracle": entries["oracle"],
                                                           "agnostic": entries["agnostic-reference"]}
        return report

    def _write_report(self) -> None:
        if not self.is_main:
            return
        from ..evaluation.report import write_report
        write_report(self.run_dir, self._report())


def _grad_norm(params: list[torch.nn.Parameter]) -> Optional[float]:
    """L2 norm of this rank's gradients (all of them at ep_size 1; the local expert shard otherwise), or None
    when the optimizer holds them (ZeRO). One host sync, taken only at logging steps."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(cfg: Config, run_dir: str | Path, resume: Optional[str] = None,
          allow_config_change: bool = False) -> dict[str, Any]:
    """The whole sequence; a rank that stops answering ends every rank with a message naming it."""
    info = init_distributed(cfg.runtime.device, cfg.runtime.collective_timeout_s)
    trainer: Optional[ContinualTrainer] = None
    with cluster.PeerWatch(info, cfg.runtime.collective_timeout_s,
                           where=lambda: trainer.where() if trainer is not None else "start-up"):
        trainer = ContinualTrainer(cfg, run_dir, resume, allow_config_change)
        return trainer.run()
