"""Tiny open_clip backbones shipped with moecl, registered with open_clip's own factory.

After ``import moecl``, ``open_clip.create_model("moecl-tiny")`` and ``open_clip.get_tokenizer("moecl-tiny")``
work with no download: the JSON configs here are ordinary open_clip model configs.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def tiny_model_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def register_backbones() -> None:
    import open_clip
    from open_clip import factory

    if CONFIG_DIR not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(CONFIG_DIR)
