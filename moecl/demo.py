"""``moecl demo``: the whole method end to end on the built-in synthetic benchmark, in minutes on a CPU.

1. Build the synthetic world (cached): 7 visual domains as WebDataset shards, 5 learned in sequence and
   2 held out for zero-shot, plus an image-caption set covering all 7 (``data_tools.synthetic``).
2. Pretrain a tiny CLIP on those captions (cached, :mod:`moecl.pretrain`): the foundation whose zero-shot
   ability continual learning must keep.
3. Run the sequence through the real stack (DeepSpeed engine per task, MoE-adapters, activate-freeze,
   DDAS, the evaluator), one sub-run per method under ``RUN/runs/``, all in this process:
   ``zero-shot`` (no training), ``continual-ft`` (full fine-tuning, task after task), and
   ``moe-adapters``, whose one trained model is evaluated two ways: the reference setting
   (``moe-adapters-reference``: DDAS decides per test batch with one fixed threshold) and moecl's
   default (``moecl``: per sample, per-task thresholds calibrated on held-out training images).
4. Merge everything into ``RUN/report.json`` (+ report.md, heatmaps in ``RUN/plots``, TensorBoard in
   ``RUN/tb``), print the accuracy matrices and the Transfer / Avg / Last summary, and check the two
   claims the method makes against zero-shot and continual fine-tuning.

The continual-learning settings, the world's size and the pretraining recipe are ``moecl/configs/demo.yaml``
(its ``demo:`` mapping: :data:`WORLD`, :data:`PRETRAIN`). ``--quick`` shrinks all three (a smoke test).
A finished sub-run with the same config is reused (``--resume auto``), an interrupted one resumes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .pretrain import demo_backbone, format_zero_shot, pretrain_clip  # noqa: F401  (demo_backbone: public name)
from .pretrained import (DEMO_CONFIG, INIT_CHECKPOINTS, PRETRAIN, PRETRAIN_QUICK, WORLD,  # noqa: F401
                         WORLD_QUICK, default_cache)
from .pretrained import world_dir as _world_dir

log = logging.getLogger("moecl.demo")


# Sub-runs: (folder, overrides on top of demo.yaml). moe-adapters is trained once and evaluated in both
# DDAS settings (eval.reference_ddas), so the two settings differ only in how test images are routed.
# Full fine-tuning moves every CLIP weight: its learning rate is the usual order of magnitude below the
# adapters' (and the pretraining peak), as in ZSCL's full fine-tuning baseline.
METHOD_RUNS: list[tuple[str, list[str]]] = [
    ("zero-shot", ["train.method=zero-shot"]),
    ("continual-ft", ["train.method=full-ft", "train.lr=1.0e-4"]),
    ("moe-adapters", ["train.method=moe-adapters", "eval.reference_ddas=true"]),
]
QUICK_OVERRIDES = ["train.iterations=3", "train.warmup=1", "ddas.iterations=20", "ddas.max_images=128",
                   "data.batch_size=16", "data.shuffle_buffer=32", "eval.batch_size=128", "runtime.log_every=1",
                   "runtime.progress=false"]

HEADLINE = [("zero-shot", "oracle"), ("continual-ft", "oracle"), ("moe-adapters-reference", "agnostic"),
            ("moecl", "agnostic")]
TRANSFER_TOLERANCE = 1.0  # points: "MoE-adapters' Transfer stays within 1 point of zero-shot"


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _waiting(what: str):
    from .folder_lock import describe_holder
    return lambda holder: _say(f"  waiting: {what} is being built by {describe_holder(holder)}; it is reused "
                               "when that finishes")


def build_world_cached(world: Path, params: dict[str, Any], *, workers: int, progress: bool) -> Path:
    """The synthetic world in the shared cache: reused when complete; otherwise built by one process at a
    time (a lock beside it; another demo waits, then reuses it) into a staging folder renamed into place, so
    no reader ever sees a half-written world. An interrupted build resumes from its staging folder."""
    from data_tools.synthetic import _is_built, build_world, world_params

    from .folder_lock import FolderLock
    want = world_params(**params)
    done = lambda: _is_built(world, want)  # noqa: E731
    if done():
        return world
    world.parent.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(world.parent, "moecl demo: building the synthetic world", name=f".{world.name}.lock")
    if not lock.wait_acquire(_waiting(f"the world {world}"), done):
        return world
    try:
        if done():
            return world
        staging = world.parent / f".{world.name}.partial"
        if world.exists() and not staging.exists():  # an older in-place build: resume it in the staging folder
            os.replace(world, staging)
        build_world(staging, workers=workers, progress=progress, **params)
        if world.exists():
            shutil.rmtree(world)
        os.replace(staging, world)
    finally:
        lock.release()
    return world


def pretrain_cached(world: Path, cache_dir: Path, params: PretrainParams, **kwargs):
    """:func:`pretrain_clip` (which writes into a staging folder and renames), one process at a time per
    cache entry: a second demo waits for the first and reuses its weights instead of training again and
    replacing the folder under it."""
    from .folder_lock import FolderLock
    from .pretrain import cache_key, cached_result
    hit = cached_result(params, world, cache_dir)
    if hit is not None:
        return hit
    key = cache_key(params, world)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    lock = FolderLock(cache_dir, "moecl demo: pretraining", name=f".{key}.lock")
    lock.wait_acquire(_waiting(f"the pretrained {params.model} ({Path(cache_dir) / key})"),
                      lambda: cached_result(params, world, cache_dir) is not None)
    try:
        return pretrain_clip(world, cache_dir, params, **kwargs)  # a cache hit when the other one finished
    finally:
        lock.release()


class _DropRandomInitNotice(logging.Filter):
    """open_clip warns 'No pretrained weights loaded' for every model built before init_checkpoint is
    loaded into it; in the demo that is expected, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _quiet_console():
    """Console: the demo's own lines, progress bars and warnings; the trainers' INFO lines still go to
    each sub-run's train.log. Logging state and torch's thread count are restored afterwards."""
    import torch
    names = ("DeepSpeed", "deepspeed", "torch.distributed", "open_clip")
    levels = {n: logging.getLogger(n).level for n in names}
    ours = logging.getLogger("moecl")
    propagate, threads = ours.propagate, torch.get_num_threads()
    notice = _DropRandomInitNotice()
    root = logging.getLogger()
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    root.addFilter(notice)
    ours.propagate = False
    try:
        yield
    finally:
        ours.propagate = propagate
        root.removeFilter(notice)
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
        torch.set_num_threads(threads)


