"""Which backbone a checkpoint was trained on, so adapters are never loaded onto another one.

Adapters only mean something on the exact backbone weights they were trained against: another random init,
another pretrained file or tag gives wrong numbers without any error. The identity is what decides those
weights: the open_clip model name, the pretrained tag (or the sha256 of a local weights file), the sha256 of
``model.init_checkpoint`` and, for a randomly initialised backbone, the seed it was drawn from.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Optional

from ..config import Config
from ..errors import CheckpointError
from ..model.backbone import WEIGHT_SUFFIXES
from .files import sha256


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256(Path(path))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, hashed once per process (keyed by path, size and mtime)."""
    st = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def backbone_identity(cfg: Config) -> dict[str, Any]:
    """The identity of the backbone ``cfg`` builds (files are hashed, not named: a moved file is the same)."""
    m = cfg.model
    ident: dict[str, Any] = {"name": m.name}
    source = m.pretrained
    if source is not None:
        path = Path(source).expanduser()
        is_file = source.endswith(WEIGHT_SUFFIXES) or os.sep in source or path.exists()
        ident["pretrained"] = f"sha256:{file_sha256(path)}" if is_file and path.is_file() else source
    if m.init_checkpoint:
        path = Path(m.init_checkpoint).expanduser()
        ident["init_checkpoint"] = f"sha256:{file_sha256(path)}" if path.is_file() else f"missing:{path}"
    if source is None and not m.init_checkpoint:
        ident["init_seed"] = cfg.train.seed  # a random init is drawn from train.seed
    return ident


def _short(value: Any) -> str:
    text = str(value)
    return text[:19] if text.startswith("sha256:") else text  # sha256: + 12 hex digits


def describe(ident: dict[str, Any]) -> str:
    """``moecl-tiny, pretrained sha256:0123456789ab, random init, seed 0`` (as people read it)."""
    parts = [str(ident.get("name"))]
    for key, label in (("pretrained", "pretrained "), ("init_checkpoint", "init_checkpoint "),
                       ("init_seed", "random init, seed ")):
        if key in ident:
            parts.append(label + _short(ident[key]))
    return ", ".join(parts)


def check_backbone(saved: Optional[dict[str, Any]], ours: dict[str, Any], where: str | Path, what: str) -> None:
    """Refuse ``where`` (a checkpoint) when it was trained on another backbone than ``ours``; ``what`` names
    where ours comes from. Checkpoints written before identities were stored (``saved`` None) pass."""
    if not saved or saved == ours:
        return
    keys = sorted(set(saved) | set(ours))
    diff = "; ".join(f"{k} {_short(saved.get(k, '-'))} vs {_short(ours.get(k, '-'))}" for k in keys
                     if saved.get(k) != ours.get(k))
    raise CheckpointError(f"{where} was trained on backbone [{describe(saved)}] but {what} builds backbone "
                          f"[{describe(ours)}] ({diff}); adapters only work on the backbone they were trained "
                          "on: use that run's config and weights files")


def check_checkpoint(path: str | Path, ours: dict[str, Any], what: str) -> None:
    """Refuse checkpoint ``path`` when it was trained on another backbone (its adapter state says which; a
    full fine-tuned backbone replaces every weight, so there only the model name has to match)."""
    import json
    path = Path(path)
    saved = None
    for source in (path / "adapters" / "adapters.json", path / "trainer.json"):
        try:
            saved = json.loads(source.read_text()).get("backbone")
        except (OSError, ValueError, AttributeError):
            continue
        if saved:
            break
    if saved and (path / "backbone.safetensors").is_file():
        saved, ours = {"name": saved.get("name")}, {"name": ours.get("name")}
    check_backbone(saved if isinstance(saved, dict) else None, ours, path, what)
