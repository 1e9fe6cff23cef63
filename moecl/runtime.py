"""Device and distributed setup, in one place.

CUDA + nccl when a GPU is present, otherwise CPU + gloo with ``DS_ACCELERATOR=cpu``. The accelerator
variable must be set before DeepSpeed is first imported, so :func:`configure_accelerator_env` runs when
``moecl`` is imported. Works under plain ``python``, ``torchrun`` and the ``deepspeed`` launcher: all
three are read from the standard ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional

import torch


def configure_accelerator_env() -> str:
    """Choose DeepSpeed's accelerator before it is imported; returns its name."""
    if "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    if os.environ["DS_ACCELERATOR"] == "cpu":
        # DeepSpeed's CPU accelerator reads these; keep them modest on small machines.
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.environ["DS_ACCELERATOR"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> the local GPU when there is one, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device={requested!r} but no CUDA device is visible; use runtime.device=cpu")
    return torch.device("cuda", local_rank)


# Variables init_distributed set for a world of one, with their values before (None: unset). DeepSpeed's engine
# reads LOCAL_RANK from the environment, so they stay while that world lives; close_distributed restores them.
_SET_BY_US: dict[str, Optional[str]] = {}


def init_distributed(requested_device: str = "auto", timeout_s: Optional[float] = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent: the first call's settings hold).

    A plain ``python`` process becomes a world of one on a free local port, so DeepSpeed's
    expert-parallel groups exist in every mode. ``timeout_s`` bounds how long a collective waits for a
    rank that stopped answering (``runtime.collective_timeout_s``; DeepSpeed's default is 10 minutes).
    """
    configure_accelerator_env()
    import deepspeed
    import torch.distributed as dist

    from . import compat

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(requested_device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cpu":
            compat.disable_cpu_shm_allreduce()  # gloo alone (DeepSpeed's shm all-reduce leaks /dev/shm)
        if "RANK" not in os.environ:  # a plain process: a world of one, its variables undone by close_distributed
            own = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
            _SET_BY_US.update({k: os.environ.get(k) for k in own if k not in _SET_BY_US})
            os.environ.update(own)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s) if timeout_s else timedelta(minutes=10)
        if timeout_s:
            # groups DeepSpeed creates later (expert parallel, expert data parallel) get torch's process default
            # (30 min for gloo), not the timeout given here: make that default the same bound
            import torch.distributed.distributed_c10d as c10d
            c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
        compat.forget_deepspeed_groups()
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def close_distributed() -> None:
    """End the world of one that :func:`init_distributed` made for a plain process: destroy its process group
    and put back the environment as it was (no RANK / MASTER_* left behind for the next world or a child
    process). A launcher's world (torchrun, deepspeed) is not ours and is left alone."""
    if not _SET_BY_US:
        return
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    for key, old in _SET_BY_US.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    _SET_BY_US.clear()


@contextlib.contextmanager
def distributed(requested_device: str = "auto", timeout_s: Optional[float] = None) -> Iterator[DistInfo]:
    """:func:`init_distributed` for the duration of a ``with`` block; a world of one made by it ends with the
    block (a world that existed before is kept)."""
    import torch.distributed as dist
    existed = dist.is_available() and dist.is_initialized()
    info = init_distributed(requested_device, timeout_s)
    try:
        yield info
    finally:
        if not existed:
            close_distributed()
