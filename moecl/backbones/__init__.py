"""Tiny open_clip backbones shipped with moecl, registered with open_clip's own factory.

After ``import moecl.model`` (or :func:`register_backbones`), ``open_clip.create_model("moecl-tiny")`` and ``open_clip.get_tokenizer("moecl-tiny")``
work with no download: the JSON configs here are ordinary open_clip model configs.
"""
from __future__ import annotations

from ..shipped import folder, shipped

CONFIG_DIR = folder("backbone")


def tiny_model_names() -> list[str]:
    return list(shipped("backbone"))


def register_backbones() -> None:
    import open_clip

    if any(name not in open_clip.list_models() for name in tiny_model_names()):
        open_clip.add_model_config(CONFIG_DIR)  # open_clip's public way to add model configs