def _config(overrides: list[str]):
    from .config import load_config
    return load_config(DEMO_CONFIG, overrides)


def _prepare_run_dir(run_dir: Path, cfg) -> Optional[str]:
    """``auto`` to resume a sub-run of the same config; a sub-run of another config is replaced."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    if saved.read_text() == cfg.to_yaml():
        return "auto"
    from .folder_lock import FolderBusy, FolderLock, describe_holder
    holder = FolderLock(run_dir, "moecl demo").holder()
    if holder is not None:  # never delete a run another live process is writing
        raise FolderBusy(f"{run_dir} holds a run of another configuration that {describe_holder(holder)} is "
                         f"writing; wait for it or use another --out")
    _say(f"  {run_dir} holds a run of another configuration: starting it afresh")
    shutil.rmtree(run_dir)
    return None


def _cpu_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) - workers)


def check_claims(report: dict[str, Any], tolerance: float = TRANSFER_TOLERANCE) -> list[dict[str, Any]]:
    """The method's two claims, read from the merged report (task-agnostic modes for MoE-adapters)."""
    methods = report["methods"]
    zs = methods["zero-shot"]["oracle"]["metrics"]
    ft = methods["continual-ft"]["oracle"]["metrics"]
    out = []
    for name in ("moecl", "moe-adapters-reference"):
        moe = methods[name]["agnostic"]["metrics"]
        out.append({"claim": f"{name} (agnostic) Last > continual-ft Last", "value": moe["last"],
                    "baseline": ft["last"], "holds": bool(moe["last"] > ft["last"])})
        out.append({"claim": f"{name} (agnostic) Transfer within {tolerance:g} point of zero-shot",
                    "value": moe["transfer"], "baseline": zs["transfer"],
                    "holds": bool(abs(moe["transfer"] - zs["transfer"]) <= tolerance)})
    out.append({"claim": f"continual-ft Transfer falls below zero-shot (by more than {tolerance:g} point)",
                "value": ft["transfer"], "baseline": zs["transfer"],
                "holds": bool(ft["transfer"] < zs["transfer"] - tolerance)})
    return out


def _claims_text(claims: list[dict[str, Any]], judged: bool = True) -> str:
    def verdict(c):
        return ("holds" if c["holds"] else "FAILS") if judged else "not judged"
    return "\n".join(f"  [{verdict(c)}] {c['claim']}: {c['value']:.1f} vs {c['baseline']:.1f}" for c in claims)


