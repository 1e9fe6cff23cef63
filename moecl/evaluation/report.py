"""Run reports: report.json (the record), report.md (tables laid out like the papers), PNG heatmaps,
CLIP_benchmark-style JSON per dataset, and the same numbers in TensorBoard.

report.json is the single source of truth: ``regenerate`` recomputes every metric from its stored
matrices and rewrites everything else, so a metrics fix never needs a re-run. Schema::

    {"methods": {name: {mode: entry}}, "tasks": [...], "held_out": [...], "trainable_parameters": {...},
     "wall_time_s", "gpu_hours", "peak_memory_bytes", "versions": {...}, "config": {...}}

Modes are "oracle" (task id given) and "agnostic" (DDAS). An MTIL entry is ``{"kind": "mtil",
"matrix": [[% ...]], "metrics": {...}, "per_dataset": {name: {...}}, "routing_confusion": [[...]]?}``
with matrix columns = tasks then held-out sets; a CIL entry stores ``"accuracies"`` (one per step)
instead of a matrix. Accuracies are percentages.
"""
from __future__ import annotations

import errno
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import MoeclError
from ..runstate.atomic import atomic_write_text
from . import plots
from .metrics import cil_metrics, mtil_metrics

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOTS_DIR = "plots"
CLIP_BENCHMARK_DIR = "clip_benchmark"
MODES = ("oracle", "agnostic")
SUMMARY_KEYS = ("transfer", "avg", "last")
ROUTING_WARN_BELOW = 90.0  # % of test images on their own route under which a report calls DDAS routing weak
METRICS_DOC = "docs/metrics.md"
LEGEND = ("Transfer: accuracy on tasks not yet learned (zero-shot kept); Avg: mean of the whole accuracy matrix; "
          "Last: mean accuracy after the last task; BWT: last minus just-learned accuracy per task (< 0 = "
          "forgotten); Forgetting: best-ever minus last accuracy per task (> 0 = lost). oracle = task id given, "
          "agnostic = DDAS picks the route; zero-shot = the untouched backbone. Definitions: " + METRICS_DOC)


# ---------------------------------------------------------------------------------------------------------
# Building entries

def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> JSON-able Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def column_names(tasks: Sequence[str], held_out: Sequence[str], num_columns: int) -> tuple[list[str], int]:
    """Names of a matrix's columns and how many of them are sequence tasks (the rest are held out)."""
    tasks, held_out = list(tasks), list(held_out)
    if num_columns == len(tasks) + len(held_out) and tasks:
        return tasks + held_out, len(tasks)
    if num_columns == len(tasks):
        return tasks, len(tasks)
    return [str(j) for j in range(num_columns)], num_columns


def routing_accuracy(confusion: Sequence[Sequence[int]], num_tasks: int, trained: Optional[int] = None
                     ) -> Optional[float]:
    """% of test images that took their own route: test set j < ``trained`` to task j, every other set
    (not yet learned, held out) to zero-shot (the last column). None when there are no images."""
    trained = num_tasks if trained is None else trained
    right = total = 0
    for j, row in enumerate(confusion):
        own = j if j < trained else len(row) - 1
        right, total = right + int(row[own]), total + int(sum(row))
    return 100.0 * right / total if total else None


def weak_routing_notes(report: dict[str, Any]) -> list[str]:
    """One line per agnostic entry whose routing after its last row is below :data:`ROUTING_WARN_BELOW`."""
    notes = []
    for method, mode, entry in _entries(report):
        conf = entry.get("routing_confusion")
        if mode == "oracle" or not conf or entry.get("kind") != "mtil":
            continue
        acc = routing_accuracy(conf, len(report.get("tasks", [])), trained=len(entry["matrix"]))
        if acc is not None and acc < ROUTING_WARN_BELOW:
            notes.append(f"{method} ({mode}): only {acc:.1f}% of test images took their own route (below "
                         f"{ROUTING_WARN_BELOW:.0f}%). DDAS tells domains apart, not classes cut from one domain: "
                         f"read this row with care; see {METRICS_DOC}, 'Routing'.")
    return notes


