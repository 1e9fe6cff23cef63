"""``moecl eval`` (re-evaluate a checkpoint, also on other shards) and ``moecl report`` (regenerate reports).

``moecl eval RUN`` loads the run's latest valid task-end checkpoint (or ``--checkpoint``) in one process and
scores every test set of the sequence (or of ``--data-root`` / ``--sequence``) in each configured mode:
oracle (task id given), agnostic (DDAS per sample) and, with ``eval.reference_ddas=true``, the reference DDAS
(per batch, fixed threshold). That is the trainer's last accuracy-matrix row, computed again. It writes
``RUN/eval/<name>/results.json`` and one CLIP_benchmark-style JSON per (mode, dataset) under
``RUN/eval/<name>/clip_benchmark/``.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch, DeepSpeed and open_clip load only when a command needs a model (not `moecl report`)
    from .loading import LoadedRun

EVAL_DIR = "eval"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def default_eval_name(loaded: LoadedRun, data_root: Optional[str], sequence: Optional[str]) -> str:
    """``task-001`` on the run's own data; ``task-001__<sequence>[__<root folder>]`` on other shards."""
    parts = [loaded.checkpoint.name]
    if sequence is not None or data_root is not None:
        parts.append(_slug(loaded.sequence.name))
    if data_root is not None:
        parts.append(_slug(Path(data_root).resolve().name))
    return "__".join(parts)


def evaluate_loaded(loaded: LoadedRun, modes=None) -> dict[str, Any]:
    """Score every test set of ``loaded.sequence`` in every mode: the trainer's row for the loaded checkpoint
    (the same :func:`moecl.evaluation.row.evaluate_row`). Returns ``{"kind", "columns", "held_out",
    "route_names", "modes": {mode: {...}}}``."""
    from ..runstate.identity import backbone_identity
    from .evaluator import Evaluator
    from .frozen import frozen_cache_for
    from .row import evaluate_row

    cfg, seq = loaded.cfg, loaded.sequence
    ev = Evaluator(loaded.model, loaded.tokenizer, loaded.eval_tf, device=loaded.device,
                   batch_size=cfg.eval.batch_size, workers=cfg.eval.workers, autocast=loaded.autocast,
                   max_samples=cfg.eval.max_samples, max_bad_fraction=cfg.data.max_bad_fraction,
                   frozen=frozen_cache_for(cfg, backbone_identity(cfg), loaded.run_dir, loaded.method))
    trained = loaded.num_trained_tasks
    num_routes = max(len(loaded.trained_task_names), trained)
    route_names = [loaded.route_name(r) for r in range(num_routes)] + ["zero-shot"]
    modes = loaded.eval_modes() if modes is None else modes
    out: dict[str, Any] = {"kind": "cil" if cfg.eval.cil else "mtil", "route_names": route_names, "modes": {}}
    if cfg.eval.cil:
        out["columns"], out["held_out"] = ["seen classes"], []
    else:
        out["columns"], out["held_out"] = [t.name for t in seq.all_tasks()], [t.name for t in seq.held_out]
    rows = evaluate_row(ev, seq, loaded.method, modes, loaded.trained_task_names, trained=trained,
                        cil=cfg.eval.cil, templates=cfg.eval.templates)
    for name, result in rows.items():
        mode, results = result.mode, result.results
        confusion = result.confusion(num_routes)
        row = result.row
        out["modes"][name] = {
            "kind": mode.kind, "decision": mode.decision if mode.kind == "agnostic" else None,
            "row": row, "accuracy": dict(zip(out["columns"], row)),
            "correct": dict(zip(out["columns"], [r.correct for r in results])),
            "samples": dict(zip(out["columns"], [r.total for r in results])),
            "mean": sum(row) / max(len(row), 1),
            "routing_confusion": confusion,
            "routing": {c: {route_names[k]: n for k, n in enumerate(cr) if n}
                        for c, cr in zip(out["columns"], confusion)},
            "seconds": result.seconds}
        out["work"] = result.work.as_dict()  # the row's images: frozen forward, adapted forward, decoded
    return out


def clip_benchmark_records(loaded: LoadedRun, results: dict[str, Any]):
    """(file stem, record) per mode and dataset, in CLIP_benchmark's result layout (acc1 as a fraction)."""
    from .report import clip_benchmark_model, clip_benchmark_pretrained
    method = loaded.method.report_name
    for mode, entry in results["modes"].items():
        for name in results["columns"]:
            record = {"dataset": name, "model": clip_benchmark_model(loaded.cfg.model.name, method, mode),
                      "pretrained": clip_benchmark_pretrained(loaded.cfg.model.model_dump()),
                      "task": "zeroshot_classification", "metrics": {"acc1": entry["accuracy"][name] / 100.0},
                      "language": "en",
                      "moecl": {"method": method, "mode": mode, "after_task": loaded.num_trained_tasks,
                                "checkpoint": str(loaded.checkpoint), "samples": entry["samples"][name],
                                "held_out": name in results["held_out"], "routing": entry["routing"][name]}}
            yield "__".join(_slug(p) for p in (method, mode, name)), record


def results_table(results: dict[str, Any]) -> str:
    from .report import format_table
    cols = [c + ("*" if c in results["held_out"] else "") for c in results["columns"]]
    modes = list(results["modes"])
    rows = [results["modes"][m]["row"] + [results["modes"][m]["mean"]] for m in modes]
    text = format_table(rows, modes, cols + ["mean"], corner="mode \\ test set (top-1 %)")
    for m in modes:
        if results["modes"][m]["kind"] != "agnostic":
            continue
        conf = results["modes"][m]["routing_confusion"]
        pct = [[100.0 * n / max(sum(r), 1) for n in r] for r in conf]
        text += "\n\n" + format_table(pct, cols, results["route_names"], corner=f"routing [{m}] (%)")
    return text


