"""The demo's pretrained tiny CLIP, found without building anything: the pretraining parameters and the cache
key of their result, the recipe (moecl/configs/demo.yaml's ``demo:`` mapping: the synthetic world and the
pretraining, full and quick), where the cache is, and ``model.init_checkpoint=demo`` / ``demo-quick`` as a file.

Building it (world + pretraining) is :func:`moecl.pretrain.build_init_checkpoint`; this module imports no
model, trainer or evaluator, so the model layer can look a cached file up without depending on them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

PRETRAIN_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "pretrain.json"
DEMO_CONFIG = "demo"


@dataclass(frozen=True)
class PretrainParams:
    """Everything the pretrained weights depend on (the cache key, with the world's parameters)."""
    model: str = "moecl-tiny"
    steps: int = 600
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 50
    betas: tuple[float, float] = (0.9, 0.98)
    crop_scale: tuple[float, float] = (0.8, 1.0)
    init_logit_scale: float = math.log(1 / 0.07)
    seed: int = 0
    version: int = PRETRAIN_VERSION

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"], d["crop_scale"] = list(self.betas), list(self.crop_scale)
        return d


@dataclass
class PretrainResult:
    """Where the weights are, and what pretraining measured."""
    weights: Path
    info: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def zero_shot(self) -> dict[str, float]:
        return self.info.get("zero_shot", {})


def world_fingerprint(world: Path) -> dict[str, Any]:
    manifest = Path(world) / "world.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} does not exist: build the world first (python -m data_tools synthetic "
                                f"--out {world})")
    rec = json.loads(manifest.read_text())
    if not rec.get("complete"):
        raise FileNotFoundError(f"{manifest}: the world under {world} is incomplete; rebuild it")
    return rec["params"]


def cache_key(params: PretrainParams, world: Path) -> str:
    blob = json.dumps({"params": params.as_dict(), "world": world_fingerprint(world)}, sort_keys=True)
    return f"{params.model}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def cached_result(params: PretrainParams, world: Path, cache_dir: Path) -> Optional[PretrainResult]:
    """The cached pretraining of these parameters on this world, or None."""
    folder = Path(cache_dir) / cache_key(params, world)
    weights, info = folder / WEIGHTS_FILE, folder / INFO_FILE
    if weights.is_file() and info.is_file():
        try:
            rec = json.loads(info.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if rec.get("params") == params.as_dict() and rec.get("complete"):
            return PretrainResult(weights, rec, cached=True)
    return None


def _recipe() -> dict[str, Any]:
    """The ``demo:`` mapping of moecl/configs/demo.yaml: the world and the pretraining, full and quick."""
    from .config import ConfigError, read_config_file, resolve_config_path
    path = resolve_config_path(DEMO_CONFIG)
    recipe = (read_config_file(path) or {}).get("demo")
    keys = ("world", "world_quick", "pretrain", "pretrain_quick")
    if not isinstance(recipe, dict) or any(not isinstance(recipe.get(k), dict) for k in keys):
        raise ConfigError(f"{path}: the demo: mapping needs {', '.join(keys)} (each a mapping)")
    return recipe


_RECIPE = _recipe()
# The world: data_tools.synthetic.build_world parameters; the foundation: moecl-tiny from scratch, contrastive
# on the world's captions (moecl.pretrain). Both from demo.yaml's demo: mapping (read when this module loads).
WORLD: dict[str, Any] = dict(_RECIPE["world"])
WORLD_QUICK: dict[str, Any] = dict(_RECIPE["world_quick"])
PRETRAIN = PretrainParams(**_RECIPE["pretrain"])
PRETRAIN_QUICK = PretrainParams(**_RECIPE["pretrain_quick"])


def default_cache() -> Path:
    """``$MOECL_CACHE``, else ``$XDG_CACHE_HOME/moecl``, else ``~/.cache/moecl``."""
    if os.environ.get("MOECL_CACHE"):
        return Path(os.environ["MOECL_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "moecl"


def world_dir(cache: Path, params: dict[str, Any]) -> Path:
    """The cached synthetic world of these build parameters."""
    tag = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return cache / "worlds" / f"synthetic-{tag}"


INIT_CHECKPOINTS = {"demo": False, "demo-quick": True}  # model.init_checkpoint values -> quick?


def recipe_for(value: str, model_name: str) -> tuple[dict[str, Any], PretrainParams]:
    """(world parameters, pretraining parameters) that ``model.init_checkpoint=value`` names."""
    quick = INIT_CHECKPOINTS[value]
    params = PRETRAIN_QUICK if quick else PRETRAIN
    if model_name != params.model:
        from .config import ConfigError
        raise ConfigError(f"model.init_checkpoint={value} is the demo's pretrained {params.model}; set "
                          f"model.name={params.model} (model.name is {model_name!r})")
    return (WORLD_QUICK if quick else WORLD), params


def cached_init_checkpoint(value: str, model_name: str) -> Optional[str]:
    """The cached weights file ``model.init_checkpoint=value`` (demo / demo-quick) names, or None."""
    world, params = recipe_for(value, model_name)
    try:
        hit = cached_result(params, world_dir(default_cache(), world), default_cache() / "pretrained")
    except FileNotFoundError:  # no world yet
        hit = None
    return None if hit is None else str(hit.weights)


def resolve_init_checkpoint(value: Optional[str], model_name: str) -> Optional[str]:
    """``model.init_checkpoint`` as a file: ``demo`` / ``demo-quick`` name the demo's pretrained tiny CLIP in
    the cache (a ConfigError says how to build it when it is not there); anything else is returned as given."""
    if value not in INIT_CHECKPOINTS:
        return value
    found = cached_init_checkpoint(value, model_name)
    if found is None:
        from .config import ConfigError
        raise ConfigError(f"model.init_checkpoint={value}: the demo's pretrained tiny CLIP is not in the cache "
                          f"{default_cache()} ($MOECL_CACHE); build it with `moecl demo"
                          f"{' --quick' if INIT_CHECKPOINTS[value] else ''}` or start a `moecl train` that names it")
    return found
