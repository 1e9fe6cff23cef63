"""Files shipped inside the package, found by name: run configs, task sequences, DeepSpeed configs, tiny
backbone configs. One resolver for all of them (the listing and the did-you-mean); each caller keeps its own
rule for what counts as a path. No heavy imports."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent
KINDS: dict[str, tuple[str, str]] = {  # kind -> (folder inside the package, file suffix)
    "config": ("configs", ".yaml"),
    "sequence": ("sequences", ".yaml"),
    "ds_config": ("ds_configs", ".json"),
    "backbone": ("backbones", ".json"),
}


def folder(kind: str) -> Path:
    return PACKAGE / KINDS[kind][0]


def shipped(kind: str) -> dict[str, Path]:
    """Every shipped file of ``kind``, by name (the file's stem), sorted."""
    sub, suffix = KINDS[kind]
    return {p.stem: p for p in sorted((PACKAGE / sub).glob(f"*{suffix}"))}


def find(kind: str, name: str) -> tuple[Optional[Path], str]:
    """(the shipped file named ``name``, or None; a ``"; did you mean 'x'?"`` hint for the error, or "")."""
    files = shipped(kind)
    if str(name) in files:
        return files[str(name)], ""
    close = difflib.get_close_matches(str(name), list(files), n=1)
    return None, f"; did you mean '{close[0]}'?" if close else ""