def build_method_entry(matrix: Any, mode_kind: str = "mtil", routing_confusion: Any = None,
                       names: Optional[Sequence[str]] = None, num_tasks: Optional[int] = None) -> dict[str, Any]:
    """One method x mode entry of report.json with its metrics computed.

    ``mtil``: ``matrix`` is the accuracy matrix (rows = after task i, columns = test sets; the first
    ``num_tasks`` columns are the sequence, default all); ``names`` label the columns (default "0", "1"...).
    ``cil``: ``matrix`` is the list of per-step accuracies on all classes seen so far.
    ``routing_confusion`` (rows = test set, columns = route task 0..T-1 then zero-shot) is stored as given.
    """
    if mode_kind == "cil":
        acc = _plain(np.asarray(matrix, dtype=np.float64))
        entry: dict[str, Any] = {"kind": "cil", "accuracies": acc, "metrics": cil_metrics(acc)}
    elif mode_kind == "mtil":
        a = np.asarray(matrix, dtype=np.float64)
        m = mtil_metrics(a, num_tasks=num_tasks)
        cols = list(names) if names is not None else [str(j) for j in range(a.shape[1])]
        if len(cols) != a.shape[1] or len(set(cols)) != len(cols):
            raise ValueError(f"need {a.shape[1]} distinct column names, got {cols}")
        per_dataset = dict(zip(cols, m.pop("per_dataset")))
        entry = {"kind": "mtil", "matrix": _plain(a), "metrics": m, "per_dataset": per_dataset}
    else:
        raise ValueError(f"mode_kind must be 'mtil' or 'cil', got {mode_kind!r}")
    if routing_confusion is not None:
        entry["routing_confusion"] = _plain(np.asarray(routing_confusion))
    return entry


