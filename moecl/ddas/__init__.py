"""DDAS: the distribution discriminative auto-selector (task-agnostic routing by reconstruction error)."""
from .autoencoder import AutoencoderStats, TaskAutoencoder, fit_autoencoder
from .reference import ReferenceAutoencoder, ReferenceSelector, load_alexnet_features, load_selector
from .selector import ZERO_SHOT, DDASSelector

__all__ = ["AutoencoderStats", "DDASSelector", "TaskAutoencoder", "ZERO_SHOT", "fit_autoencoder",
           "ReferenceAutoencoder", "ReferenceSelector", "load_alexnet_features", "load_selector"]
