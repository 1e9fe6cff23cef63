"""One writer per folder: a lock file naming its holder (PID, host, start time), for run folders and caches.

Two trainers on one run folder, or two demos building one cache, would silently clobber each other's files.
The lock is a file created exclusively (``O_CREAT | O_EXCL``, which also holds on NFS) holding the holder's PID,
host and process start time. It is removed on release; a lock left by a process that no longer exists on this
host (killed with -9, a crashed node coming back) is taken over with a message. A lock held from another host
cannot be checked from here: the message names the holder and how to clear it when that process is gone.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from .errors import MoeclError

log = logging.getLogger("moecl")
LOCK_NAME = ".lock"


class FolderBusy(MoeclError):
    """Another live process holds the folder."""


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (tells a reused PID apart), None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return start is None or now is None or now == start


def describe_holder(holder: dict[str, Any]) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} ({holder.get('what', 'moecl')}, since {when})"


class FolderLock:
    """``with FolderLock(folder, "moecl train"):`` ... or ``acquire()`` / ``release()``."""

    def __init__(self, folder: str | Path, what: str, name: str = LOCK_NAME):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / name
        self.held = False

    def _read(self) -> Optional[dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or garbage: treated as held by an unknown process

    def holder(self) -> Optional[dict[str, Any]]:
        """Who holds the lock now (None: nobody, or a stale holder)."""
        data = self._read()
        if data is None or self._stale(data):
            return None
        return data

    def _stale(self, data: dict[str, Any]) -> bool:
        return (data.get("host") == socket.gethostname() and isinstance(data.get("pid"), int)
                and not _alive(data["pid"], data.get("start")))

    def try_acquire(self) -> Optional[dict[str, Any]]:
        """Take the lock; None on success, else the live holder's record."""
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
              "since": time.time(), "what": self.what}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                data = self._read()
                if data is None:
                    continue  # released in between: try again
                if not self._stale(data):
                    if not data:  # half-written by a process starting this instant
                        time.sleep(0.2)
                        data = self._read()
                        if data is None or (data and self._stale(data)):
                            continue
                    return data or {"pid": "?", "host": "?"}
                live = self._take_over(data)
                if live is not None:
                    return live
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return None
        data = self._read()
        return data or {"pid": "?", "host": "?"}

    def _take_over(self, stale: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Move a stale lock out of the way (atomically: a rename); None when done, else a live holder that
        got there first (its lock is put back)."""
        grave = self.path.with_name(f"{self.path.name}.stale.{os.getpid()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return None
        try:
            moved = json.loads(grave.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved != stale:  # another process took it over first and we moved its fresh lock: put it back
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
            grave.unlink()
            return moved or {"pid": "?", "host": "?"}
        grave.unlink()
        log.warning("%s: taking over the lock of %s, which no longer runs", self.folder, describe_holder(stale))
        return None

    def acquire(self, hint: str = "") -> "FolderLock":
        holder = self.try_acquire()
        if holder is not None:
            raise FolderBusy(f"{self.folder} is in use by {describe_holder(holder)}; {hint or 'wait for it'} "
                             f"(if that process is gone, delete {self.path})")
        return self

    def wait_acquire(self, on_wait, done=None, poll_s: float = 1.0) -> bool:
        """Take the lock, waiting while a live process holds it (``on_wait(holder)`` is called once). Returns
        False without taking it when ``done()`` becomes true meanwhile (the holder built what we wanted)."""
        told = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                return True
            if done is not None and done():
                return False
            if not told:
                on_wait(holder)
                told = True
            time.sleep(poll_s)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        data = self._read()
        if data and data.get("pid") == os.getpid() and data.get("host") == socket.gethostname():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
