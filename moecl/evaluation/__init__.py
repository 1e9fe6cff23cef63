"""Evaluation: metrics (pure numpy), reports (report.json/.md, heatmaps, TensorBoard) and plots.

Names are re-exported lazily so ``import moecl.evaluation.metrics`` never pulls in matplotlib.
"""
from __future__ import annotations

_EXPORTS = {
    "metrics": ("mtil_metrics", "cil_metrics", "backward_transfer", "forgetting", "routing_confusion"),
    "report": ("build_method_entry", "new_report", "write_report", "regenerate", "recompute", "load_report",
               "versions", "log_to_tensorboard", "format_table", "summary_table"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(name)


__all__ = sorted(_WHERE)
