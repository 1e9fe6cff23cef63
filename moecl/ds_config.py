"""A run's DeepSpeed config (``train.ds_config``: a shipped name under ds_configs/ or a JSON file, every
"auto" filled from the moecl config) and the autocast it implies for training and evaluation alike."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import Config, ConfigError
from .shipped import find, folder, shipped

DS_CONFIG_DIR = folder("ds_config")


def resolve_ds_config(name: str, device: torch.device) -> Path:
    if name == "auto":
        name = "bf16_zero0" if device.type == "cuda" else "cpu"
    path = Path(name)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"train.ds_config={name!r}: no such file")
        return path
    found, hint = find("ds_config", name)
    if found is None:
        names = ", ".join(shipped("ds_config"))
        raise ConfigError(f"train.ds_config={name!r} is neither a JSON file nor a shipped config ({names}){hint}")
    return found


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
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2) or isinstance(stage, bool):
        # ZeRO-3 partitions the frozen backbone's parameters too, and its optimizer state reloads differently:
        # moecl's checkpoints and resume are built and tested for stages 0-2 (the trainable state is small)
        raise ConfigError(f"{path}: zero_optimization.stage={stage!r} is not supported; use 0, 1 or 2 "
                          "(moecl's trainable adapters and routers are small enough for ZeRO-2)")
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


def autocast_for(cfg: Config, device: torch.device, ds: Optional[dict[str, Any]] = None) -> Callable[[], Any]:
    """The one autocast rule of a run, for the trainer and for evaluating it later: ``runtime.precision``
    fp32 -> none, bf16 -> bf16 on a GPU, auto -> what the DeepSpeed config asks for (``ds``: the trainer's,
    already filled in; otherwise it is read here for one rank, bf16 on a GPU when it cannot be)."""
    precision = cfg.runtime.precision
    dtype: Optional[torch.dtype] = None
    if precision == "bf16":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    elif precision == "auto":
        if ds is None:
            try:
                ds = ds_config(cfg, 1, device)
            except ConfigError:
                ds = {"torch_autocast": {"enabled": device.type == "cuda"}}
        dtype = autocast_dtype(ds)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