def merge_reports(reports: dict[str, dict[str, Any]], demo_info: dict[str, Any],
                  wall_time_s: float) -> dict[str, Any]:
    """One report with every method of every sub-run (names: zero-shot, continual-ft, moecl, ...)."""
    from .evaluation.report import new_report
    base = reports["moe-adapters"]
    merged = new_report(base["tasks"], base["held_out"], config=base.get("config", {}), wall_time_s=wall_time_s,
                        gpu_hours=sum(r.get("gpu_hours") or 0.0 for r in reports.values()),
                        peak_memory_bytes=max((r.get("peak_memory_bytes") or 0) for r in reports.values()))
    merged["trainable_parameters"] = base.get("trainable_parameters", {})
    merged["runs"] = {}
    for folder, rep in reports.items():
        if rep["tasks"] != base["tasks"] or rep["held_out"] != base["held_out"]:
            raise RuntimeError(f"sub-run {folder} evaluated other tasks than moe-adapters")
        for name, modes in rep["methods"].items():  # every report has a zero-shot row: the zero-shot run's wins
            if name != "zero-shot" or folder == "zero-shot" or name not in merged["methods"]:
                merged["methods"][name] = modes
        merged["runs"][folder] = {k: rep.get(k) for k in ("wall_time_s", "trainable_parameters", "ddas", "frozen",
                                                          "skipped_steps", "peak_memory_bytes")}
        merged["runs"][folder]["methods"] = sorted(rep["methods"])
        merged["runs"][folder]["config"] = rep.get("config", {})
    order = ["zero-shot", "continual-ft", "moe-adapters-reference", "moecl"]
    merged["methods"] = {k: merged["methods"][k] for k in order + sorted(set(merged["methods"]) - set(order))
                         if k in merged["methods"]}
    merged["demo"] = demo_info
    return merged


def _routing_text(report: dict[str, Any], entry: dict[str, Any]) -> str:
    """Routing confusion after the last task: % of each test set's images per route."""
    from .evaluation.report import column_names, format_table
    rows = entry["routing_confusion"]
    names = column_names(report.get("tasks", []), report.get("held_out", []), len(rows))[0]
    pct = [[100.0 * v / max(sum(r), 1) for v in r] for r in rows]
    routes = list(report.get("tasks", []))[: len(rows[0]) - 1] + ["zero-shot"]
    return format_table(pct, names, routes, corner="test set \\ route (%)")


def _ddas_text(report: dict[str, Any]) -> str:
    ddas = (report.get("runs", {}).get("moe-adapters") or {}).get("ddas") or []
    cfg = (report.get("runs", {}).get("moe-adapters") or {}).get("config", {}).get("ddas", {})
    if not ddas:
        return ""
    tasks = report.get("tasks", [])
    cal = ", ".join(f"{tasks[i] if i < len(tasks) else i} {d['threshold']:.5f}" for i, d in enumerate(ddas))
    return (f"DDAS thresholds: moecl calibrated per task ({cfg.get('quantile')} quantile of held-out training "
            f"errors x {cfg.get('margin')}): {cal}; reference fixed: {cfg.get('fixed_threshold')}")


def print_results(report: dict[str, Any]) -> None:
    from .evaluation.report import entry_tables, summary_text
    held = report.get("held_out") or []
    for method, mode in HEADLINE:
        entry = report["methods"].get(method, {}).get(mode)
        if entry is None:
            continue
        _say(f"\n=== {method} ({mode}) ===")
        _say(entry_tables(report, entry))
        if entry.get("routing_confusion") is not None and mode == "agnostic":
            _say("\nDDAS routing after the last task (rows: test set; % of its images per route):")
            _say(_routing_text(report, entry))
    text = _ddas_text(report)
    if text:
        _say("\n" + text)
    _say("\n=== Summary (Transfer / Avg / Last over the learned tasks; held-out = "
         f"{', '.join(held)}, never trained on; oracle = task id given, agnostic = DDAS routes) ===")
    _say(summary_text(report))


def _run_method(k: int, folder: str, overrides: list[str], base: list[str], out: Path, seq,
                reports: dict[str, dict[str, Any]], timings: dict[str, float]) -> None:
    """One sub-run: a fresh ContinualTrainer over the whole sequence under ``out/runs/<folder>``."""
    from .train.loop import ContinualTrainer
    cfg = _config(base + overrides)
    run_dir = out / "runs" / folder
    resume = _prepare_run_dir(run_dir, cfg)
    tic = time.time()
    _say(f"[3/4] ({k + 1}/{len(METHOD_RUNS)}) {folder}: {len(seq.tasks)} tasks "
         f"({', '.join(t.name for t in seq.tasks)}) -> {run_dir}")
    reports[folder] = ContinualTrainer(cfg, run_dir, resume).run()  # (its train.log handler ends with it)
    timings[f"{folder}_s"] = round(time.time() - tic, 1)
    _say(f"  done in {timings[f'{folder}_s']:.0f} s")


def run_demo(args) -> int:
    """The ``moecl demo`` command: ``args.out``, ``args.cache`` (None = default), ``args.quick``."""
    with _quiet_console():
        return _run_demo(args)


