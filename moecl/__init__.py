"""moecl: continual learning of CLIP with Mixture-of-Experts adapters, scaled with DeepSpeed."""
from .runtime import configure_accelerator_env as _configure_accelerator_env

_configure_accelerator_env()  # must precede any DeepSpeed import

from .backbones import register_backbones as _register_backbones  # noqa: E402
from .config import Config, ConfigError, ModelConfig, load_config  # noqa: E402

_register_backbones()

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: the model pulls in DeepSpeed, which `moecl --help` and config tools do not need.
    if name in ("build_model", "MoECLIP"):
        from . import model
        return getattr(model, name)
    if name == "load_run":  # a trained (or imported) run, ready to evaluate: see moecl.evaluation.loading
        from .evaluation.loading import load_run
        return load_run
    raise AttributeError(name)


__all__ = ["Config", "ConfigError", "ModelConfig", "load_config", "build_model", "MoECLIP", "load_run", "__version__"]
