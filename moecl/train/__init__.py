"""The continual training engine: ``train(cfg, run_dir)`` or ``moecl train``."""
from .loop import ContinualTrainer, TrainingError, train

__all__ = ["ContinualTrainer", "TrainingError", "train"]
