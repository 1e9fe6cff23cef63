"""What a data folder may hold: plain names and regular files, nothing that runs or points elsewhere.

A data folder is often downloaded from somewhere else. Its ``task.json`` and ``sequence.yaml`` name shards,
splits and task folders; webdataset would read ``x.tar::pipe:cmd`` or ``pipe:cmd`` as a command to run, a
``/`` or ``..`` as a path out of the folder, and a FIFO as a file to block on forever. So every name that
comes from the data folder is checked here (by the loaders and by ``python -m data_tools verify``, with the
same rules), and shards are opened only after they are known to be regular files. ``pipe:`` and remote URL
templates come only from the user's own config or environment.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, BinaryIO, Optional

from ..errors import DataError

MAX_NAME_CHARS = 200
NAME_PUNCTUATION = "._-+"
NAME_RULE = ("a plain file or folder name: letters, digits and . _ - + only, not starting with '.' or '-' "
             f"(no '/', '::', ':', spaces, shell characters or URL schemes), at most {MAX_NAME_CHARS} characters")


def plain_name_problem(value: Any) -> Optional[str]:
    """Why ``value`` is not a plain name a data folder may use (None when it is one)."""
    if not isinstance(value, str):
        return f"must be a string, found {type(value).__name__} {value!r:.60}"
    if not value:
        return "is empty"
    if len(value) > MAX_NAME_CHARS:
        return f"is {len(value)} characters long"
    if value.startswith((".", "-")):
        return f"{value!r:.80} starts with {value[0]!r}"
    bad = sorted({c for c in value if not (c.isalnum() or c in NAME_PUNCTUATION)})
    if bad:
        what = "a command or URL" if ("::" in value or ":" in value or "|" in value) else "a path or shell text"
        return f"{value!r:.80} looks like {what} (characters {''.join(bad)!r} are not allowed)"
    return None


def check_plain_name(value: Any, where: str, field: str) -> str:
    """``value`` when it is a plain name; else a DataError naming the file and field."""
    problem = plain_name_problem(value)
    if problem:
        raise DataError(f"{where}: {field} {problem}; it must be {NAME_RULE}. A data folder never runs commands "
                        "or names remote URLs: put a pipe:/remote URL template in your own config "
                        "(data.shard_url_template) or in MOECL_SHARD_URL_TEMPLATE")
    return value


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file_problem(path: str | Path) -> Optional[str]:
    """Why ``path`` cannot be read as a data file (missing, a FIFO, a device, ...); None for a regular file.
    Checked without opening it: opening a FIFO for reading blocks until someone writes to it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return f"is {file_kind(st.st_mode)}, not a regular file"
    return None


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading; OSError naming what it is when it is anything else.

    Checked before opening, and again on the open descriptor (opened non-blocking, so a file swapped for a FIFO
    in between cannot block): a shard or image from a data folder is never a pipe or a device.
    """
    problem = regular_file_problem(path)
    if problem:
        raise OSError(f"{path} {problem}" + ("" if problem == "does not exist" else "; refusing to read it"))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"{path} is {file_kind(mode)}, not a regular file; refusing to read it")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
