"""Adapter-only state (experts, routers, noise, frozen set, counters, config) as flat tensors + JSON metadata.

Experts are keyed by GLOBAL expert id, gathered from every expert-parallel rank, so a state taken at any
``ep_size`` applies at any other. A few MB instead of a full CLIP per task. No file I/O here: the files
(``adapters.safetensors`` + ``adapters.json``) are :mod:`moecl.runstate.adapters`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..errors import CheckpointError
from .clip import DenseAdapter, MoECLIP
from .moe import MoEAdapter

FORMAT = 1


def _gather_experts(site: MoEAdapter) -> list[dict[str, torch.Tensor]]:
    """Every global expert's tensors, on every rank of the expert-parallel group."""
    local = [{k: v.detach().cpu() for k, v in ex.state_dict().items()} for ex in site.local_experts]
    if site.ep_size == 1:
        return local
    group = site.deepspeed_moe.ep_group
    names = list(local[0])
    gathered: list[dict[str, torch.Tensor]] = [dict() for _ in range(site.num_experts)]
    for name in names:
        stacked = torch.stack([e[name] for e in local])
        parts = [torch.empty_like(stacked) for _ in range(site.ep_size)]
        dist.all_gather(parts, stacked, group=group)
        for r, part in enumerate(parts):
            for i in range(site.num_local_experts):
                gathered[r * site.num_local_experts + i][name] = part[i].clone()
    return gathered


def adapter_state(model: MoECLIP) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flat tensors + JSON metadata of everything the adapters learned. Collective when ep_size > 1."""
    tensors: dict[str, torch.Tensor] = {}
    for name, site in model.named_moe_sites():
        for gid, ex in enumerate(_gather_experts(site)):
            for k, v in ex.items():
                tensors[f"{name}.experts.{gid}.{k}"] = v.contiguous()
        for t, (r, n) in enumerate(zip(site.gate.routers, site.gate.noise)):
            tensors[f"{name}.router.{t}"] = r.detach().cpu().contiguous()
            tensors[f"{name}.noise.{t}"] = n.detach().cpu().contiguous()
        tensors[f"{name}.counts"] = site.reduced_counts().cpu()  # summed over ranks (collective)
        tensors[f"{name}.frozen"] = site.frozen.cpu().to(torch.uint8)
    dense = [(name, s) for name, s in model.named_sites() if isinstance(s, DenseAdapter)]
    for name, site in dense:
        for k, v in site.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
    meta = {"format": FORMAT, "method": model.method, "num_tasks": model.num_tasks,
            "model": model.model_cfg.model_dump(mode="json"), "moe": model.moe_cfg.model_dump(mode="json"),
            "frozen": model.frozen_experts()}
    return tensors, meta


def is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def apply_adapter_state(model: MoECLIP, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                        strict_config: bool = True) -> dict:
    """Put an adapter state (as :func:`adapter_state` made it, at any ep_size) into ``model``: adds tasks as
    needed; returns the metadata. Files: :mod:`moecl.runstate.adapters`."""
    if strict_config:
        for key in ("num_experts", "top_k", "width", "towers", "routing", "shared_router", "image_blocks",
                    "text_blocks"):
            saved, ours = meta["moe"].get(key, "all" if key.endswith("_blocks") else None), getattr(model.moe_cfg, key)
            if saved != ours:
                raise CheckpointError(f"adapter state has moe.{key}={saved!r} but the model has {ours!r}; "
                                      "use the run's own config")
        if meta["model"]["name"] != model.model_cfg.name:
            raise CheckpointError(f"adapter state is for model.name={meta['model']['name']!r}, "
                                  f"not {model.model_cfg.name!r}")
    while model.num_tasks < meta["num_tasks"]:
        model.add_task()
    with torch.no_grad():
        for name, site in model.named_moe_sites():
            for gid, ex in zip(site.global_expert_ids(), site.local_experts):
                for k, p in ex.state_dict().items():
                    p.copy_(tensors[f"{name}.experts.{gid}.{k}"])
            for t, (r, n) in enumerate(zip(site.gate.routers, site.gate.noise)):
                r.copy_(tensors[f"{name}.router.{t}"])
                n.copy_(tensors[f"{name}.noise.{t}"])
            # the saved counts are a sum over ranks: rank 0 holds it, so later reductions stay sums
            site.counts.copy_(tensors[f"{name}.counts"] if is_writer() else torch.zeros_like(site.counts))
            site.frozen.copy_(tensors[f"{name}.frozen"].bool())
            site.apply_frozen()
        for name, s in model.named_sites():
            if isinstance(s, DenseAdapter):
                s.load_state_dict({k: tensors[f"{name}.{k}"] for k in s.state_dict()})
    return meta
