"""The continual task loop: for each task, train -> activate-freeze -> DDAS -> evaluate a row -> checkpoint."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from ..config import Config
from ..data import Sequence, eval_batches, fill_template, load_sequence, make_transforms, train_batches
from ..ddas import DDASSelector, fit_autoencoder
from ..errors import CheckpointError, MoeclError
from ..evaluation.evaluator import Evaluator, cil_label_set, confusion_row, label_set
from ..evaluation.loading import EvalMode, eval_modes
from ..model import build_model, image_size_of, tokenizer_for
from ..model.clip import MoECLIP
from ..model.state import load_adapter_state, save_adapter_state
from ..runtime import DistInfo, init_distributed
from . import checkpoint as ckpt
from .faults import checkpoint_saved, maybe_kill, nan_here, resources, step_finished
from .engine import autocast_dtype, build_engine, ds_config, lr_at, micro_batch

log = logging.getLogger("moecl")

METHOD_NAMES = {"moe-adapters": "moecl", "full-ft": "continual-ft", "zero-shot": "zero-shot",
                "dense-adapter": "dense-adapter"}
ADAPTER_METHOD = {"moe-adapters": "moe-adapters", "dense-adapter": "dense-adapter", "full-ft": "full-ft",
                  "zero-shot": "zero-shot"}


class TrainingError(MoeclError):
    """Training cannot go on (non-finite loss, ...)."""


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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stable_seed(*parts: Any) -> int:
    import hashlib
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)


def class_tokens(tokenizer, task) -> torch.Tensor:
    """The training prompts of ``task``'s classes, in label order (one row per class)."""
    return tokenizer([fill_template(task.train_template, c) for c in task.classnames])


def task_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The training objective: CLIP logits against the task's class prompts, cross-entropy (fp32)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


