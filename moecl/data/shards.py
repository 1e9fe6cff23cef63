"""Reading shards: URL expansion, opening (local files, or the user's own ``pipe:``/remote template) and
bounded, streaming tar iteration.

A shard that ends early or breaks mid-way raises ShardError after yielding every complete sample before
the damage, so the stream can count exactly what was lost instead of silently dropping a shard.

A shard comes from a data folder, i.e. from anywhere: it is read member by member (never whole), a member
larger than ``ShardLimits.max_member_bytes`` is skipped (its sample yielded with ``SKIP_KEY`` set to the
reason, so the stream counts it), and a shard that decompresses past ``max_shard_bytes`` is cut off there.
Compression (gzip, bzip2, xz) is undone here, in bounded reads, whatever the file is called.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as _wds_expand_urls
from webdataset.tariterators import base_plus_ext

from .untrusted import open_regular

SKIP_KEY = "__SKIP__"  # upper case: never a member suffix (those are lower-cased)
MAX_HEADER_BYTES = 1 << 20  # a pax / GNU long-name header is a few hundred bytes; it is read into memory
READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class ShardLimits:
    """How much one shard may hold (``data.max_member_bytes`` / ``data.max_shard_bytes`` in the config)."""
    max_member_bytes: int = 64 << 20   # one file of a sample (an image); bigger ones are skipped and counted
    max_shard_bytes: int = 16 << 30    # the whole tar, after decompression; the rest is cut off and counted


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


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses pax and GNU long-name headers bigger than MAX_HEADER_BYTES: tarfile reads those whole."""

    def _proc_member(self, tarfile_):  # the documented hook for subclasses
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                         tarfile.SOLARIS_XHDTYPE) and not 0 <= self.size <= MAX_HEADER_BYTES:
            raise tarfile.ReadError(f"extended header of {self.size} bytes (more than {MAX_HEADER_BYTES}) "
                                    f"at member {self.name!r:.80}")
        return super()._proc_member(tarfile_)


class _Budget:
    """A read-only stream that counts bytes and fails once more than ``limit`` have been read. It pulls
    READ_BLOCK bytes at a time from ``inner`` (a decompressor: one call per MiB, not per 8 KiB, so skipping
    a huge member is fast) and hands them out in the small pieces tarfile asks for."""

    def __init__(self, inner: Any, limit: int, head: bytes = b""):
        self.inner, self.limit, self.count = inner, limit, len(head)
        self.buf, self.pos = head, 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = READ_BLOCK
        if self.pos >= len(self.buf):
            self.buf, self.pos = self.inner.read(max(size, READ_BLOCK)), 0
            self.count += len(self.buf)
            if self.count > self.limit:
                raise OSError(f"decompresses to more than {self.limit} bytes (data.max_shard_bytes); "
                              "raise it if the shard is genuine")
        data = self.buf[self.pos:self.pos + size]
        self.pos += len(data)
        return data

    def close(self) -> None:
        pass


def _decompressed(raw: Any, limit: int) -> _Budget:
    """``raw`` (a file or pipe) as an uncompressed tar stream, by magic number, in bounded reads."""
    head = b""
    while len(head) < 6:  # a pipe may hand out fewer bytes than asked
        chunk = raw.read(6 - len(head))
        if not chunk:
            break
        head += chunk
    feed = _Budget(raw, 1 << 62, head)  # replays the magic bytes, then reads on
    if head.startswith(b"\x1f\x8b"):
        return _Budget(gzip.GzipFile(fileobj=feed, mode="rb"), limit)
    if head.startswith(b"BZh"):
        return _Budget(bz2.BZ2File(feed, mode="rb"), limit)
    if head.startswith(b"\xfd7zXZ\x00"):
        return _Budget(lzma.LZMAFile(feed, mode="rb"), limit)
    return _Budget(feed, limit)


def _open(url: str, local: bool) -> BinaryIO:
    """A local path only ever through ``open`` (after checking it is a regular file: a FIFO would block);
    anything else (the user's own template made it) through webdataset's gopen."""
    if local:
        return open_regular(url)
    parsed = urlparse(url)
    if parsed.scheme == "":
        return open_regular(url)
    if parsed.scheme == "file":
        return open_regular(url2pathname(parsed.path))
    return gopen(url, "rb")


def _past_cap(member: tarfile.TarInfo, end: int, limits: ShardLimits) -> OSError:
    return OSError(f"decompresses to more than {limits.max_shard_bytes} bytes (data.max_shard_bytes; member "
                   f"{member.name!r:.80} ends at byte {end}); raise it if the shard is genuine")


def read_shard(url: str, limits: Optional[ShardLimits] = None, *, local: bool = True) -> Iterator[dict[str, Any]]:
    """Yield the samples of one tar shard as ``{"__key__": key, ext: bytes, ...}`` groups, in order.

    ``local``: ``url`` is a file path (a data folder's shard); else a URL from the user's template. A sample
    with a member over ``limits.max_member_bytes`` comes with ``SKIP_KEY`` set to why, and no data for it.
    """
    limits = limits or ShardLimits()
    completed = 0
    finished = False
    try:
        stream = _open(url, local)
    except Exception as e:  # noqa: BLE001 - open/gopen raise OSError, ValueError, ... per scheme
        raise ShardError(url, f"cannot open: {e}" if isinstance(e, OSError) and not e.errno
                         else f"cannot open: {type(e).__name__}: {e}", 0) from None
    try:
        current: dict[str, Any] | None = None
        try:
            tar = tarfile.open(fileobj=_decompressed(stream, limits.max_shard_bytes), mode="r|",
                               tarinfo=_BoundedTarInfo)
            for member in tar:
                tar.members = []  # streaming: do not keep every header in memory
                if member.size < 0:
                    raise tarfile.ReadError(f"member {member.name!r:.80} has a negative size")
                end = member.offset_data + member.size
                prefix, suffix = base_plus_ext(member.name)
                if not member.isreg() or not safe_member_name(member.name) or prefix is None \
                        or suffix.startswith("__"):
                    if end > limits.max_shard_bytes:
                        raise _past_cap(member, end, limits)
                    continue  # links, devices, absolute or ``..`` names: never part of a sample
                if current is not None and prefix != current["__key__"]:
                    group, current = current, None
                    completed += 1
                    yield group
                if end > limits.max_shard_bytes:  # checked before tarfile decompresses past it
                    raise _past_cap(member, end, limits)
                if current is None:
                    current = {"__key__": prefix}
                if member.size > limits.max_member_bytes:
                    current[SKIP_KEY] = (f"member {member.name!r:.80} is {member.size} bytes, above "
                                         f"data.max_member_bytes={limits.max_member_bytes}")
                    continue  # tarfile skips its data in bounded reads
                fobj = tar.extractfile(member)
                data = fobj.read(member.size) if fobj is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                current[suffix.lower()] = data
            if current is not None:
                group, current = current, None
                completed += 1
                yield group
            finished = True
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as e:
            reason = str(e) if isinstance(e, OSError) and not e.errno else f"{type(e).__name__}: {e}"
            raise ShardError(url, reason, completed) from None
    finally:
        try:
            stream.close()
        except Exception as e:  # noqa: BLE001 - a pipe: command's exit status surfaces here
            if finished:
                raise ShardError(url, f"{type(e).__name__}: {e}", completed) from None