def write_results(loaded: LoadedRun, results: dict[str, Any], out_dir: Path, extra: dict[str, Any]) -> dict[str, Path]:
    """results.json (everything, with the eval/ddas config) and clip_benchmark/*.json under ``out_dir``."""
    from ..runstate.atomic import atomic_write_text
    from .report import versions
    out_dir.mkdir(parents=True, exist_ok=True)
    seq = loaded.sequence
    doc = {"run": str(loaded.run_dir), "checkpoint": str(loaded.checkpoint),
           "method": loaded.method.report_name, "num_trained_tasks": loaded.num_trained_tasks,
           "trained_tasks": loaded.trained_task_names[: loaded.num_trained_tasks],
           "sequence": {"name": seq.name, "path": str(seq.path) if seq.path else None,
                        "root": str(seq.root) if seq.root else None},
           **extra, **results,
           "config": {"eval": loaded.cfg.eval.model_dump(mode="json"), "ddas": loaded.cfg.ddas.model_dump(mode="json"),
                      "model": loaded.cfg.model.model_dump(mode="json")},
           "device": str(loaded.device), "versions": versions()}
    written = {"results": out_dir / "results.json"}
    atomic_write_text(written["results"], json.dumps(doc, indent=2, allow_nan=False) + "\n")
    bench = out_dir / "clip_benchmark"
    bench.mkdir(exist_ok=True)
    for stale in bench.glob("*.json"):  # an earlier evaluation under the same name (other modes or sets)
        stale.unlink()
    for stem, record in clip_benchmark_records(loaded, results):
        path = bench / f"{stem}.json"
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        written[f"clip_benchmark/{stem}"] = path
    return written


def _evaluate(run: str | Path, checkpoint: Optional[str], data_root: Optional[str], sequence: Optional[str],
              overrides: Optional[list[str]], name: Optional[str], device: str, out: Optional[str | Path]):
    """Load and score (nothing written): (loaded, results, output folder, extra fields of results.json)."""
    from .loading import load_run
    tic = time.time()
    loaded = load_run(run, checkpoint, device, data_root=data_root, sequence=sequence, overrides=overrides)
    results = evaluate_loaded(loaded)
    name = name or default_eval_name(loaded, data_root, sequence)
    out_dir = Path(out) if out is not None else Path(run) / EVAL_DIR / _slug(name)
    extra = {"name": name, "overrides": list(overrides or []), "wall_time_s": round(time.time() - tic, 3)}
    return loaded, results, out_dir, extra


def _write(loaded: LoadedRun, results: dict[str, Any], out_dir: Path, extra: dict[str, Any]) -> dict[str, Path]:
    from .report import unwritable
    try:
        return write_results(loaded, results, out_dir, extra)
    except OSError as e:  # a read-only (archived) run folder, a full disk
        raise unwritable(out_dir, e, "the results") from None


def evaluate_run(run: str | Path, checkpoint: Optional[str] = None, data_root: Optional[str] = None,
                 sequence: Optional[str] = None, overrides: Optional[list[str]] = None, name: Optional[str] = None,
                 device: str = "auto", out: Optional[str | Path] = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Python form of ``moecl eval``: returns (results, written files). ``out``: write there instead of
    ``RUN/eval/<name>/`` (for read-only or archived runs)."""
    loaded, results, out_dir, extra = _evaluate(run, checkpoint, data_root, sequence, overrides, name, device, out)
    return results, _write(loaded, results, out_dir, extra)


def run_eval(args) -> int:
    loaded, results, out_dir, extra = _evaluate(
        args.run, getattr(args, "checkpoint", None), getattr(args, "data_root", None), getattr(args, "sequence", None),
        getattr(args, "overrides", None) or [], getattr(args, "name", None), getattr(args, "device", None) or "auto",
        getattr(args, "out", None))
    seq = loaded.sequence
    # the table first: a folder that cannot be written (read-only, archived) still shows the numbers
    print(f"{loaded.checkpoint}: {loaded.method.report_name} after "
          f"{loaded.num_trained_tasks} task(s), sequence {seq.name} ({seq.root})")
    print(results_table(results))
    if results["held_out"]:
        print("* held-out set (never trained on)")
    sys.stdout.flush()
    written = _write(loaded, results, out_dir, extra)
    print(f"wrote {written['results']} and {len(written) - 1} CLIP_benchmark file(s) in "
          f"{written['results'].parent / 'clip_benchmark'}")
    return 0


def run_report(args) -> int:
    from .report import (CLIP_BENCHMARK_DIR, PLOTS_DIR, REPORT_JSON, REPORT_MD, load_report, recompute,
                         summary_text, unwritable, write_report)
    run = Path(args.run)
    out = Path(getattr(args, "out", None) or run)
    report = recompute(load_report(run))
    print(summary_text(report))
    sys.stdout.flush()
    try:
        write_report(out, report)
    except OSError as e:  # a read-only (archived) run folder, a full disk
        raise unwritable(out, e, "the report") from None
    files = [out / REPORT_JSON, out / REPORT_MD]
    files += sorted((out / PLOTS_DIR).glob("*.png")) if (out / PLOTS_DIR).is_dir() else []
    bench = sorted((out / CLIP_BENCHMARK_DIR).glob("*.json")) if (out / CLIP_BENCHMARK_DIR).is_dir() else []
    print("wrote:")
    for f in files:
        print(f"  {f}")
    if bench:
        print(f"  {out / CLIP_BENCHMARK_DIR}/ ({len(bench)} CLIP_benchmark file(s))")
    return 0
