"""The paper's published rows (MoE-Adapters, CVPR 2024, ViT-B/16), shown next to a run of the same sequence.

Numbers are those of the paper's tables for the sequences moecl ships; sequences without a published row
(order II, few-shot: not in METHOD.md's list) show none rather than a guess.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

PUBLISHED_NAME = "MoE-Adapters (published)"
# sequence name -> metrics (percent); MTIL: Transfer / Avg / Last, CIL: Avg / Last
PUBLISHED: dict[str, dict[str, float]] = {
    "mtil_order1": {"transfer": 68.9, "avg": 76.7, "last": 85.0},
    "cifar100_10": {"avg": 85.21, "last": 77.52},
    "cifar100_20": {"avg": 83.72, "last": 76.20},
    "cifar100_50": {"avg": 83.77, "last": 75.24},
    "tinyimagenet_100_5": {"avg": 81.12, "last": 76.87},
    "tinyimagenet_100_10": {"avg": 80.23, "last": 76.35},
    "tinyimagenet_100_20": {"avg": 79.96, "last": 75.77},
}


def report_sequence(report: dict[str, Any]) -> Optional[str]:
    """The sequence a report's run was trained on (its config's ``data.sequence``, file stem for paths)."""
    seq = ((report.get("config") or {}).get("data") or {}).get("sequence")
    return Path(str(seq)).stem if seq else None


def published_metrics(report: dict[str, Any]) -> Optional[dict[str, float]]:
    """The published row for this report's sequence, or None when the sequence has none."""
    seq = report_sequence(report)
    return PUBLISHED.get(seq) if seq else None


def imported_methods(run_dir: str | Path, report: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An imported run's accuracy matrix, once ``moecl eval RUN --checkpoint task-XXX`` has scored every task's
    checkpoint (rows = ``RUN/eval/task-XXX/results.json``). Returns ({method: {mode: entry}}, held-out names);
    empty while a row is missing (only the final checkpoint imported, or not all evaluated yet)."""
    import json

    from .report import build_method_entry
    tasks = list(report.get("tasks") or [])
    rows: dict[str, list[list[float]]] = {}
    kind, held = "mtil", list(report.get("held_out") or [])
    for i in range(len(tasks)):
        path = Path(run_dir) / "eval" / f"task-{i:03d}" / "results.json"
        if not path.is_file():
            return {}, held
        doc = json.loads(path.read_text())
        kind, held = doc.get("kind", "mtil"), list(doc.get("held_out") or [])
        for mode, entry in doc.get("modes", {}).items():
            rows.setdefault(mode, []).append(list(entry["row"]))
    entries = {}
    for mode, matrix in rows.items():
        if len(matrix) != len(tasks):
            continue
        entries[mode] = (build_method_entry([r[0] for r in matrix], "cil") if kind == "cil" else
                         build_method_entry(matrix, "mtil", names=tasks + held, num_tasks=len(tasks)))
    return ({"moe-adapters-imported": entries} if entries else {}), held
