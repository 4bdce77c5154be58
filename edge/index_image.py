"""The index image: the columns of a `RightsIndex` base written as one file (`rights.db.idx`), mapped at boot.

Layout: an 8-byte magic, the header's length and CRC-32 (two little-endian u32), the header (JSON: format,
the rights version, schema version and image epoch of the rights file it was built from, the rights
checksum of the base, the group numbering, and per column its dtype, offset, length and CRC-32), then the
columns, each aligned to 64 bytes from the first 4 KiB boundary after the header (a column's CRC covers its
padding too).

It is never trusted blindly: `read_image` checks the magic, the header's CRC, the format, every column's
bounds and CRC before it returns anything; the store then checks the header against the rights file (schema,
epoch, version) and the checksum after the replay of the change sets since against the one the file holds
(`edge/store/service.py`). Written to a temporary file, fsynced, renamed over the old one and the directory
fsynced: a crash leaves the old image or the new one, never a mix.

Blocking I/O: for a worker thread. The mapping is read-only and shared (file-backed pages: the kernel may
drop them and read them again; they are not anonymous memory).
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec
import numpy as np

from edge.errors import StoreError
from edge.index import Columns

MAGIC: Final = b"EDGEIDX\x00"
FORMAT: Final = 1
_PREFIX: Final = struct.Struct("<8sII")
_PAGE: Final = 4096
_ALIGN: Final = 64
#: Bytes written (and checksummed) per call.
_STEP: Final = 1 << 22


class ImageError(StoreError):
    """The image file is missing, unreadable, damaged or of another format."""


@dataclass(frozen=True, slots=True)
class ImageMeta:
    version: int  # rights version of the base
    schema: int  # schema version of the rights file it was built from
    epoch: str  # meta.image_epoch of the rights file (renewed by every snapshot and every recovery)
    digest: str  # Digest.text() of the base at `version`
    gid: tuple[str, ...]  # group number -> group id ("" for a deleted group: `Tables.gid`, for the checksum)
    numbering: tuple[str, ...]  # group number -> group id, deleted groups too (`Tables.gidx`, carried forward)


class _Column(msgspec.Struct, array_like=True):
    name: str
    dtype: str
    offset: int
    length: int
    crc: int


class _Header(msgspec.Struct):
    format: int
    version: int
    schema: int
    epoch: str
    digest: str
    gid: list[str]
    numbering: list[str]
    columns: list[_Column]
    size: int


def _crc(buf: memoryview) -> int:
    c = 0
    for i in range(0, len(buf), _STEP):  # zlib releases the GIL for each large piece
        c = zlib.crc32(buf[i : i + _STEP], c)
    return c


def write_image(path: Path, columns: Columns, meta: ImageMeta) -> int:
    """Write `columns` as the image at `path`, atomically; returns its size in bytes."""
    names = sorted(columns)
    views = {k: memoryview(np.ascontiguousarray(columns[k])).cast("B") for k in names}  # type: ignore[arg-type]
    cols: list[_Column] = []
    off = 0
    for k in names:
        a = columns[k]
        pad = -views[k].nbytes % _ALIGN
        cols.append(_Column(k, a.dtype.str, off, len(a), zlib.crc32(bytes(pad), _crc(views[k]))))
        off += views[k].nbytes + pad
    body = off

    def header(start: int) -> bytes:
        return msgspec.json.encode(
            _Header(FORMAT, meta.version, meta.schema, meta.epoch, meta.digest, list(meta.gid), list(meta.numbering),
                    [msgspec.structs.replace(c, offset=c.offset + start) for c in cols], start + body)
        )  # fmt: skip

    start = -(-(_PREFIX.size + len(header(0)) + 512) // _PAGE) * _PAGE  # room for the offsets' digits
    hdr = header(start)
    if _PREFIX.size + len(hdr) > start:
        raise ImageError("image header does not fit")  # cannot happen: 512 bytes of room for ~20 offsets
    for old in path.parent.glob(f"{path.name}.*.tmp"):  # left by a writer killed mid-way (or one still going,
        old.unlink(missing_ok=True)  # whose rename then fails: its image was not going to be used either)
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        head = _PREFIX.pack(MAGIC, len(hdr), zlib.crc32(hdr)) + hdr
        os.write(fd, head + bytes(start - len(head)))
        pos = start
        for k, c in zip(names, cols, strict=True):
            v = views[k]
            assert pos == c.offset + start
            for i in range(0, len(v), _STEP):
                os.write(fd, v[i : i + _STEP])
            pad = -(-v.nbytes // _ALIGN) * _ALIGN - v.nbytes
            if pad:
                os.write(fd, bytes(pad))
            pos += v.nbytes + pad
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return start + body


def read_image(path: Path) -> tuple[ImageMeta, Columns]:
    """The image at `path`, mapped read-only, every checksum verified; `ImageError` when it is not sound."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ImageError(f"{path.name}: {e.strerror}") from e
    try:
        size = os.fstat(fd).st_size
        if size < _PREFIX.size:
            raise ImageError(f"{path.name}: {size} bytes, shorter than the header")
        # MAP_POPULATE: the page tables are filled now (the checksums read every page anyway), so that a
        # decision never takes a page fault on a page it is the first to touch.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    magic, hlen, hcrc = _PREFIX.unpack_from(mm, 0)
    if magic != MAGIC:
        raise ImageError(f"{path.name}: not an index image (magic {magic!r})")
    hdr_bytes = mm[_PREFIX.size : _PREFIX.size + hlen]
    if len(hdr_bytes) != hlen or zlib.crc32(hdr_bytes) != hcrc:
        raise ImageError(f"{path.name}: the header fails its checksum")
    try:
        hdr = msgspec.json.decode(hdr_bytes, type=_Header)
    except msgspec.DecodeError as e:  # pragma: no cover - the CRC passed: only a writer bug gets here
        raise ImageError(f"{path.name}: bad header: {e}") from e
    if hdr.format != FORMAT:
        raise ImageError(f"{path.name}: image format {hdr.format}, this software reads {FORMAT}")
    if hdr.size != size:
        raise ImageError(f"{path.name}: {size} bytes, the header says {hdr.size}")
    out: Columns = {}
    whole = memoryview(mm)
    for c in hdr.columns:
        dt = np.dtype(c.dtype)
        end = c.offset + c.length * dt.itemsize
        padded = end + (-(end - c.offset) % _ALIGN)  # the padding is checksummed too: no byte goes unchecked
        if not (_PREFIX.size + hlen <= c.offset <= end <= padded <= size):
            raise ImageError(f"{path.name}: column {c.name} out of bounds")
        if _crc(whole[c.offset : padded]) != c.crc:
            raise ImageError(f"{path.name}: column {c.name} fails its checksum")
        out[c.name] = np.frombuffer(mm, dt, c.length, c.offset)
    whole.release()
    return ImageMeta(hdr.version, hdr.schema, hdr.epoch, hdr.digest, tuple(hdr.gid), tuple(hdr.numbering)), out
