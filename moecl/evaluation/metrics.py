"""Continual-learning metrics from accuracy matrices (pure numpy).

The papers computed Transfer / Avg / Last in spreadsheets; these functions follow METHOD.md exactly so
the numbers are reproducible from the stored matrices. ``A[i][j]`` is the accuracy (%) on test set ``j``
after training task ``i``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

ArrayLike = Any  # nested lists or numpy arrays


def _as_matrix(matrix: ArrayLike) -> np.ndarray:
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"expected a non-empty 2-D accuracy matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("the accuracy matrix holds NaN or inf; every entry must be a number")
    return a


def _num_tasks(a: np.ndarray, num_tasks: Optional[int]) -> int:
    t = a.shape[1] if num_tasks is None else int(num_tasks)
    if not 1 <= t <= a.shape[1]:
        raise ValueError(f"num_tasks={num_tasks} must lie in 1..{a.shape[1]} (the matrix's columns)")
    if a.shape[0] > t:
        raise ValueError(f"the matrix has {a.shape[0]} rows (tasks trained) but only {t} task columns")
    return t


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if len(values) else None


def mtil_metrics(matrix: ArrayLike, num_tasks: Optional[int] = None) -> dict[str, Any]:
    """Transfer / Avg / Last of an MTIL accuracy matrix, as METHOD.md defines them.

    ``matrix`` has one row per trained task and one column per test set: the ``num_tasks`` sequence
    tasks first (default: every column), then any held-out sets never trained on. On the square task part:
    Transfer = mean over j = 1..T-1 of mean_{i<j} A[i][j] (zero-shot ability kept on not-yet-learned
    tasks), Avg = mean of every entry, Last = mean of the last row. A run still in progress (fewer rows than
    tasks) uses the same formulas over the rows it has; ``complete`` says whether all tasks are trained.
    Also returns ``bwt`` and ``forgetting`` (see their functions; None until all tasks are trained) and
    ``per_dataset``: one dict per column with that column's transfer (mean of the entries above the
    diagonal; None for column 0; for a held-out column every row counts), avg (column mean), last.
    Held-out columns add ``held_out_avg`` / ``held_out_last`` without touching Transfer / Avg / Last.
    """
    a = _as_matrix(matrix)
    t = _num_tasks(a, num_tasks)
    rows = a.shape[0]
    task = a[:, :t]
    per_dataset = []
    for j in range(a.shape[1]):
        column = a[:, j]
        above = column[: min(j, rows)] if j < t else column
        per_dataset.append({"transfer": _mean(above.tolist()) if j > 0 else None,
                            "avg": float(column.mean()), "last": float(column[-1]), "held_out": j >= t})
    transfers = [per_dataset[j]["transfer"] for j in range(1, t)]
    complete = rows == t
    out: dict[str, Any] = {
        "transfer": _mean(transfers),
        "avg": float(task.mean()),
        "last": float(task[-1].mean()),
        "bwt": backward_transfer(task) if complete and t > 1 else None,
        "forgetting": forgetting(task) if complete and t > 1 else None,
        "complete": complete,
        "per_dataset": per_dataset,
    }
    if a.shape[1] > t:
        out["held_out_avg"] = float(a[:, t:].mean())
        out["held_out_last"] = float(a[-1, t:].mean())
    return out


def cil_metrics(accuracies: ArrayLike) -> dict[str, Any]:
    """Class-incremental Avg / Last: ``accuracies[s]`` is the accuracy on all classes seen up to step s.

    Avg = mean over steps, Last = the final step (METHOD.md); ``per_step`` echoes the input.
    """
    acc = np.asarray(accuracies, dtype=np.float64)
    if acc.ndim != 1 or acc.size == 0 or not np.all(np.isfinite(acc)):
        raise ValueError(f"expected a non-empty 1-D list of finite accuracies, got shape {acc.shape}")
    return {"avg": float(acc.mean()), "last": float(acc[-1]), "per_step": acc.tolist()}


def _square(matrix: ArrayLike) -> np.ndarray:
    a = _as_matrix(matrix)
    if a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"expected a square T x T matrix with T >= 2, got shape {a.shape}")
    return a


def backward_transfer(matrix: ArrayLike) -> float:
    """BWT (Lopez-Paz & Ranzato, GEM 2017): mean over j < T-1 of A[T-1][j] - A[j][j].

    Negative = the final model lost accuracy on task j since just after learning it.
    """
    a = _square(matrix)
    t = a.shape[0]
    return float(np.mean([a[t - 1, j] - a[j, j] for j in range(t - 1)]))


def forgetting(matrix: ArrayLike) -> float:
    """Average forgetting (Chaudhry et al., RWalk 2018): mean over j < T-1 of max_{i<T-1} A[i][j] - A[T-1][j].

    The best accuracy ever reached on task j (including before it was trained, as in the usual
    implementation over rows 0..T-2) minus the final accuracy; >= 0 up to noise.
    """
    a = _square(matrix)
    t = a.shape[0]
    return float(np.mean([a[: t - 1, j].max() - a[t - 1, j] for j in range(t - 1)]))


def routing_confusion(true_task: ArrayLike, route: ArrayLike, num_tasks: int,
                      num_sets: Optional[int] = None, normalize: bool = False) -> np.ndarray:
    """Which route each test set's images took: rows = test set, columns = task 0..T-1, then zero-shot.

    ``route`` holds the task id chosen per image, -1 for plain CLIP (the last column). ``num_sets``
    defaults to max(num_tasks, max(true_task) + 1) so held-out sets get rows of their own. Counts by
    default; ``normalize`` turns each non-empty row into fractions.
    """
    true = np.asarray(true_task, dtype=np.int64).reshape(-1)
    r = np.asarray(route, dtype=np.int64).reshape(-1)
    if true.shape != r.shape:
        raise ValueError(f"true_task has {true.size} entries but route has {r.size}")
    if r.size and (r.min() < -1 or r.max() >= num_tasks):
        raise ValueError(f"routes must lie in -1..{num_tasks - 1}, got {r.min()}..{r.max()}")
    rows = max(num_tasks, int(true.max()) + 1 if true.size else 0) if num_sets is None else int(num_sets)
    if true.size and (true.min() < 0 or true.max() >= rows):
        raise ValueError(f"true_task values must lie in 0..{rows - 1}")
    counts = np.zeros((rows, num_tasks + 1), dtype=np.int64)
    np.add.at(counts, (true, np.where(r < 0, num_tasks, r)), 1)
    if not normalize:
        return counts
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
