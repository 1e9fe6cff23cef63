"""The adapter state as files: ``adapters.safetensors`` + ``adapters.json`` in one folder (written atomically,
by rank 0; the gathering of experts over expert-parallel ranks is collective, so every rank calls)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..model.state import is_writer, adapter_state, apply_adapter_state

TENSORS = "adapters.safetensors"
META = "adapters.json"
FILES = (TENSORS, META)


def save_adapter_state(model, directory: str | Path, extra_meta: Optional[dict] = None) -> Path:
    """Write ``adapters.safetensors`` + ``adapters.json`` into ``directory`` (atomically, rank 0 writes)."""
    tensors, meta = adapter_state(model)
    meta.update(extra_meta or {})
    directory = Path(directory)
    if is_writer():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        save_file(tensors, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    return directory


def read_adapter_state(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    if not (directory / TENSORS).is_file() or not (directory / META).is_file():
        raise CheckpointError(f"{directory} holds no adapter state ({TENSORS} + {META} expected)")
    return load_file(str(directory / TENSORS)), json.loads((directory / META).read_text())


def load_adapter_state(model, source: str | Path | tuple[dict, dict], strict_config: bool = True) -> dict:
    """Load a saved adapter state (a folder, or (tensors, meta)) onto ``model`` at any ep_size; returns the
    metadata."""
    tensors, meta = read_adapter_state(source) if not isinstance(source, tuple) else source
    return apply_adapter_state(model, tensors, meta, strict_config)
