"""DeepSpeed engine per task: the JSON config from ds_configs/, MoE param groups, AdamW, warmup + cosine."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..config import Config, ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def resolve_ds_config(name: str, device: torch.device) -> Path:
    if name == "auto":
        name = "bf16_zero0" if device.type == "cuda" else "cpu"
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"train.ds_config={name!r}: no such file")
        return path
    shipped = DS_CONFIG_DIR / f"{name}.json"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"train.ds_config={name!r} is neither a JSON file nor a shipped config ({names})")
    return shipped


def ds_config(cfg: Config, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict with every "auto" filled from the moecl config."""
    path = resolve_ds_config(cfg.train.ds_config, device)
    try:
        ds = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    micro = micro_batch(cfg, world_size)
    fill = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": cfg.train.grad_accum,
            "gradient_clipping": cfg.train.grad_clip, "train_batch_size": micro * cfg.train.grad_accum * world_size}
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds["train_batch_size"] != micro * cfg.train.grad_accum * world_size:
        raise ConfigError(f"{path}: train_batch_size={ds['train_batch_size']} disagrees with data.batch_size="
                          f"{cfg.data.batch_size}; leave it \"auto\"")
    if cfg.train.zero_stage is not None:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.train.zero_stage
    if device.type != "cuda":
        for key in ("bf16", "fp16"):
            if ds.get(key, {}).get("enabled"):
                raise ConfigError(f"{path} enables {key} but there is no GPU; use train.ds_config=cpu")
    return ds


def micro_batch(cfg: Config, world_size: int) -> int:
    per_step = world_size * cfg.train.grad_accum
    if cfg.data.batch_size % per_step:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by ranks x train.grad_accum "
                          f"= {world_size} x {cfg.train.grad_accum}; choose a multiple of {per_step}")
    return cfg.data.batch_size // per_step


def autocast_dtype(ds: dict[str, Any]) -> torch.dtype | None:
    """bf16 autocast for the backbone when the DeepSpeed config asks for torch_autocast."""
    ta = ds.get("torch_autocast", {})
    if ta.get("enabled"):
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16}[ta.get("dtype", "bfloat16")]
    return None


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine to 0 at ``total`` (within one task)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


def build_engine(model: torch.nn.Module, params: list[torch.nn.Parameter], cfg: Config, ds: dict[str, Any], lr: float):
    """A DeepSpeed engine over ``params`` (experts go to their expert-parallel param groups)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "adapters", "lr": lr})
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
    import contextlib
    import io
    import logging
    chatter = io.StringIO()  # DeepSpeed prints its process-group set-up ("No existing process group found, ...")
    with contextlib.redirect_stdout(chatter):
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds,
                                                       dist_init_required=False)
    if chatter.getvalue().strip():
        logging.getLogger("moecl").debug("deepspeed: %s", chatter.getvalue().strip())
    return engine, optimizer
