"""The MoE-adapted CLIP: build it with :func:`build_model`."""
from __future__ import annotations

from ..runtime import configure_accelerator_env

configure_accelerator_env()  # DeepSpeed reads DS_ACCELERATOR when it is first imported (by .experts below)

from .. import compat  # noqa: E402,F401  (checks the DeepSpeed version before anything uses it)
from ..config import ModelConfig, MoEConfig  # noqa: E402
from .backbone import create_backbone, image_size_of, tokenizer_for  # noqa: E402  (registers the tiny backbones)
from .clip import DenseAdapter, MoECLIP  # noqa: E402
from .experts import AdapterExpert, GroupedExperts  # noqa: E402
from .gate import TaskRouterGate, noisy_logits, selection_counts, task_logits  # noqa: E402
from .moe import MoEAdapter  # noqa: E402


def build_model(model: ModelConfig | None = None, moe: MoEConfig | None = None,
                method: str = "moe-adapters") -> MoECLIP:
    """Frozen open_clip backbone + adapters. ``method``: moe-adapters, dense-adapter, full-ft or zero-shot."""
    model = model or ModelConfig()
    moe = moe or MoEConfig()
    return MoECLIP(create_backbone(model), model, moe, method)


__all__ = ["build_model", "MoECLIP", "MoEAdapter", "DenseAdapter", "AdapterExpert", "GroupedExperts",
           "TaskRouterGate", "task_logits", "noisy_logits", "selection_counts", "create_backbone",
           "tokenizer_for", "image_size_of", "ModelConfig", "MoEConfig"]