def _run_demo(args) -> int:
    start = time.time()
    out = Path(getattr(args, "out", None) or "runs/demo")
    cache = Path(args.cache).expanduser() if getattr(args, "cache", None) else default_cache()
    quick = bool(getattr(args, "quick", False))
    world_params = WORLD_QUICK if quick else WORLD
    pre_params = PRETRAIN_QUICK if quick else PRETRAIN
    extra = QUICK_OVERRIDES if quick else []
    base_cfg = _config(extra)  # validates demo.yaml (+ quick overrides) before any heavy work
    timings: dict[str, float] = {}
    _say(f"moecl demo{' --quick' if quick else ''}: run folder {out}, cache {cache}")

    # 1. the world ------------------------------------------------------------------------------------------
    world = _world_dir(cache, world_params)
    tic = time.time()
    _say(f"[1/4] synthetic world -> {world}")
    build_world_cached(world, world_params, workers=max(1, base_cfg.data.workers), progress=not quick)
    timings["world_s"] = round(time.time() - tic, 1)  # (demo_backbone() does steps 1 and 2 for init_checkpoint=demo)

    # 2. the foundation -------------------------------------------------------------------------------------
    from .runtime import pick_device
    device = pick_device(base_cfg.runtime.device)
    threads = base_cfg.runtime.threads or (_cpu_threads(base_cfg.data.workers) if device.type == "cpu" else None)
    tic = time.time()
    _say(f"[2/4] tiny CLIP ({pre_params.model}) pretrained on the world's captions ({pre_params.steps} steps "
         f"of {pre_params.batch_size})")
    pre = pretrain_cached(world, cache / "pretrained", pre_params, workers=base_cfg.data.workers,
                          device=str(device), progress=base_cfg.runtime.progress, threads=threads)
    timings["pretrain_s"] = round(time.time() - tic, 1)
    from .data import load_sequence
    seq = load_sequence(world, base_cfg.data.sequence)
    _say(f"  weights {pre.weights}{' (cached)' if pre.cached else ''}; zero-shot accuracy:")
    _say(format_zero_shot(pre.info, [t.name for t in seq.held_out]))

    # 3. the methods ----------------------------------------------------------------------------------------
    common = [f"data.root={world}", f"model.init_checkpoint={pre.weights}", f"model.name={pre_params.model}"]
    if threads and base_cfg.runtime.threads is None:
        common.append(f"runtime.threads={threads}")
    reports: dict[str, dict[str, Any]] = {}
    overrides_used: dict[str, list[str]] = {}
    for k, (folder, overrides) in enumerate(METHOD_RUNS):
        _run_method(k, folder, overrides, extra + common, out, seq, reports, timings)
        overrides_used[folder] = overrides

    # 4. the report -----------------------------------------------------------------------------------------
    from .evaluation.report import log_to_tensorboard, write_report
    timings["total_s"] = round(time.time() - start, 1)
    demo_info = {"quick": quick, "world": {"path": str(world), **world_params},
                 "pretrain": {"weights": str(pre.weights), "cached": pre.cached,
                              **{k: v for k, v in pre.info.items() if k != "loss_curve"}},
                 "config": DEMO_CONFIG, "overrides": {"all": extra + common, **overrides_used},
                 "timings": timings, "device": str(device), "threads": threads}
    report = merge_reports(reports, demo_info, timings["total_s"])
    report["demo"]["claims"] = check_claims(report)
    write_report(out, report)
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(out / "tb"))
    try:
        log_to_tensorboard(writer, report)
        for step, loss in pre.info.get("loss_curve", []):
            writer.add_scalar("pretrain/loss", loss, step)
        for name, acc in pre.zero_shot.items():
            writer.add_scalar(f"pretrain/zero_shot/{name}", acc, 0)
        for name, secs in timings.items():
            writer.add_scalar(f"demo/{name}", secs, 0)
    finally:
        writer.close()
    _say("[4/4] results")
    print_results(report)
    if quick:
        _say("\nClaims (not judged in --quick mode: a few training steps test the plumbing, not the method; "
             "run `moecl demo` without --quick to check them):")
    else:
        _say("\nClaims (from this report):")
    _say(_claims_text(report["demo"]["claims"], judged=not quick))
    _say(f"\nTime: world {timings['world_s']:.0f} s, pretraining {timings['pretrain_s']:.0f} s, "
         + ", ".join(f"{f} {timings[f + '_s']:.0f} s" for f, _ in METHOD_RUNS)
         + f"; total {timings['total_s']:.0f} s on {device}"
         + (f" ({threads} thread(s))" if device.type == "cpu" else ""))
    _say(f"Report: {out / 'report.json'} (+ report.md, plots/*.png); TensorBoard: tensorboard --logdir {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:  # python -m moecl.demo
    from .cli import main as cli_main
    return cli_main(["demo", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
