"""The MoE-adapted CLIP: build it with :func:`build_model`."""
from __future__ import annotations

from ..config import ModelConfig, MoEConfig
from .backbone import create_backbone, image_size_of, tokenizer_for
from .clip import DenseAdapter, MoECLIP
from .experts import AdapterExpert, GroupedExperts
from .gate import TaskRouterGate, noisy_logits, selection_counts, task_logits
from .moe import MoEAdapter


def build_model(model: ModelConfig | None = None, moe: MoEConfig | None = None,
                method: str = "moe-adapters") -> MoECLIP:
    """Frozen open_clip backbone + adapters. ``method``: moe-adapters, dense-adapter, full-ft or zero-shot."""
    model = model or ModelConfig()
    moe = moe or MoEConfig()
    return MoECLIP(create_backbone(model), model, moe, method)


__all__ = ["build_model", "MoECLIP", "MoEAdapter", "DenseAdapter", "AdapterExpert", "GroupedExperts",
           "TaskRouterGate", "task_logits", "noisy_logits", "selection_counts", "create_backbone",
           "tokenizer_for", "image_size_of", "ModelConfig", "MoEConfig"]
