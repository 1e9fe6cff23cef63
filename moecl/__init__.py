"""moecl: continual learning of CLIP with Mixture-of-Experts adapters, scaled with DeepSpeed.

``import moecl`` stays light (no torch, DeepSpeed or open_clip) so that ``moecl --help``, ``moecl configs``
and ``moecl report`` start fast; :mod:`moecl.model` sets DeepSpeed's accelerator and registers the tiny
backbones with open_clip when it is imported.
"""
from .config import Config, ConfigError, ModelConfig, load_config

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: the model pulls in torch, DeepSpeed and open_clip, which `moecl --help` and config tools do not need.
    if name in ("build_model", "MoECLIP"):
        from . import model
        return getattr(model, name)
    raise AttributeError(name)


__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "build_model", "MoECLIP", "__version__"]
