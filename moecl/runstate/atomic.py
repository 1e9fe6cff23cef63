"""Whole-or-nothing writes: the one helper for a single file (folders commit by rename, see files.finalize).
No heavy imports (``moecl report`` writes with it)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a temp file beside it, renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        try:  # on a read-only folder this fails too, and must not hide the write's own error
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
