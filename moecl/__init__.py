"""moecl: continual learning of CLIP with Mixture-of-Experts adapters, scaled with DeepSpeed.

``import moecl`` imports nothing heavy (no torch, DeepSpeed, open_clip, not even pydantic) so that
``moecl --help``, ``moecl configs`` and ``moecl report`` start fast; names below load on first use.
:mod:`moecl.model` sets DeepSpeed's accelerator and registers the tiny backbones with open_clip.
"""
__version__ = "0.1.0"

_LAZY = {"Config": "config", "ConfigError": "config", "ModelConfig": "config", "load_config": "config",
         "build_model": "model", "MoECLIP": "model",
         "load_run": "evaluation.loading"}  # load_run: a trained (or imported) run, ready to evaluate


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = [*_LAZY, "__version__"]