class ContinualTrainer:
    """Runs a whole task sequence; see ``moecl train --help``."""

    def __init__(self, cfg: Config, run_dir: str | Path, resume: Optional[str] = None):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.info: DistInfo = init_distributed(cfg.runtime.device)
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.device = self.info.device
        self.method = cfg.train.method
        self._setup_run_dir()
        self.seq: Sequence = load_sequence(cfg.data.root, cfg.data.sequence)
        if not self.seq.tasks:
            raise MoeclError(f"sequence {self.seq.name!r} names no tasks")
        self.ds = ds_config(cfg, self.info.world_size, self.device)
        self.micro = micro_batch(cfg, self.info.world_size)
        dtype = autocast_dtype(self.ds)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        _seed_all(cfg.train.seed)
        self.model: MoECLIP = build_model(cfg.model, cfg.moe, ADAPTER_METHOD[self.method]).to(self.device)
        if self.method == "moe-adapters" and cfg.moe.ep_size > 1:
            self.model.setup_expert_parallel()
        self.tokenizer = tokenizer_for(cfg.model)
        pcfg = getattr(self.model.clip.visual, "preprocess_cfg", {}) or {}
        self.train_tf, self.eval_tf = make_transforms(image_size_of(self.model.clip), cfg.data.train_crop_scale,
                                                      mean=pcfg.get("mean"), std=pcfg.get("std"))
        self.selector = DDASSelector()
        self.progress = Progress()
        self.writer = self._tensorboard()

    # ---- run folder, logs ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def _setup_run_dir(self) -> None:
        cfg_path = self.run_dir / "config.yaml"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resume and cfg_path.is_file():
                self._check_resume_config(cfg_path)
            elif cfg_path.is_file() and ckpt.list_checkpoints(self.run_dir):
                raise CheckpointError(f"{self.run_dir} already holds a run; pass --resume auto to continue it "
                                      "or choose another --out")
            cfg_path.write_text(self.cfg.to_yaml())
            handler = logging.FileHandler(self.run_dir / "train.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        self._barrier()

    def _check_resume_config(self, path: Path) -> None:
        saved = yaml.safe_load(path.read_text())
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

    def _tensorboard(self):
        if not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.run_dir / "tb"))

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # ---- the loop --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.time()
        self._maybe_resume()
        num_tasks = len(self.seq.tasks)
        if self.is_main:
            log.info("run %s: %d tasks (%s), method %s, %d rank(s) on %s", self.run_dir, num_tasks,
                     ", ".join(self.seq.task_names), self.method, self.info.world_size, self.device)
        wall_before = self.progress.wall_time_s
        while self.progress.task < num_tasks:
            t = self.progress.task
            task = self.seq.tasks[t]
            if self.method != "zero-shot":
                self._train_task(t, task)
            if self.method == "moe-adapters":
                self._activate_freeze(t)
                if self.cfg.ddas.enabled:
                    self._fit_ddas(t, task)
            self._evaluate_row(t)
            self.progress.wall_time_s = wall_before + time.time() - start
            self.progress.task, self.progress.step = t + 1, 0
            self.progress.resources.append(resources())
            self._save(task_end=True)
            self._write_report()
            if self.is_main:
                log.info("task %d done: %s", t, json.dumps(self.progress.resources[-1]))
            maybe_kill("between", t, None, self.info.rank)
            if self.method == "moe-adapters":
                self.model.reset_counts()
        if self.writer:
            self.writer.close()
        return self._report()

    def iterations(self, t: int) -> int:
        if self.cfg.train.epochs:
            count = self.seq.tasks[t].count("train")
            return max(1, math.ceil(self.cfg.train.epochs * count / self.cfg.data.batch_size))
        return int(self.cfg.per_task("iterations", t, len(self.seq.tasks)))

    def _train_task(self, t: int, task) -> None:
        cfg = self.cfg
        while self.model.num_tasks <= t:
            self.model.add_task()
        params = self.model.trainable_parameters(t if self.method == "moe-adapters" else 0)
        total = self.iterations(t)
        peak = float(cfg.per_task("lr", t, len(self.seq.tasks)))
        engine, optimizer = build_engine(self.model, params, cfg, self.ds, lr_at(0, total, peak, cfg.train.warmup))
        if self.progress.step:
            self._load_optimizer(optimizer)  # restores the RNG of the chunk boundary too
        else:  # each task starts from its own seed, so a resume from a task end replays it exactly
            torch.manual_seed(_stable_seed(cfg.train.seed, "task", t, self.info.rank) % 2**63)
        tokens = class_tokens(self.tokenizer, task).to(self.device)
        text_task = t if self.method == "moe-adapters" else 0
        chunk = cfg.train.checkpoint_every or total
        bar = self._bar(task.name, total)
        n_params = sum(p.numel() for p in params)
        if self.is_main:
            log.info("task %d/%d %s: %d steps, lr %g, %d classes, %d trainable parameters", t + 1,
                     len(self.seq.tasks), task.name, total, peak, task.num_classes, n_params)
        self.model.train()
        tic, seen = time.time(), 0
        while self.progress.step < total:
            step0 = self.progress.step
            stream = train_batches(task, batch_size=self.micro, rank=self.info.rank, world_size=self.info.world_size,
                                   workers=cfg.data.workers, seed=_stable_seed(cfg.train.seed, t, step0 // chunk),
                                   preprocess=self.train_tf, shuffle_buffer=cfg.data.shuffle_buffer,
                                   resampled=cfg.data.resampled, max_bad_fraction=cfg.data.max_bad_fraction,
                                   pin_memory=self.device.type == "cuda")
            batches = iter(stream)
            end = min((step0 // chunk + 1) * chunk, total)
            while self.progress.step < end:
                step = self.progress.step
                lr = lr_at(step, total, peak, cfg.train.warmup)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss_sum, aux_sum = 0.0, 0.0
                for _ in range(cfg.train.grad_accum):
                    images, labels = next(batches)
                    images, labels = images.to(self.device, non_blocking=True), labels.to(self.device)
                    with self.autocast():
                        logits = engine(images, tokens, text_task if self.method != "full-ft" else -1)
                    loss = task_loss(logits, labels, cfg.train.label_smoothing)
                    if nan_here(t, step, self.info.rank):
                        loss = loss * float("nan")
                    aux = self.model.aux_loss().to(loss.device)
                    if cfg.moe.aux_loss_weight:
                        loss = loss + cfg.moe.aux_loss_weight * aux
                    if not self._finite(loss):
                        if cfg.train.nan_policy == "stop":
                            raise TrainingError(f"non-finite loss ({loss.item()}) at task {t} ({task.name}) step "
                                                f"{step}; the last good checkpoint in {self.run_dir / 'checkpoints'} "
                                                "is kept (train.nan_policy=skip skips such steps)")
                        self.progress.skipped_steps += 1
                        loss = loss.nan_to_num(0.0) * 0.0
                    engine.backward(loss)
                    loss_sum += float(loss.detach()) / cfg.train.grad_accum
                    aux_sum += float(aux.detach()) / cfg.train.grad_accum
                    seen += images.shape[0] * self.info.world_size
                maybe_kill("step", t, step, self.info.rank)
                logging_step = self.is_main and ((step + 1) % cfg.runtime.log_every == 0 or step + 1 == total)
                grad_norm = _grad_norm(params) if logging_step else None  # before step() clears the gradients
                engine.step()
                step_finished(t, step, self.info.rank)
                self.progress.step += 1
                if self.is_main and (self.progress.step % cfg.runtime.log_every == 0 or self.progress.step == total):
                    rate = seen / max(time.time() - tic, 1e-9)
                    gstep = self._global_step(t)
                    self.writer.add_scalar("train/loss", loss_sum, gstep)
                    self.writer.add_scalar("train/lr", lr, gstep)
                    self.writer.add_scalar("train/aux_loss", aux_sum, gstep)
                    gn = engine.get_global_grad_norm()  # set by DeepSpeed's ZeRO / bf16 optimizers only
                    gn = grad_norm if gn is None else gn
                    if gn is not None:
                        self.writer.add_scalar("train/grad_norm", float(gn), gstep)
                    self.writer.add_scalar("train/images_per_s", rate, gstep)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", ips=f"{rate:.0f}")
                if bar is not None:
                    bar.update(1)
            del batches
            if cfg.train.checkpoint_every and self.progress.step < total:
                self._save(task_end=False, optimizer=optimizer)
        if bar is not None:
            bar.close()
        engine.destroy()
        self.model.eval()

    def _finite(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).to(torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:  # all ranks take the same decision
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok)

    def _global_step(self, t: int) -> int:
        return sum(self.iterations(i) for i in range(t)) + self.progress.step

    def _bar(self, name: str, total: int):
        if not (self.is_main and self.cfg.runtime.progress):
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
            log.info("task %d: froze %s; %d experts frozen in all", t, json.dumps(newly), total)

    @torch.no_grad()
    def _image_features(self, task, split: str, limit: int) -> torch.Tensor:
        """Frozen-CLIP image embeddings of up to ``limit`` images of ``task``, gathered from every rank."""
        stream = eval_batches(task, split, batch_size=self.cfg.eval.batch_size, rank=self.info.rank,
                              world_size=self.info.world_size, workers=self.cfg.eval.workers,
                              preprocess=self.eval_tf, max_samples=limit, equal_batches=True)
        feats = []
        self.model.eval()
        for images, labels, _ in stream:
            with self.autocast():
                f = self.model.encode_image(images.to(self.device), -1, normalize=True).float()
            feats.append(f[labels.to(self.device) >= 0].cpu())
        local = torch.cat(feats) if feats else torch.zeros(0, self.model.clip.visual.output_dim)
        if self.info.world_size == 1:
            return local
        parts: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(parts, local)
        return torch.cat(parts)

    def _fit_ddas(self, t: int, task) -> None:
        feats = self._image_features(task, "train", self.cfg.ddas.max_images)
        maybe_kill("ddas", t, None, self.info.rank)
        ae, stats = fit_autoencoder(feats, self.cfg.ddas, seed=_stable_seed(self.cfg.train.seed, "ddas", t))
        threshold = stats.threshold
        self.selector.add_task(ae, threshold)
        info = stats.as_dict() if hasattr(stats, "as_dict") else {"threshold": threshold}
        info = {k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))}
        self.progress.ddas.append(info)
        if self.is_main:
            log.info("task %d: DDAS autoencoder on %d images, threshold %.5f", t, len(feats), threshold)
            self.writer.add_scalar("ddas/threshold", threshold, t)

    def _evaluator(self) -> Evaluator:
        return Evaluator(self.model, self.tokenizer, self.eval_tf, device=self.device,
                         batch_size=self.cfg.eval.batch_size, rank=self.info.rank, world_size=self.info.world_size,
                         workers=self.cfg.eval.workers, autocast=self.autocast, max_samples=self.cfg.eval.max_samples,
                         collective_routes=self.cfg.moe.ep_size > 1 and self.method == "moe-adapters")

    def eval_modes(self) -> list[EvalMode]:
        """oracle / agnostic / agnostic-reference, the same rule ``moecl eval`` applies to a saved run."""
        return eval_modes(self.cfg, self.selector)

    def _oracle_route(self, j: int, trained: int) -> int:
        if self.method == "moe-adapters":
            return j if j < trained else -1
        if self.method == "dense-adapter":
            return 0
        return -1

    def _evaluate_row(self, t: int) -> None:
        ev = self._evaluator()
        trained = t + 1
        for mode in self.eval_modes():
            name, kind, selector, decision = mode.name, mode.kind, mode.selector, mode.decision
            if self.cfg.eval.cil:
                seen = self.seq.tasks[:trained]
                labels = cil_label_set(seen, self.cfg.eval.templates)
                correct = total = 0
                offset = 0
                for j, task in enumerate(seen):
                    r = ev.evaluate(task, labels, mode=kind, oracle_route=self._oracle_route(j, trained),
                                    selector=selector, decision=decision, label_offset=offset, trained=trained)
                    correct, total = correct + r.correct, total + r.total
                    offset += task.num_classes
                row = [100.0 * correct / max(total, 1)]
            else:
                row, confusion = [], []
                for j, task in enumerate(self.seq.tasks + self.seq.held_out):
                    r = ev.evaluate(task, label_set(task, self.cfg.eval.templates), mode=kind,
                                    oracle_route=self._oracle_route(j, trained) if j < len(self.seq.tasks) else -1,
                                    selector=selector, decision=decision, trained=trained)
                    row.append(r.accuracy)
                    confusion.append(confusion_row(r, len(self.seq.tasks)))
                self.progress.confusion[name] = confusion
            self.progress.rows.setdefault(name, []).append(row)
            if self.is_main:
                log.info("after task %d [%s]: %s", t, name, " ".join(f"{a:.1f}" for a in row))
                for j, a in enumerate(row):
                    col = (self.seq.tasks + self.seq.held_out)[j].name if not self.cfg.eval.cil else "seen"
                    self.writer.add_scalar(f"accuracy_{name}/{col}", a, t)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def _save(self, task_end: bool, optimizer=None) -> None:
        t, step = self.progress.task, self.progress.step
        name = ckpt.task_dir_name(t - 1) if task_end else ckpt.step_dir_name(t, step)
        root = self.run_dir / "checkpoints"
        tmp = ckpt.staging_dir(root, name)
        if self.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self._barrier()
        save_adapter_state(self.model, tmp / "adapters") if self.method in ("moe-adapters", "dense-adapter") else None
        if self.is_main:
            if self.method == "full-ft":
                from safetensors.torch import save_file
                save_file({k: v.contiguous() for k, v in self.model.clip.state_dict().items()},
                          str(tmp / "backbone.safetensors"))
            if self.selector.num_tasks:
                from safetensors.torch import save_file
                tensors, meta = self.selector.to_state()
                save_file(tensors, str(tmp / "ddas.safetensors"))
                (tmp / "ddas.json").write_text(json.dumps(meta))
            (tmp / "trainer.json").write_text(json.dumps({"progress": asdict(self.progress), "task_end": task_end,
                                                          "world_size": self.info.world_size,
                                                          "ep_size": self.cfg.moe.ep_size}, indent=1))
        if optimizer is not None:  # mid-task: optimizer and RNG of every rank
            rank = self.info.rank
            ckpt.save_nested(optimizer.state_dict(), tmp, f"optimizer-rank{rank}")
            rng = {"torch": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            ckpt.save_nested(rng, tmp, f"rng-rank{rank}")
        self._barrier()
        maybe_kill("checkpoint", t - 1 if task_end else t, None if task_end else step, self.info.rank)
        if self.is_main:
            ckpt.finalize(tmp, root / name, {"task": t, "step": step, "task_end": task_end})
            checkpoint_saved(t, step)
            ckpt.prune_steps(self.run_dir, self.cfg.train.keep_checkpoints if not task_end else 0)
            log.info("checkpoint %s", root / name)
        self._barrier()

    def _maybe_resume(self) -> None:
        if not self.resume:
            return
        path = ckpt.latest_valid(self.run_dir) if self.resume == "auto" else Path(self.resume)
        if path is None:
            if self.is_main:
                log.info("--resume auto: no valid checkpoint in %s; starting from the beginning", self.run_dir)
            return
        problem = ckpt.verify(path)
        if problem:
            raise CheckpointError(f"{path} is not a valid checkpoint: {problem}")
        state = json.loads((path / "trainer.json").read_text())
        if not state["task_end"] and state["world_size"] != self.info.world_size:
            raise CheckpointError(f"{path} is a mid-task checkpoint of {state['world_size']} rank(s); resume it "
                                  f"with the same number of ranks (task-end checkpoints load at any size)")
        self.progress = Progress(**state["progress"])
        if (path / "adapters").is_dir():
            load_adapter_state(self.model, path / "adapters")
        if (path / "backbone.safetensors").is_file():
            from safetensors.torch import load_file
            self.model.clip.load_state_dict(load_file(str(path / "backbone.safetensors")))
        if (path / "ddas.safetensors").is_file():
            from safetensors.torch import load_file
            self.selector = DDASSelector.from_state(load_file(str(path / "ddas.safetensors")),
                                                    json.loads((path / "ddas.json").read_text()))
        self._resume_path = path if not state["task_end"] else None
        if self.is_main:
            log.info("resumed from %s (task %d, step %d)", path, self.progress.task, self.progress.step)

    def _load_optimizer(self, optimizer) -> None:
        """Mid-task resume: optimizer state, then the RNG exactly as it was when the checkpoint was taken."""
        path = getattr(self, "_resume_path", None)
        if path is None:
            raise CheckpointError("internal: mid-task resume without a checkpoint")
        if hasattr(optimizer, "_load_legacy_checkpoint"):  # ZeRO 1/2: a list indexed by data-parallel rank
            optimizer.load_state_dict([ckpt.load_nested(path, f"optimizer-rank{r}")
                                       for r in range(self.info.world_size)])
        else:
            optimizer.load_state_dict(ckpt.load_nested(path, f"optimizer-rank{self.info.rank}"))
        rng = ckpt.load_nested(path, f"rng-rank{self.info.rank}")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self._resume_path = None

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
        kind = "cil" if self.cfg.eval.cil else "mtil"
        entries = {}
        for mode, rows in self.progress.rows.items():
            matrix = [r[0] for r in rows] if kind == "cil" else rows
            entries[mode] = build_method_entry(matrix, kind, self.progress.confusion.get(mode),
                                               names=None if kind == "cil" else names + held,
                                               num_tasks=None if kind == "cil" else len(names))
        method = METHOD_NAMES[self.method]
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


def train(cfg: Config, run_dir: str | Path, resume: Optional[str] = None) -> dict[str, Any]:
    return ContinualTrainer(cfg, run_dir, resume).run()
