"""Reading shards: URL expansion (paths, brace patterns, ``pipe:`` commands) and tar iteration.

A shard that ends early or breaks mid-way raises ShardError after yielding every complete sample before
the damage, so the stream can count exactly what was lost instead of silently dropping a shard.
"""
from __future__ import annotations

import tarfile
import zlib
from typing import Any, Iterator

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.tariterators import base_plus_ext


class ShardError(Exception):
    """A shard that could not be opened or read to its end."""

    def __init__(self, url: str, reason: str, completed: int):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
        self.completed = completed  # samples fully read before the damage


def expand_urls(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a-{000..002}.tar"`` -> three URLs; ``"x.tar::y.tar"`` -> two; lists expand element-wise."""
    if isinstance(spec, str):
        return _wds_expand_urls(spec)
    out: list[str] = []
    for s in spec:
        out.extend(_wds_expand_urls(str(s)))
    return out


def safe_member_name(name: str) -> bool:
    """A tar member name that stays inside the archive: relative, with no ``..`` component."""
    return not (name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"))


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """Yield the samples of one tar shard as ``{"__key__": key, ext: bytes, ...}`` groups, in order."""
    completed = 0
    finished = False
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # noqa: BLE001 - gopen raises OSError, ValueError, ... per scheme
        raise ShardError(url, f"cannot open: {type(e).__name__}: {e}", 0) from None
    try:
        current: dict[str, Any] | None = None
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for member in tar:
                if not member.isreg() or not safe_member_name(member.name):
                    continue  # links, devices, absolute or ``..`` names: never part of a sample
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None:
                    continue
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if current is not None and prefix != current["__key__"]:
                    group, current = current, None
                    completed += 1
                    yield group
                if current is None:
                    current = {"__key__": prefix}
                current[suffix.lower()] = data
                tar.members = []  # streaming: do not keep every header in memory
            if current is not None:
                group, current = current, None
                completed += 1
                yield group
            finished = True
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
            raise ShardError(url, f"{type(e).__name__}: {e}", completed) from None
    finally:
        try:
            stream.close()
        except Exception as e:  # noqa: BLE001 - a pipe: command's exit status surfaces here
            if finished:
                raise ShardError(url, f"{type(e).__name__}: {e}", completed) from None