def versions() -> dict[str, Optional[str]]:
    """Versions of the stack (from package metadata: nothing heavy is imported; absent -> None)."""
    from importlib import metadata
    out: dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for key, dist in (("moecl", "moecl"), ("torch", "torch"), ("deepspeed", "deepspeed"),
                      ("open_clip", "open_clip_torch"), ("webdataset", "webdataset"), ("numpy", "numpy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    torch = sys.modules.get("torch")
    out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    return out


def new_report(tasks: Sequence[str], held_out: Sequence[str] = (), config: Optional[dict] = None,
               **run_info: Any) -> dict[str, Any]:
    """An empty report with the run's facts; fill ``report["methods"][name][mode]`` with entries."""
    report: dict[str, Any] = {"methods": {}, "tasks": list(tasks), "held_out": list(held_out),
                              "trainable_parameters": {}, "wall_time_s": None, "gpu_hours": None,
                              "peak_memory_bytes": None, "versions": versions(), "config": config or {}}
    report.update(run_info)
    return report


# ---------------------------------------------------------------------------------------------------------
# Text tables

def _cell(value: Any, digits: int, missing: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return missing
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return f"{float(value):.{digits}f}"
    return str(value)


def format_table(rows: Sequence[Sequence[Any]], row_names: Optional[Sequence[str]] = None,
                 col_names: Optional[Sequence[str]] = None, digits: int = 1, markdown: bool = False,
                 corner: str = "") -> str:
    """A matrix as aligned console text, or as a markdown table; None cells print as '-'."""
    missing = "—" if markdown else "-"
    body = [[_cell(v, digits, missing) for v in row] for row in rows]
    width = max((len(r) for r in body), default=0)
    cols = list(col_names) if col_names is not None else [str(j) for j in range(width)]
    names = list(row_names) if row_names is not None else [str(i) for i in range(len(body))]
    header = [corner] + cols
    lines = [[name] + r + [""] * (len(cols) - len(r)) for name, r in zip(names, body)]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in column) for column in zip(header, *lines)]
    fmt = lambda line: "  ".join(x.ljust(w) if k == 0 else x.rjust(w)  # noqa: E731
                                 for k, (x, w) in enumerate(zip(line, widths)))
    return "\n".join([fmt(header)] + [fmt(line) for line in lines])


def _entries(report: dict[str, Any]):
    methods = report.get("methods", {})
    for method, modes in sorted(methods.items(), key=lambda kv: kv[0] != "zero-shot"):
        for mode in sorted(modes, key=lambda m: (MODES.index(m) if m in MODES else len(MODES), m)):
            yield method, mode, modes[mode]


def summary_table(report: dict[str, Any], markdown: bool = False) -> str:
    """Method x mode -> Transfer / Avg / Last, BWT, forgetting (and held-out Avg / Last when there are any)."""
    keys = ["transfer", "avg", "last", "bwt", "forgetting"]
    cols = ["Transfer", "Avg", "Last", "BWT", "Forgetting"]
    entries = list(_entries(report))
    if any("held_out_avg" in e.get("metrics", {}) for _, _, e in entries):
        keys += ["held_out_avg", "held_out_last"]
        cols += ["Held-out Avg", "Held-out Last"]
    rows = [[e.get("metrics", {}).get(k) for k in keys] for _, _, e in entries]
    names = [f"{method} ({mode})" for method, mode, _ in entries]
    from .published import PUBLISHED_NAME, published_metrics
    published = published_metrics(report)
    if published:  # the paper's row for this sequence, to compare with the run's own
        rows.append([published.get(k) for k in keys])
        names.append(PUBLISHED_NAME)
    return format_table(rows, names, cols, markdown=markdown, corner="method (mode)")


def _entry_columns(report: dict[str, Any], entry: dict[str, Any]) -> tuple[list[str], int]:
    return column_names(report.get("tasks", []), report.get("held_out", []), len(entry["matrix"][0]))


def _row_labels(report: dict[str, Any], rows: int) -> list[str]:
    tasks = report.get("tasks", [])
    return [f"after {i + 1}" + (f": {tasks[i]}" if i < len(tasks) else "") for i in range(rows)]


def _route_labels(report: dict[str, Any], confusion: Sequence[Sequence[Any]]) -> list[str]:
    t = len(confusion[0]) - 1
    tasks = report.get("tasks", [])
    return (list(tasks[:t]) if len(tasks) >= t else [str(k) for k in range(t)]) + ["zero-shot"]


def entry_tables(report: dict[str, Any], entry: dict[str, Any], markdown: bool = False) -> str:
    """The accuracy matrix and the paper-style Transfer/Avg/Last-per-dataset table of one entry."""
    if entry["kind"] == "cil":
        m = entry["metrics"]
        steps = [f"step {s + 1}" for s in range(len(entry["accuracies"]))]
        return format_table([entry["accuracies"] + [m["avg"], m["last"]]], ["accuracy"],
                            steps + ["Avg", "Last"], markdown=markdown)
    cols, t = _entry_columns(report, entry)
    shown = [c + ("*" if j >= t else "") for j, c in enumerate(cols)]
    matrix = format_table(entry["matrix"], _row_labels(report, len(entry["matrix"])), shown,
                          markdown=markdown, corner="trained up to")
    m, pd = entry["metrics"], entry["per_dataset"]
    paper = [[pd[c][k] for c in cols] + [m[k]] for k in SUMMARY_KEYS]
    paper_table = format_table(paper, ["Transfer", "Avg", "Last"], shown + ["Average"], markdown=markdown)
    return matrix + "\n\n" + paper_table


def _routing_table(report: dict[str, Any], entry: dict[str, Any], markdown: bool) -> str:
    c = np.asarray(entry["routing_confusion"], dtype=np.float64)
    totals = c.sum(axis=1, keepdims=True)
    pct = np.divide(100.0 * c, totals, out=np.full(c.shape, np.nan), where=totals > 0)
    rows = [[None if not np.isfinite(v) else v for v in r] for r in pct.tolist()]
    names = column_names(report.get("tasks", []), report.get("held_out", []), c.shape[0])[0]
    return format_table(rows, names, _route_labels(report, entry["routing_confusion"]), digits=1,
                        markdown=markdown, corner="test set \\ route (%)")


def _fmt_number(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.3f}{unit}" if isinstance(value, float) else f"{value:,}{unit}"


def summary_text(report: dict[str, Any]) -> str:
    """The console summary: the table, its legend, and any weak-routing warning."""
    lines = [summary_table(report), "", LEGEND]
    lines += ["WARNING " + n for n in weak_routing_notes(report)]
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: summary, run facts, then per method and mode the matrix, paper table, routing, heatmaps."""
    out = ["# moecl report", "", "## Summary", "", summary_table(report, markdown=True), "", LEGEND, ""]
    if _summary_series(report):
        out += [f"![methods compared]({PLOTS_DIR}/summary.png)", ""]
    out += [f"**Weak routing.** {n}" for n in weak_routing_notes(report)] + ([""] if weak_routing_notes(report) else [])
    if report.get("held_out"):
        out += ["Columns marked * are held-out sets (never trained on); Transfer/Avg/Last exclude them.", ""]
    out += ["## Run", "", f"- tasks: {', '.join(report.get('tasks', [])) or '—'}",
            f"- wall time: {_fmt_number(report.get('wall_time_s'), ' s')}",
            f"- GPU-hours: {_fmt_number(report.get('gpu_hours'))}",
            f"- peak memory: {_fmt_number(report.get('peak_memory_bytes'), ' bytes')}"]
    for key, value in (report.get("trainable_parameters") or {}).items():
        out.append(f"- trainable parameters, {key}: {_fmt_number(value)}")
    versions_ = report.get("versions") or {}
    if versions_:
        out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions_.items() if v))
    out.append("")
    for method, mode, entry in _entries(report):
        stem = _stem(method, mode)
        out += [f"## {method} — {mode}", "", entry_tables(report, entry, markdown=True), "",
                f"![accuracy {method} {mode}]({PLOTS_DIR}/accuracy__{stem}.png)", ""]
        if entry.get("routing_confusion") is not None and mode != "oracle":
            out += [f"### Routing ({mode})", "", _routing_table(report, entry, markdown=True), "",
                    f"![routing {method} {mode}]({PLOTS_DIR}/routing__{stem}.png)", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Files

def _stem(*parts: str) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in parts)


def unwritable(folder: Path | str, err: OSError, what: str) -> MoeclError:
    """The error for results that cannot be written to ``folder`` (read-only or archived run, full disk)."""
    reason = err.strerror or str(err)
    if err.filename:
        reason += f": {err.filename}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"{folder} is read-only (an archived or shared run?); pass --out DIR to write {what} elsewhere"
    elif err.errno == errno.ENOSPC:
        hint = f"the disk holding {folder} is full; free space or pass --out DIR to write {what} elsewhere"
    else:
        hint = f"pass --out DIR to write {what} elsewhere"
    return MoeclError(f"cannot write to {folder} ({reason}); {hint}")


def _figure_specs(report: dict[str, Any]):
    """(file stem, tensorboard tag, plotting function, its arguments) for every figure of the report: the
    methods side by side, then each entry's accuracy heatmap and, for agnostic modes, its routing heatmap
    (oracle routing is the identity by construction: no figure)."""
    rows = _summary_series(report)
    if rows:
        yield "summary", "summary", plots.summary_figure, (rows, "methods compared")
    for method, mode, entry in _entries(report):
        stem = _stem(method, mode)
        if entry["kind"] == "cil":
            steps = [f"step {s + 1}" for s in range(len(entry["accuracies"]))]
            args: tuple = ([entry["accuracies"]], steps, f"{method} — {mode}", ["seen classes"])
        else:
            cols, t = _entry_columns(report, entry)
            shown = [c + ("*" if j >= t else "") for j, c in enumerate(cols)]
            args = (entry["matrix"], shown, f"{method} — {mode}", _row_labels(report, len(entry["matrix"])))
        yield f"accuracy__{stem}", f"accuracy/{method}/{mode}", plots.accuracy_heatmap, args
        confusion = entry.get("routing_confusion")
        if confusion is not None and mode != "oracle":
            names = column_names(report.get("tasks", []), report.get("held_out", []), len(confusion))[0]
            yield (f"routing__{stem}", f"routing/{method}/{mode}", plots.routing_heatmap,
                   (confusion, names, _route_labels(report, confusion), f"routing: {method} — {mode}"))


def _summary_series(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method and mode: Transfer, Last and the mean accuracy on the tasks seen so far after each task."""
    out = []
    for method, mode, entry in _entries(report):
        m = entry.get("metrics", {})
        if entry["kind"] == "cil":
            seen = list(entry["accuracies"])
        else:
            a = entry["matrix"]
            seen = [float(np.mean(a[i][: i + 1])) for i in range(len(a))]
        out.append({"name": f"{method} ({mode})", "transfer": m.get("transfer"), "last": m.get("last"),
                    "seen": seen})
    return out if len(out) > 1 else []


def figures(report: dict[str, Any]):
    """(file stem, tag, Figure) for every figure of the report."""
    for stem, tag, draw, args in _figure_specs(report):
        yield stem, tag, draw(*args)


def _fingerprint(draw, args) -> str:
    import hashlib
    blob = json.dumps([draw.__name__, _plain(list(args)), PLOTS_VERSION], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


PLOTS_VERSION = 2  # bump when a figure's look changes: every PNG is drawn again
PLOTS_INDEX = ".index.json"


def write_plots(run_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    """PNGs under ``RUN/plots``; a figure whose inputs did not change since it was written is not drawn
    again (``plots/.index.json`` keeps a fingerprint per file), so ``moecl report`` stays fast."""
    folder = run_dir / PLOTS_DIR
    index_path = folder / PLOTS_INDEX
    try:
        index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        index = {}
    written, fresh = {}, {}
    for stem, _, draw, args in _figure_specs(report):
        path = folder / f"{stem}.png"
        key = _fingerprint(draw, args)
        if index.get(stem) != key or not path.is_file():
            plots.save_png(draw(*args), path)
        written[stem], fresh[stem] = path, key
    for stale in set(index) - set(fresh):  # figures this report no longer has
        (folder / f"{stale}.png").unlink(missing_ok=True)
    if fresh:
        atomic_write_text(index_path, json.dumps(fresh, indent=1) + "\n")
    return written


def _clip_benchmark_records(report: dict[str, Any]):
    model_cfg = (report.get("config") or {}).get("model") or {}
    for method, mode, entry in _entries(report):
        if entry["kind"] != "mtil":
            continue
        cols, _ = _entry_columns(report, entry)
        last_row = entry["matrix"][-1]
        for name, acc in zip(cols, last_row):
            record = {"dataset": name, "model": clip_benchmark_model(model_cfg.get("name", method), method, mode),
                      "pretrained": clip_benchmark_pretrained(model_cfg), "task": "zeroshot_classification",
                      "metrics": {"acc1": acc / 100.0}, "language": "en",
                      "moecl": {"method": method, "mode": mode, "after_task": len(entry["matrix"])}}
            yield _stem(method, mode, name), record


def clip_benchmark_model(model_name: str, method: str, mode: str) -> str:
    """The ``model`` column of a CLIP_benchmark record: one distinct name per method and routing mode
    (``clip_benchmark build`` keys its rows by model, pretrained and dataset)."""
    return f"{model_name}+{method}" + ("" if method == "zero-shot" else f"-{mode}")


def clip_benchmark_pretrained(model_cfg: dict[str, Any]) -> str:
    """The ``pretrained`` column: a string always (``clip_benchmark build`` fails on null)."""
    if model_cfg.get("pretrained"):
        return str(model_cfg["pretrained"])
    if model_cfg.get("init_checkpoint"):
        value = str(model_cfg["init_checkpoint"])
        return value if value in ("demo", "demo-quick") else Path(value).name
    return "random-init"


def _check(report: dict[str, Any]) -> None:
    if not isinstance(report.get("methods"), dict):
        raise ValueError("report['methods'] must be a dict {method: {mode: entry}}")
    for method, mode, entry in _entries(report):
        if entry.get("kind") not in ("mtil", "cil") or "metrics" not in entry:
            raise ValueError(f"report entry {method}/{mode} is not from build_method_entry (kind, metrics)")


def write_report(run_dir: Path | str, report: dict[str, Any]) -> dict[str, Path]:
    """Write report.json (atomic), report.md, plots/*.png and clip_benchmark/*.json under ``run_dir``."""
    _check(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    atomic_write_text(run_dir / REPORT_JSON, json.dumps(_plain(report), indent=2, allow_nan=False) + "\n")
    written["json"] = run_dir / REPORT_JSON
    atomic_write_text(run_dir / REPORT_MD, render_markdown(report) + "\n")
    written["md"] = run_dir / REPORT_MD
    written.update(write_plots(run_dir, report))
    bench = run_dir / CLIP_BENCHMARK_DIR
    for stem, record in _clip_benchmark_records(report):
        bench.mkdir(exist_ok=True)
        atomic_write_text(bench / f"{stem}.json", json.dumps(record, indent=2) + "\n")
        written[f"clip_benchmark/{stem}"] = bench / f"{stem}.json"
    return written


def load_report(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a moecl run folder with a finished "
                                "evaluation?")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoeclError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(report, dict):
        raise MoeclError(f"{path} must hold a JSON object, found {type(report).__name__}")
    return report


def recompute(report: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``report`` with every entry's metrics recomputed from its stored matrix/accuracies."""
    out = json.loads(json.dumps(report))
    for method, mode, entry in list(_entries(out)):
        if entry.get("kind") == "cil" or ("accuracies" in entry and "matrix" not in entry):
            new = build_method_entry(entry["accuracies"], "cil", entry.get("routing_confusion"))
        else:
            cols, t = column_names(out.get("tasks", []), out.get("held_out", []), len(entry["matrix"][0]))
            new = build_method_entry(entry["matrix"], "mtil", entry.get("routing_confusion"), cols, t)
        out["methods"][method][mode] = {**entry, **new}
    return out


def regenerate(run_dir: Path | str) -> dict[str, Any]:
    """What ``moecl report RUN`` does: recompute metrics from report.json's matrices, rewrite every file."""
    report = recompute(load_report(run_dir))
    if report.get("imported") and not report.get("methods"):  # `moecl import-reference`: rows from moecl eval
        from .published import imported_methods
        methods, held = imported_methods(run_dir, report)
        report["methods"].update(methods)
        report["held_out"] = held
    write_report(run_dir, report)
    return report


def log_to_tensorboard(writer: Any, report: dict[str, Any], step: Optional[int] = None) -> None:
    """Metrics as scalars, heatmaps as images, the summary as text, on a SummaryWriter-like ``writer``."""
    for method, mode, entry in _entries(report):
        for key, value in entry.get("metrics", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"metrics/{method}/{mode}/{key}", float(value), step)
    for _, tag, fig in figures(report):
        writer.add_image(tag, plots.figure_to_array(fig), step, dataformats="HWC")
    writer.add_text("report/summary", summary_table(report, markdown=True), step)
