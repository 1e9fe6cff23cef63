"""Build a frozen open_clip backbone by name and pretrained source, offline only."""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
from pathlib import Path
from typing import Optional

import open_clip
from torch import nn

from ..backbones import register_backbones
from ..config import ConfigError, ModelConfig

register_backbones()  # moecl-tiny / moecl-small resolvable by open_clip's own factory

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _check_name(name: str) -> None:
    names = open_clip.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"model.name={name!r} is not an open_clip model{hint} "
                          "(open_clip.list_models() lists them; moecl adds moecl-tiny and moecl-small)")


def _how_to_provide(name: str, source: str) -> str:
    return (f"download the weights for {name} on a machine with internet (e.g. open_clip.create_model("
            f"{name!r}, pretrained={source!r}, cache_dir=DIR)) and copy DIR here with model.cache_dir=DIR, "
            "or pass a local file: model.pretrained=/path/to/weights.{pt,bin,safetensors}")


_HUB_WEIGHTS = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def _cached_hub_files(repo: str, required: list[str], cache_dir: Optional[str]) -> Optional[Path]:
    """A weights file of ``repo`` in the local hub cache (and every ``required`` file), else None."""
    from huggingface_hub import try_to_load_from_cache
    if any(not isinstance(try_to_load_from_cache(repo, f, cache_dir=cache_dir), str) for f in required):
        return None
    for f in _HUB_WEIGHTS:
        hit = try_to_load_from_cache(repo, f, cache_dir=cache_dir)
        if isinstance(hit, str):
            return Path(hit)
    return None


def _cached_tag_file(name: str, tag: str, cache_dir: Optional[str]) -> Optional[Path]:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        hit = _cached_hub_files(repo, [filename] if filename else [], cache_dir)
        if hit:
            return hit
    if cfg.get("url"):
        path = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if path.is_file():
            return path
    return None


@contextlib.contextmanager
def _hub_offline():
    """The hub client reads HF_HUB_OFFLINE at import time; flip its constant for this call only."""
    import huggingface_hub.constants as hub
    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


log = logging.getLogger("moecl")


class _DropRandomInitNotice(logging.Filter):
    """open_clip warns 'No pretrained weights loaded ... initialized randomly' for a model built with
    pretrained=None; when an init checkpoint is loaded into it right after, that warning is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def quiet_random_init_notice(active: bool):
    root, notice = logging.getLogger(), _DropRandomInitNotice()
    if active:
        root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def init_checkpoint_path(cfg: ModelConfig) -> Optional[Path]:
    """``model.init_checkpoint`` as a file (``demo`` / ``demo-quick``: the cached demo weights), or None."""
    if not cfg.init_checkpoint:
        return None
    from ..pretrained import resolve_init_checkpoint
    path = Path(resolve_init_checkpoint(cfg.init_checkpoint, cfg.name)).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.init_checkpoint={cfg.init_checkpoint!r}: no such file (give a safetensors file "
                          "of the whole open_clip model, or 'demo' for the demo's pretrained moecl-tiny)")
    return path


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """An open_clip CLIP with every weight frozen. Never touches the network."""
    _check_name(cfg.name)
    source: Optional[str] = cfg.pretrained
    init = init_checkpoint_path(cfg)
    kwargs = {}
    if cfg.cache_dir:
        kwargs["cache_dir"] = cfg.cache_dir
    if source is None:  # no open_clip notice: the trainer says once, in its own words, when nothing is loaded
        with quiet_random_init_notice(True):
            model = open_clip.create_model(cfg.name, pretrained=None, **kwargs)
    elif source.endswith(WEIGHT_SUFFIXES) or os.sep in source or Path(source).exists():
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained={source!r}: no such file; " + _how_to_provide(cfg.name, "TAG"))
        model = open_clip.create_model(cfg.name, pretrained=str(path), **kwargs)
    else:
        if source.startswith("hf-hub:"):
            cached = _cached_hub_files(source[len("hf-hub:"):], ["open_clip_config.json"], cfg.cache_dir)
        else:
            known = open_clip.list_pretrained_tags_by_model(cfg.name)
            if source not in known:
                raise ConfigError(f"model.pretrained={source!r} is not a pretrained tag of {cfg.name} "
                                  f"(known: {', '.join(known) or 'none'}) nor an existing file")
            cached = _cached_tag_file(cfg.name, source, cfg.cache_dir)
        if cached is None:
            raise ConfigError(f"pretrained weights {cfg.name}/{source} are not available offline; "
                              + _how_to_provide(cfg.name, source))
        name, pretrained = (source, None) if source.startswith("hf-hub:") else (cfg.name, source)
        with _hub_offline():
            model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
    if init is not None:
        from safetensors.torch import load_file
        state = load_file(str(init))
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"model.init_checkpoint={cfg.init_checkpoint!r} ({init}) does not fit model.name="
                              f"{cfg.name}: {str(e).splitlines()[0]}") from None
        log.info("backbone %s: weights from init checkpoint %s (%d tensors, %d parameters)", cfg.name, init,
                 len(state), sum(v.numel() for v in state.values()))
    model.requires_grad_(False)
    model.eval()
    return model


def tokenizer_for(cfg: ModelConfig):
    return open_clip.get_tokenizer(cfg.name, cache_dir=cfg.cache_dir) if cfg.cache_dir else \
        open_clip.get_tokenizer(cfg.name)


def image_size_of(model: nn.Module) -> int:
    size = model.visual.image_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def text_towers(model: nn.Module):
    """The text transformer and its owner (CLIP keeps it inline, CustomTextCLIP in ``.text``)."""
    owner = model.text if hasattr(model, "text") else model
    return owner, owner.transformer

