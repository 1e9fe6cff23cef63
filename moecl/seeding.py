"""Seeds: one rule for the whole package (trainer, pretraining, demo)."""
from __future__ import annotations

import hashlib
import random
from typing import Any


def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's global generators from one seed."""
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stable_seed(*parts: Any) -> int:
    """A seed derived from ``parts`` (their repr), the same in every process and run (not Python's salted hash)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:12], 16)
