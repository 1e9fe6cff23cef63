"""The learning-rate schedule of every training loop here (continual tasks and the demo's pretraining)."""
from __future__ import annotations

import math


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine to 0 at ``total`` (within one task)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))
