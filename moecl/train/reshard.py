"""Mid-task optimizer state keyed by parameter name, so a checkpoint taken on one cluster shape (number of
ranks, ``moe.ep_size``) resumes on another.

Each rank saves its optimizer state as before plus ``params-rankR.json``: the global name of every parameter
in the state's index order (experts by GLOBAL expert id, as the adapter state stores them). On another shape
the saved states of all ranks are merged by name (replicated parameters are equal on every rank: rank 0's
copy is taken) and handed to the new optimizer in its own order. Only plain (ZeRO stage 0) optimizer states
re-shard this way; ZeRO partitions are tied to their world size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..runstate import files as ckpt


def names_file(rank: int) -> str:
    return f"params-rank{rank}.json"


def param_names(model, optimizer) -> list[str]:
    """Global names of the optimizer's parameters, in the index order of ``optimizer.state_dict()``."""
    names = {id(p): n for n, p in model.named_parameters()}
    for site_name, site in model.named_moe_sites():
        for gid, ex in zip(site.global_expert_ids(), site.local_experts):
            for k, p in ex.named_parameters():
                names[id(p)] = f"{site_name}.experts.{gid}.{k}"
    try:
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    except KeyError:
        raise CheckpointError("internal: an optimizer parameter is not a parameter of the model") from None


def save_names(folder: Path, rank: int, model, optimizer) -> None:
    (Path(folder) / names_file(rank)).write_text(json.dumps(param_names(model, optimizer)))


def can_reshard(folder: Path, saved_world: int) -> bool:
    return all((Path(folder) / names_file(r)).is_file() for r in range(saved_world))


def _merged(folder: Path, saved_world: int) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for r in range(saved_world):
        state = ckpt.load_nested(folder, f"optimizer-rank{r}")
        names = json.loads((folder / names_file(r)).read_text())
        order = [i for g in state["param_groups"] for i in g["params"]]
        if len(order) != len(names):
            raise CheckpointError(f"{folder / names_file(r)} names {len(names)} parameters but optimizer-rank{r} "
                                  f"holds {len(order)}; the checkpoint is inconsistent: resume from a task end")
        for i, name in zip(order, names):
            if i in state["state"] and name not in merged:
                merged[name] = state["state"][i]
    return merged


def load_resharded(optimizer, model, folder: Path, saved_world: int) -> int:
    """Give ``optimizer`` the saved per-parameter state of ``folder`` by name; returns how many got one."""
    merged = _merged(Path(folder), saved_world)
    names = param_names(model, optimizer)
    target = optimizer.state_dict()
    order = [i for g in target["param_groups"] for i in g["params"]]
    target["state"] = {i: merged[n] for i, n in zip(order, names) if n in merged}
    optimizer.load_state_dict(target)
    return len(target["state"])


def shape_change(cfg, saved: tuple[int, int], world: int, where: str, total: int, task_end: bool) -> str:
    """The log line of a resume on another cluster shape: what changed, and where the data stands.

    ``saved``: (world size, ep_size) of the checkpoint; ``where``: "task T (name) step S"; ``total``: that
    task's steps (0 when every task is done)."""
    (w0, ep0), ep1, n = saved, cfg.moe.ep_size, cfg.moe.num_experts
    per_rank = lambda w: cfg.data.batch_size // (w * cfg.train.grad_accum)  # noqa: E731
    head, _, step = where.rpartition(" step ")
    position = (f"{head} continues at step {step} of {total}" if total and step != "0" else
                f"{head} starts at step 0" if total else "every task is done")
    optimizer = ("optimizer state of every rank merged by parameter name and re-sharded" if not task_end
                 else "no optimizer state to move (a task end)")
    stream = (f", its training stream now split over {world} rank(s) with {per_rank(world)} samples per rank per "
              f"step (was {w0} x {per_rank(w0)}), so the remaining batches differ from an uninterrupted run of the "
              "old shape" if total else "")
    return (f"world size {w0} -> {world} rank(s); expert sharding moe.ep_size {ep0} -> {ep1} ({n // ep0} -> "
            f"{n // ep1} of {n} experts per rank); data position: {position}{stream}; {optimizer}")
