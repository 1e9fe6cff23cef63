"""Run checkpoints: atomic folders of safetensors + JSON with a checksummed manifest.

A checkpoint is valid only when its ``MANIFEST.json`` exists, lists every file its kind requires (see
:func:`required_files`: the trainer state, the method's weights, and for a mid-task checkpoint the optimizer and RNG
parts of every rank of the world that wrote it) and every listed file matches its sha256: a write that was
interrupted (killed process, full disk, a rank that never wrote its part) is never taken as valid. Rank 0 writes
the shared files and the manifest; every other file is per rank, named by global rank. Nothing is unpickled.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..methods import METHODS

log = logging.getLogger("moecl")
MANIFEST = "MANIFEST.json"
TASK_RE = re.compile(r"^task-(\d{3})$")
STEP_RE = re.compile(r"^step-(\d{3})-(\d{7})$")


def task_dir_name(task: int) -> str:
    return f"task-{task:03d}"


def step_dir_name(task: int, step: int) -> str:
    return f"step-{task:03d}-{step:07d}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MANIFEST_FORMAT = 2
ADAPTER_FILES = ("adapters/adapters.safetensors", "adapters/adapters.json")


def rank_files(rank: int) -> list[str]:
    """The files one rank writes into a mid-task checkpoint (named by global rank)."""
    return [f"{kind}-rank{rank}.{ext}" for kind in ("optimizer", "rng") for ext in ("safetensors", "json")]


def required_files(state: dict[str, Any]) -> list[str]:
    """Every file a checkpoint with this ``trainer.json`` content must hold."""
    need = ["trainer.json"]
    method = METHODS.get(str(state.get("method")))
    weights = method.weights_file if method is not None else None
    if weights == "adapters":
        need += list(ADAPTER_FILES)
    elif weights == "backbone":
        need.append("backbone.safetensors")
    if int(state.get("ddas_tasks") or 0) > 0:
        need += ["ddas.safetensors", "ddas.json"]
    if not state.get("task_end", True):
        for rank in range(int(state.get("world_size") or 1)):
            need += rank_files(rank)
    return need


def write_manifest(folder: Path, meta: dict[str, Any]) -> None:
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files, **meta}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def verify(folder: Path) -> Optional[str]:
    """None when the checkpoint is complete and intact, else why not."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (the write did not finish)"
    data = _read_json(manifest)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        return "MANIFEST.json is unreadable"
    for name in files:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            return f"MANIFEST.json lists {name!r}, a path outside the checkpoint"
    if "trainer.json" not in files:
        return "MANIFEST.json does not list trainer.json (every checkpoint holds one)"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256(path) != digest:
            return f"{name} does not match its checksum"
    state = _read_json(folder / "trainer.json")
    if not isinstance(state, dict) or not isinstance(state.get("progress"), dict):
        return "trainer.json is unreadable"
    if data.get("format", 1) >= MANIFEST_FORMAT and data.get("task_end") != state.get("task_end", True):
        return "MANIFEST.json and trainer.json disagree on the checkpoint's kind"
    missing = [name for name in required_files(state) if name not in files]
    if missing:
        kind = "task-end" if state.get("task_end", True) else f"mid-task ({state.get('world_size', 1)} rank(s))"
        return f"a {kind} checkpoint needs {', '.join(missing)}, which MANIFEST.json does not list"
    return None


def wait_for_parts(tmp: Path, state: dict[str, Any], timeout_s: float = 30.0) -> None:
    """Rank 0, before the manifest: every required file (every rank's part) is visible in ``tmp``.

    On a shared file system another node's files can take a moment to appear; a part that never does means
    that rank wrote elsewhere (a run folder that is not the same folder on every node) or not at all."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [n for n in required_files(state) if not (tmp / n).is_file()]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if missing:
        raise CheckpointError(f"checkpoint {tmp} is incomplete: {', '.join(missing)} never appeared (is the run "
                              "folder the same shared folder on every node?); it was not committed")


def finalize(tmp: Path, final: Path, meta: dict[str, Any]) -> Path:
    """Manifest, then rename into place (the rename is the commit point)."""
    write_manifest(tmp, meta)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def is_disk_full(exc: BaseException) -> bool:
    """A write that failed for lack of space (OSError ENOSPC/EDQUOT, or safetensors' wrapped os error)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122"))


def staging_dir(root: Path, name: str) -> Path:
    tmp = root / f".{name}.tmp"
    return tmp


def _order(name: str) -> Optional[tuple[int, int]]:
    m = TASK_RE.match(name)
    if m:
        return int(m.group(1)), 10**9  # a task end comes after every step of that task
    m = STEP_RE.match(name)
    if m:
        return int(m.group(1)), int(m.group(2))
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(o, p) for p in root.iterdir() if p.is_dir() and (o := _order(p.name)) is not None]
    return [p for _, p in sorted(found)]


def latest_valid(run_dir: Path, kind: str = "any") -> Optional[Path]:
    """The newest checkpoint that verifies; broken ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        if kind == "task" and not TASK_RE.match(path.name):
            continue
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is not valid (%s); using an earlier one", path, problem)
    return None


def prune_steps(run_dir: Path, keep: int) -> None:
    steps = [p for p in list_checkpoints(run_dir) if STEP_RE.match(p.name)]
    for old in steps[:-keep] if keep else steps:
        shutil.rmtree(old, ignore_errors=True)


# ---- nested state <-> safetensors + JSON ---------------------------------------------------------------

def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """Tensors go to ``tensors`` under a path key; the rest becomes a JSON skeleton pointing at them."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(k, tensors, f"{prefix}.k{i}"), flatten_state(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if name in _OBJECTS:  # a few small state objects of DeepSpeed's optimizers, by an explicit allowlist
        return {"__object__": name, "state": flatten_state(vars(obj), tensors, f"{prefix}.o")}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    raise CheckpointError(f"cannot store a {type(obj).__name__} in a checkpoint (at {prefix})")


# Classes a checkpoint may hold, rebuilt field by field (never unpickled): DeepSpeed's loss scalers.
_OBJECTS = {"deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
            "deepspeed.utils.tensor_fragment.fragment_address"}


def _rebuild(name: str, state: dict) -> Any:
    import importlib
    module, _, cls = name.rpartition(".")
    obj = object.__new__(getattr(importlib.import_module(module), cls))
    obj.__dict__.update(state)
    return obj


def unflatten_state(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__dict__" in skel:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in skel["__dict__"]}
        if "__tuple__" in skel:
            return tuple(unflatten_state(v, tensors) for v in skel["__tuple__"])
        if "__object__" in skel:
            if skel["__object__"] not in _OBJECTS:
                raise CheckpointError(f"checkpoint names a class outside the allowlist: {skel['__object__']}")
            return _rebuild(skel["__object__"], unflatten_state(skel["state"], tensors))
        if "__dtype__" in skel:
            dtype = getattr(torch, str(skel["__dtype__"]), None)
            if not isinstance(dtype, torch.dtype):  # e.g. "load": a function of torch, never a dtype
                raise CheckpointError(f"checkpoint names an unknown dtype: {skel['__dtype__']!r}")
            return dtype
    if isinstance(skel, list):
        return [unflatten_state(v, tensors) for v in skel]
    return skel


def save_nested(obj: Any, folder: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skel = flatten_state(obj, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skel))


def load_nested(folder: Path, name: str) -> Any:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return unflatten_state(json.loads((folder / f"{name}.json").read_text()), tensors)
