"""What a run over many nodes needs beyond one: one shared run folder, a name for a rank that is lost, and a
per-rank record of what each rank read.

* The run folder must be the same folder on every node (a shared file system): rank 0 writes a fresh token
  into it at start and every other rank must read that token back through its own ``--out`` path, else
  every rank stops before anything else is written.
* Every rank beats a counter in the rendezvous store (the one torchrun / the deepspeed launcher already run)
  from a daemon thread. When a collective fails (a peer's connection closed) or times out
  (``runtime.collective_timeout_s``), the ranks still up see whose counter stopped and say so, instead of
  a raw gloo/NCCL message or a hang.
* ``ranks/rank-NNNNN.jsonl``: which shards each rank trained on and evaluated, per stream pass, so the data
  split over ranks and nodes can be checked after the fact (one writer per file: its rank).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist

from ..errors import MoeclError
from ..runtime import DistInfo

log = logging.getLogger("moecl")
TOKEN = ".run-token"
BEAT_S = 2.0  # heartbeat interval; a peer is lost when its counter stands still for 2.5 beats


class RankLostError(MoeclError):
    """A peer rank stopped answering (its process or node died, or it stalled past the collective timeout)."""


class RunFolderError(MoeclError):
    """The ranks do not see one shared run folder."""


def node_of_this_process() -> str:
    """The node index as the launchers give it (torchrun, the deepspeed launcher, SLURM), else '?'."""
    for var in ("GROUP_RANK", "CROSS_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "") != "":
            return os.environ[var]
    return "?"


def _identity(run_dir: Optional[Path] = None) -> dict[str, Any]:
    return {"host": socket.gethostname(), "node": node_of_this_process(), "pid": os.getpid(),
            "path": str(Path(run_dir).absolute()) if run_dir is not None else None}


def describe(peer: dict[str, Any]) -> str:
    return f"rank {peer['rank']} (node {peer['node']}, host {peer['host']}, pid {peer['pid']})"


def check_shared_run_dir(run_dir: Path, info: DistInfo) -> None:
    """Collective: refuse to start unless every rank's ``run_dir`` is the folder rank 0 created."""
    if info.world_size == 1:
        return
    run_dir = Path(run_dir)
    token = [None]
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        token = [uuid.uuid4().hex]
        tmp = run_dir / (TOKEN + ".tmp")
        tmp.write_text(token[0])
        os.replace(tmp, run_dir / TOKEN)
    dist.broadcast_object_list(token, src=0)
    try:
        seen = (run_dir / TOKEN).read_text().strip()
    except OSError:
        seen = None
    me = {**_identity(run_dir), "rank": info.rank, "ok": seen == token[0]}
    everyone: list[Any] = [None] * info.world_size
    dist.all_gather_object(everyone, me)
    bad = [p for p in everyone if not p["ok"]]
    if bad:
        first = everyone[0]
        lines = "; ".join(f"{describe(p)} has --out {p['path']}" for p in bad[:8])
        raise RunFolderError(
            f"the run folder is not shared by every node: rank 0 (host {first['host']}) created {first['path']}, "
            f"but {lines}, where that folder's {TOKEN} is not visible ({len(bad)} rank(s) in all). Give every node "
            "the same --out on a file system all nodes mount (NFS, Lustre, ...); node-local disks cannot hold a "
            "run of many nodes")


