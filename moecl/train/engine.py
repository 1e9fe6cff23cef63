"""DeepSpeed engine per task: MoE param groups, AdamW, warmup + cosine (the JSON config: moecl/ds_config.py)."""
from __future__ import annotations

from typing import Any

import torch

from ..config import Config
from ..ds_config import autocast_dtype, ds_config, micro_batch, resolve_ds_config  # noqa: F401  (the trainer's names)
from ..schedule import lr_at  # noqa: F401  (the trainer's name)


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