class PeerWatch:
    """Heartbeats while the run is up; on an unexpected error, names the rank(s) that stopped answering.

    ``with PeerWatch(info, timeout_s, where):`` around the run. A MoeclError passes through unchanged (it
    already names its cause); any other exception in a multi-rank run is checked against the heartbeats and,
    when some peer is silent, replaced by a RankLostError naming it. ``where()`` says where the run stood.
    """

    def __init__(self, info: DistInfo, timeout_s: float, where: Callable[[], str] = lambda: "start-up"):
        self.info, self.timeout_s, self.where = info, timeout_s, where
        self.peers: list[dict[str, Any]] = []
        self._store = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- heartbeats ---------------------------------------------------------------------------------------
    def __enter__(self) -> "PeerWatch":
        if self.info.world_size == 1:
            return self
        everyone: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(everyone, {**_identity(), "rank": self.info.rank})
        self.peers = everyone
        try:  # a client connection of its own, so the beating thread never shares one with collectives
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=30))
            self._store = dist.PrefixStore("moecl/heartbeat/", store)
        except (KeyError, ValueError, RuntimeError) as e:
            log.warning("no heartbeats (the rendezvous store is not reachable: %s); a lost rank will not be "
                        "named", e)
            return self
        self._store.add(str(self.info.rank), 1)
        self._thread = threading.Thread(target=self._beat, name="moecl-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self._store.add(str(self.info.rank), 1)
            except Exception:  # noqa: BLE001 - the store's host is gone: nothing left to beat into
                return

    def silent_ranks(self) -> Optional[list[int]]:
        """Peers whose heartbeat stood still for 2.5 beats; None when the store itself is gone."""
        ranks = [r for r in range(self.info.world_size) if r != self.info.rank]
        try:
            before = [self._store.add(str(r), 0) for r in ranks]
            time.sleep(2.5 * BEAT_S)
            after = [self._store.add(str(r), 0) for r in ranks]
        except Exception:  # noqa: BLE001 - connection refused / reset / timed out
            return None
        return [r for r, a, b in zip(ranks, before, after) if a == b]

    # -- the error path -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop beating and wait for the thread: a daemon thread still inside a store call when the interpreter
        exits is ended by pthread_exit inside C++ code, which aborts the process ("terminate called ...")."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * BEAT_S)
            self._thread = None

    def __exit__(self, kind, exc, tb) -> bool:
        self.stop()
        if exc is None or self.info.world_size == 1 or self._store is None:
            self._store = None
            return False
        if isinstance(exc, MoeclError) or not isinstance(exc, Exception):
            return False
        silent = self.silent_ranks()
        self._store = None
        try:
            where = self.where()
        except Exception:  # noqa: BLE001 - a message must come out whatever state the run is in
            where = "the run"
        cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        tail = (f"Every rank stops (a collective waits at most runtime.collective_timeout_s={self.timeout_s:g} s). "
                "When the node is back, start the same command on every node with --resume auto: it continues "
                "from the last valid checkpoint in the run folder")
        if silent is None:
            host = os.environ.get("MASTER_ADDR", "?")
            raise RankLostError(f"the node holding the rendezvous store ({host}; rank 0's node) stopped answering "
                                f"during {where} ({cause}). {tail}") from None
        if not silent:
            return False  # every peer is alive: a real error, shown as it is
        names = ", ".join(describe(self.peers[r]) if self.peers else f"rank {r}" for r in silent)
        raise RankLostError(f"{names} stopped answering during {where}: its process or node is gone, or it "
                            f"stalled ({cause}). {tail}") from None


class RankLog:
    """``ranks/rank-NNNNN.jsonl`` in the run folder: this rank's identity, then one line per stream pass."""

    def __init__(self, run_dir: Path, info: DistInfo, extra: Optional[dict[str, Any]] = None):
        self.path = Path(run_dir) / "ranks" / f"rank-{info.rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write({"event": "start", "rank": info.rank, "world_size": info.world_size, **_identity(run_dir),
                    **(extra or {})})

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train_pass(self, task: int, step: int, steps: int, shards: dict[str, int]) -> None:
        """Samples this rank trained on from each shard in steps [step, step + steps) of ``task``."""
        self.write({"event": "train", "task": task, "step": step, "steps": steps, "shards": dict(sorted(shards.items()))})

    def eval_row(self, row: int, read: dict[str, dict[str, int]]) -> None:
        """Samples this rank evaluated from each shard, per ``task/split/mode`` pass, after task ``row``."""
        self.write({"event": "eval", "row": row, "sets": read})
