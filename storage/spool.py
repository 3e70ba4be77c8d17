"""The disk spool: batches of rows kept in append-only, checksummed segment files until acked.

Over 500 lines on purpose: the batch codec, the segment format and the spool share private
constants and are read together when the on-disk format changes.

Layout of ``directory``::

    lock                        flock(2) held while a Spool is open (one owner per directory)
    00000000000000000001.seg    segments, oldest first
    cursor                      {"segment": n, "offset": o}: records before it are acked

A segment starts with ``PLMSPOOL`` and a format version (u16). In formats 2 and 3 each record
is a 16-byte header (the magic ``RECORD_MAGIC``, a u32 payload length, a u32 CRC-32 of the
payload, a u32 CRC-32 of the first 12 header bytes) and the payload: one batch of rows in the
codec below. Format 3 (written today) differs from format 2 only in its payloads: each is
headed by the batch's id, a UUID the writer's ingest ledger knows it by, so a batch replayed
after it was written is recognised and skipped. The version is bumped with the payload so
that an older pluginmon quarantines a format-3 segment whole, by name, instead of losing its
records one by one as malformed. Format 2 and format 1 (no magic, no header checksum: a u32
length and a u32 CRC-32) are still read, never written; their batches have no stored id and
get one derived from their bytes (the same at every replay). Every append is fsync'ed before
it returns, and the directory is fsync'ed when a segment is created, so an appended batch
survives a crash of the process or the machine.

Opening checks every record. A record whose header or checksum is wrong, or whose payload
claims a layout it does not hold (a forged row count, say), loses only itself: the scan
resynchronises on the next record whose magic, header checksum and payload checksum are all
valid, and the records after it replay. A segment that ends in a record with nothing valid
after it (a crash mid-write, a "torn tail") is truncated there. Every lost record is logged
and counted by reason in :attr:`SpoolStats.lost_records` (records, not rows: the row count of
a corrupt record cannot be trusted). Format 1 segments cannot resynchronise past a record
whose length is damaged: the rest of such a segment is truncated and counted once.

All methods block on file I/O; async callers run them through ``asyncio.to_thread``. They are
safe to call from several threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
import uuid
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 512 * MiB

SEGMENT_MAGIC = b"PLMSPOOL"
SEGMENT_FORMAT_VERSION = 3
_FORMAT_WITHOUT_BATCH_IDS = 2  # read, never written
_LEGACY_FORMAT_VERSION = 1  # read, never written
_READABLE_FORMAT_VERSIONS = (
    _LEGACY_FORMAT_VERSION,
    _FORMAT_WITHOUT_BATCH_IDS,
    SEGMENT_FORMAT_VERSION,
)
SEGMENT_SUFFIX = ".seg"
_SEGMENT_HEADER = struct.Struct("<8sH")
# Formats 2 and 3: magic, payload length, crc32(payload), crc32(the 12 bytes before it). The
# magic lets a scan find the next record after a corrupt one; the header checksum lets it
# reject a false match (the magic inside a payload) without trusting its length.
RECORD_MAGIC = b"\xa5PLR"
_RECORD_HEADER = struct.Struct("<4sIII")
_RECORD_HEADER_CHECKED = struct.Struct("<4sII")
RECORD_HEADER_BYTES = _RECORD_HEADER.size
_LEGACY_RECORD_HEADER = struct.Struct("<II")  # format 1: payload length, crc32(payload)
# A record larger than this is certainly garbage (a batch of rows is at most a few MiB).
_MAX_RECORD_BYTES = 256 * MiB

Row = tuple[object, ...]


class SpoolError(RuntimeError):
    """Base class of spool errors."""


class SpoolFullError(SpoolError):
    """An append would take the spool past its size cap; the batch was not stored."""


class SpoolLockedError(SpoolError):
    """Another Spool (in this or another process) already owns the directory."""


class SpoolCodecError(SpoolError, ValueError):
    """A row cannot be encoded, or a stored payload cannot be decoded."""


# -- codec -------------------------------------------------------------------------------
#
# Payload v3: u8 codec version, u16 columns, u32 rows, the batch id (16 bytes), then the
# batch column by column. v2 (segment formats 1 and 2) is the same without the batch id
# (still read: a v2 batch's id is derived from its bytes, so it is the same at every replay);
# v1 was row by row. Each column is a u8 kind, a u8 "has NULLs" flag, then (if set) one byte
# per row (1 = NULL), then its values. Plain columns (all int, all float, ...) are packed
# arrays, decoded at C speed; a column mixing types falls back to a u8 type tag per value.
# Typed on purpose (no pickle): a spool file is data, never code.

CODEC_VERSION = 3
_CODEC_VERSION_WITHOUT_ID = 2
_PAYLOAD_HEADER = struct.Struct("<BHI")
BATCH_ID_BYTES = 16
# Ids of v2 batches (written before batches carried one): a UUID from the payload's hash.
_LEGACY_BATCH_NAMESPACE = uuid.UUID("5b0f2c8e-52a6-4c1e-9a43-6f0d3c1e7a21")
_COLUMN_HEADER = struct.Struct("<BB")
# Column kinds.
_KIND_MIXED = 0  # a tagged value per row (tags below)
_KIND_INT = 1  # i64 per row
_KIND_FLOAT = 2  # f64 per row
_KIND_BOOL = 3  # u8 per row
_KIND_STR = 4  # u32 length per row, then the UTF-8 bytes of all rows
_KIND_DATETIME_UTC = 5  # i64 microseconds since the Unix epoch; decodes timezone-aware UTC
_KIND_NULL = 6  # every row NULL, no data
# Value tags in a mixed column.
_TAG_NONE = 0
_TAG_FALSE = 1
_TAG_TRUE = 2
_TAG_INT = 3  # i64
_TAG_FLOAT = 4  # f64
_TAG_STR = 5  # u32 length + UTF-8
_TAG_BYTES = 6  # u32 length + bytes
_TAG_DATETIME_UTC = 7  # i64 microseconds since the Unix epoch
_TAG_DATETIME_NAIVE = 8  # i64 microseconds since 1970-01-01T00:00 (no timezone)
_TAGGED_I64 = struct.Struct("<Bq")
_TAGGED_F64 = struct.Struct("<Bd")
_TAGGED_U32 = struct.Struct("<BI")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_NoneType = type(None)
_MAX_ROWS_PER_BATCH = 10_000_000


def _micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _is_aware(value: datetime) -> bool:
    return value.tzinfo is not None and value.utcoffset() is not None


def encode_rows(rows: Sequence[Row], *, batch_id: uuid.UUID | None = None) -> bytes:
    """Encode a batch under ``batch_id`` (a new random id when None); every row must have
    the same number of columns."""
    count = len(rows)
    columns = len(rows[0]) if rows else 0
    widths = set(map(len, rows))
    if len(widths) > 1:
        raise SpoolCodecError(f"rows have {sorted(widths)} values, expected {columns} in each")
    out = bytearray(_PAYLOAD_HEADER.pack(CODEC_VERSION, columns, count))
    out += (batch_id or uuid.uuid4()).bytes
    for values in zip(*rows, strict=True) if rows else ():
        out += _encode_column(values)
    return bytes(out)


def _encode_column(values: tuple[object, ...]) -> bytes:
    count = len(values)
    types = set(map(type, values))
    has_nulls = _NoneType in types
    types.discard(_NoneType)
    if not types:
        return _COLUMN_HEADER.pack(_KIND_NULL, 0)
    kind, data = _encode_plain(values, types, has_nulls)
    if kind == _KIND_MIXED:
        # Tags carry the NULLs themselves.
        return _COLUMN_HEADER.pack(_KIND_MIXED, 0) + data
    header = _COLUMN_HEADER.pack(kind, 1 if has_nulls else 0)
    if has_nulls:
        header += bytes([1 if value is None else 0 for value in values])
    assert count == len(values)
    return header + data


def _encode_plain(
    values: tuple[object, ...], types: set[type], has_nulls: bool
) -> tuple[int, bytes]:
    """(kind, data) for a column of one plain type; (MIXED, tagged data) otherwise."""
    count = len(values)
    only = next(iter(types)) if len(types) == 1 else None
    filler: object = 0
    if only is str:
        distinct = {value: value.encode("utf-8") for value in set(values) if value is not None}  # type: ignore[attr-defined]
        encoded = [distinct[value] if value is not None else b"" for value in values]
        lengths = struct.pack(f"<{count}I", *map(len, encoded))
        return _KIND_STR, lengths + b"".join(encoded)
    if only is datetime:
        distinct_times = {value for value in values if value is not None}
        if all(_is_aware(value) for value in distinct_times):  # type: ignore[arg-type]
            micros = {value: _micros(value - _EPOCH_UTC) for value in distinct_times}  # type: ignore[operator]
            packed = [micros[value] if value is not None else 0 for value in values]
            return _KIND_DATETIME_UTC, struct.pack(f"<{count}q", *packed)
    elif only is int or only is float or only is bool:
        filled = [filler if value is None else value for value in values] if has_nulls else values
        try:
            if only is int:
                return _KIND_INT, struct.pack(f"<{count}q", *filled)
            if only is float:
                return _KIND_FLOAT, struct.pack(f"<{count}d", *filled)
            return _KIND_BOOL, bytes(filled)  # type: ignore[arg-type]
        except (struct.error, OverflowError):
            pass  # an int beyond 64 bits: the tagged path names it
    return _KIND_MIXED, b"".join(map(_encode_tagged, values))


def _encode_tagged(value: object) -> bytes:
    if value is None:
        return bytes([_TAG_NONE])
    if isinstance(value, bool):
        return bytes([_TAG_TRUE if value else _TAG_FALSE])
    if isinstance(value, int):
        try:
            return _TAGGED_I64.pack(_TAG_INT, int(value))
        except struct.error as exc:
            raise SpoolCodecError(f"integer out of 64-bit range: {value}") from exc
    if isinstance(value, float):
        return _TAGGED_F64.pack(_TAG_FLOAT, float(value))
    if isinstance(value, str):
        data = str(value).encode("utf-8")
        return _TAGGED_U32.pack(_TAG_STR, len(data)) + data
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return _TAGGED_U32.pack(_TAG_BYTES, len(data)) + data
    if isinstance(value, datetime):
        if _is_aware(value):
            return _TAGGED_I64.pack(_TAG_DATETIME_UTC, _micros(value - _EPOCH_UTC))
        return _TAGGED_I64.pack(_TAG_DATETIME_NAIVE, _micros(value - _EPOCH_NAIVE))
    raise SpoolCodecError(f"cannot spool a value of type {type(value).__name__}")


def payload_row_count(payload: bytes | memoryview) -> int:
    """Rows in an encoded batch, after checking that the payload really holds that many.

    Walks the column headers and sizes without decoding values, so a header claiming more
    rows than its columns carry (a forged or damaged count) is refused here, before the
    count is trusted anywhere. Raises SpoolCodecError.
    """
    data = bytes(payload)
    _version, columns, count, pos = _payload_header(data)
    try:
        for _ in range(columns):
            pos = _skip_column(data, pos, count)
    except (IndexError, struct.error) as exc:
        raise SpoolCodecError(f"malformed payload: {exc}") from exc
    if pos != len(data):
        raise SpoolCodecError(
            f"payload of {len(data)} bytes does not hold {count} rows of {columns} columns"
        )
    return int(count)


def _payload_header(data: bytes) -> tuple[int, int, int, int]:
    """(codec version, columns, rows, offset of the first column) of an encoded batch."""
    if len(data) < _PAYLOAD_HEADER.size:
        raise SpoolCodecError("payload shorter than its header")
    version, columns, count = _PAYLOAD_HEADER.unpack_from(data, 0)
    if version == CODEC_VERSION:
        start = _PAYLOAD_HEADER.size + BATCH_ID_BYTES
        if len(data) < start:
            raise SpoolCodecError("payload shorter than its header")
    elif version == _CODEC_VERSION_WITHOUT_ID:
        start = _PAYLOAD_HEADER.size
    else:
        raise SpoolCodecError(f"unknown spool codec version {version}")
    if count > _MAX_ROWS_PER_BATCH:
        raise SpoolCodecError(f"implausible row count {count}")
    return int(version), int(columns), int(count), start


# Bytes per value of the fixed-width column kinds and value tags (the NULL flags come first).
_KIND_WIDTH = {_KIND_INT: 8, _KIND_FLOAT: 8, _KIND_DATETIME_UTC: 8, _KIND_BOOL: 1, _KIND_NULL: 0}
_TAG_WIDTH = {
    _TAG_NONE: 0,
    _TAG_FALSE: 0,
    _TAG_TRUE: 0,
    _TAG_INT: 8,
    _TAG_FLOAT: 8,
    _TAG_DATETIME_UTC: 8,
    _TAG_DATETIME_NAIVE: 8,
}


def _skip_column(data: bytes | memoryview, pos: int, count: int) -> int:
    """Where the column at ``pos`` ends, as :func:`_decode_column` would read it."""
    kind, has_nulls = _COLUMN_HEADER.unpack_from(data, pos)
    pos += _COLUMN_HEADER.size
    if has_nulls:
        pos += count
    width = _KIND_WIDTH.get(kind)
    if width is not None:
        pos += width * count
    elif kind == _KIND_STR:
        if pos + 4 * count > len(data):
            raise SpoolCodecError("string lengths run past the end of the payload")
        pos += 4 * count + sum(struct.unpack_from(f"<{count}I", data, pos))
    elif kind == _KIND_MIXED:
        for _ in range(count):
            if pos >= len(data):
                raise SpoolCodecError("values run past the end of the payload")
            tag = data[pos]
            pos += 1
            tag_width = _TAG_WIDTH.get(tag)
            if tag_width is not None:
                pos += tag_width
            elif tag in (_TAG_STR, _TAG_BYTES):
                (length,) = _U32.unpack_from(data, pos)
                pos += 4 + length
            else:
                raise SpoolCodecError(f"unknown value tag {tag} at byte {pos - 1}")
    else:
        raise SpoolCodecError(f"unknown column kind {kind} at byte {pos - 2}")
    if pos > len(data):
        raise SpoolCodecError("column runs past the end of the payload")
    return pos


def decode_rows(payload: bytes | memoryview) -> list[Row]:
    """Inverse of :func:`encode_rows`; raises SpoolCodecError on anything malformed."""
    return decode_batch(payload)[1]


def decode_batch(payload: bytes | memoryview) -> tuple[uuid.UUID, list[Row]]:
    """(batch id, rows) of an encoded batch; raises SpoolCodecError on anything malformed.

    A v2 batch has no id of its own: it gets one derived from its bytes (the same each time
    it is read).
    """
    data = bytes(payload)
    version, columns, count, pos = _payload_header(data)
    if version == CODEC_VERSION:
        batch_id = uuid.UUID(bytes=data[_PAYLOAD_HEADER.size : pos])
    else:
        batch_id = uuid.uuid5(_LEGACY_BATCH_NAMESPACE, hashlib.sha256(data).hexdigest())
    decoded: list[list[object]] = []
    try:
        for _ in range(columns):
            values, pos = _decode_column(data, pos, count)
            decoded.append(values)
    except (IndexError, struct.error, UnicodeDecodeError, OverflowError, ValueError) as exc:
        if isinstance(exc, SpoolCodecError):
            raise
        raise SpoolCodecError(f"malformed payload: {exc}") from exc
    if pos != len(data):
        raise SpoolCodecError(f"{len(data) - pos} trailing bytes after {count} rows")
    if not columns:
        return batch_id, [() for _ in range(count)]
    return batch_id, list(zip(*decoded, strict=True))


def _take_bytes(data: bytes, pos: int, size: int) -> bytes:
    if pos + size > len(data):
        raise SpoolCodecError("column runs past the end of the payload")
    return data[pos : pos + size]


def _decode_column(data: bytes, pos: int, count: int) -> tuple[list[object], int]:
    kind, has_nulls = _COLUMN_HEADER.unpack_from(data, pos)
    pos += _COLUMN_HEADER.size
    nulls = b""
    if has_nulls:
        nulls = _take_bytes(data, pos, count)
        pos += count
    values: list[object]
    if kind == _KIND_INT:
        values = list(struct.unpack_from(f"<{count}q", data, pos))
        pos += 8 * count
    elif kind == _KIND_FLOAT:
        values = list(struct.unpack_from(f"<{count}d", data, pos))
        pos += 8 * count
    elif kind == _KIND_BOOL:
        values = list(map(bool, _take_bytes(data, pos, count)))
        pos += count
    elif kind == _KIND_STR:
        lengths = struct.unpack_from(f"<{count}I", data, pos)
        pos += 4 * count
        if pos + sum(lengths) > len(data):
            raise SpoolCodecError("strings run past the end of the payload")
        cache: dict[bytes, str] = {}
        values = []
        for length in lengths:
            chunk = data[pos : pos + length]
            pos += length
            text = cache.get(chunk)
            if text is None:
                text = cache[chunk] = chunk.decode("utf-8")
            values.append(text)
    elif kind == _KIND_DATETIME_UTC:
        micros = struct.unpack_from(f"<{count}q", data, pos)
        pos += 8 * count
        times = {m: _EPOCH_UTC + timedelta(microseconds=m) for m in set(micros)}
        values = [times[m] for m in micros]
    elif kind == _KIND_NULL:
        values = [None] * count
    elif kind == _KIND_MIXED:
        values = []
        for _ in range(count):
            value, pos = _decode_tagged(data, pos)
            values.append(value)
    else:
        raise SpoolCodecError(f"unknown column kind {kind} at byte {pos - 2}")
    if has_nulls:
        values = [None if null else value for value, null in zip(values, nulls, strict=True)]
    return values, pos


def _decode_tagged(data: bytes, pos: int) -> tuple[object, int]:
    tag = data[pos]
    pos += 1
    if tag == _TAG_NONE:
        return None, pos
    if tag == _TAG_FALSE:
        return False, pos
    if tag == _TAG_TRUE:
        return True, pos
    if tag == _TAG_INT:
        return _I64.unpack_from(data, pos)[0], pos + 8
    if tag == _TAG_FLOAT:
        return _F64.unpack_from(data, pos)[0], pos + 8
    if tag in (_TAG_STR, _TAG_BYTES):
        (length,) = _U32.unpack_from(data, pos)
        chunk = _take_bytes(data, pos + 4, length)
        return (chunk.decode("utf-8") if tag == _TAG_STR else chunk), pos + 4 + length
    if tag in (_TAG_DATETIME_UTC, _TAG_DATETIME_NAIVE):
        (micros,) = _I64.unpack_from(data, pos)
        epoch = _EPOCH_UTC if tag == _TAG_DATETIME_UTC else _EPOCH_NAIVE
        return epoch + timedelta(microseconds=micros), pos + 8
    raise SpoolCodecError(f"unknown value tag {tag} at byte {pos - 1}")


# -- segments and records ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """One stored batch, as handed out by :meth:`Spool.peek` / :meth:`Spool.replay`."""

    segment: int
    offset: int  # of the record header in the segment file
    end_offset: int
    rows: tuple[Row, ...]
    batch_id: uuid.UUID  # stored with the batch: the same at every replay


class SpoolLoss(StrEnum):
    """Why a stored record was lost: the keys of :attr:`SpoolStats.lost_records`."""

    # The segment ends in a record that is cut short or unreadable with no valid record after
    # it (a crash mid-write): truncated.
    TORN_TAIL = "torn_tail"
    # No record magic, a wrong header checksum or an absurd size, with valid records after it.
    BAD_HEADER = "bad_header"
    CHECKSUM_MISMATCH = "checksum_mismatch"  # the payload's CRC-32 does not match
    # The checksums match but the payload cannot hold what its header claims (a forged row
    # count, an unknown codec version).
    MALFORMED_PAYLOAD = "malformed_payload"
    UNDECODABLE = "undecodable"  # passed the checks at open, failed to decode on replay


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """What a spool holds and what it lost since it was opened."""

    rows: int  # stored, not yet acknowledged
    batches: int
    bytes: int  # disk space of the segment files
    discarded_rows: int  # rows of undecodable batches dropped on replay
    # SpoolLoss value -> records lost (every reason present, 0 when none). Records, not rows:
    # the row count of a corrupt record cannot be trusted.
    lost_records: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class _Record:
    segment: int
    offset: int  # of the record header
    header_bytes: int  # depends on the segment's format version
    length: int  # payload bytes
    row_count: int

    @property
    def payload_offset(self) -> int:
        return self.offset + self.header_bytes

    @property
    def end_offset(self) -> int:
        return self.offset + self.header_bytes + self.length


@dataclass(frozen=True, slots=True)
class _Framed:
    """A record whose header and payload checksum are intact."""

    header_bytes: int
    length: int


@dataclass(frozen=True, slots=True)
class _Damage:
    reason: SpoolLoss
    detail: str
    # The payload length the header claims, when the header itself can be trusted (format 2:
    # magic and header checksum match; format 1: always a guess, checked by the next record).
    claimed_length: int | None


def _frame_at(data: bytes, pos: int, version: int) -> _Framed | _Damage:
    """Check the record framing at ``pos`` (header, size bounds, payload checksum)."""
    end = len(data)
    view = memoryview(data)
    if version == _LEGACY_FORMAT_VERSION:
        header_bytes = _LEGACY_RECORD_HEADER.size
        if pos + header_bytes > end:
            return _Damage(SpoolLoss.TORN_TAIL, "torn record header", None)
        length, checksum = _LEGACY_RECORD_HEADER.unpack_from(data, pos)
    else:
        header_bytes = _RECORD_HEADER.size
        if pos + header_bytes > end:
            return _Damage(SpoolLoss.TORN_TAIL, "torn record header", None)
        magic, length, checksum, header_checksum = _RECORD_HEADER.unpack_from(data, pos)
        if magic != RECORD_MAGIC:
            return _Damage(SpoolLoss.BAD_HEADER, "no record magic", None)
        if zlib.crc32(view[pos : pos + _RECORD_HEADER_CHECKED.size]) != header_checksum:
            return _Damage(SpoolLoss.BAD_HEADER, "record header checksum mismatch", None)
    if not _PAYLOAD_HEADER.size <= length <= _MAX_RECORD_BYTES:
        return _Damage(SpoolLoss.BAD_HEADER, f"implausible record size {length}", None)
    body = pos + header_bytes
    if body + length > end:
        return _Damage(SpoolLoss.TORN_TAIL, "torn record", length)
    if zlib.crc32(view[body : body + length]) != checksum:
        return _Damage(SpoolLoss.CHECKSUM_MISMATCH, "checksum mismatch", length)
    return _Framed(header_bytes, length)


def _next_frame(data: bytes, pos: int, version: int, damage: _Damage) -> int | None:
    """Offset of the first intact record after the damaged one at ``pos``, or None."""
    header_bytes = (
        _LEGACY_RECORD_HEADER.size if version == _LEGACY_FORMAT_VERSION else _RECORD_HEADER.size
    )
    if damage.claimed_length is not None:
        # Damage inside the payload (the usual bit flip): the next record is where the
        # header says, and finding it there rules out a false match inside this payload.
        candidate = pos + header_bytes + damage.claimed_length
        if candidate < len(data) and isinstance(_frame_at(data, candidate, version), _Framed):
            return candidate
    if version == _LEGACY_FORMAT_VERSION:
        return None  # no magic to search for
    candidate = data.find(RECORD_MAGIC, pos + 1)
    while candidate != -1:
        if isinstance(_frame_at(data, candidate, version), _Framed):
            return candidate
        candidate = data.find(RECORD_MAGIC, candidate + 1)
    return None


def _segment_name(sequence: int) -> str:
    return f"{sequence:020d}{SEGMENT_SUFFIX}"


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Spool:
    """Append-only batches on disk, replayed oldest first, deleted once acknowledged.

    ``max_bytes`` caps the disk space of the segment files: an append that would pass it
    raises :class:`SpoolFullError` and stores nothing (the caller counts the drop). A new
    ``Spool`` on the same directory (after a restart or a crash) sees every batch that was
    appended and not yet acked. Acks are durable too, so a batch acked before a crash is not
    replayed after it; a batch written to the database but not yet acked when the process
    died is replayed again, under the same batch id (the writer's ingest ledger skips it).
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int | None = None,
    ) -> None:
        if max_bytes <= _SEGMENT_HEADER.size + _RECORD_HEADER.size:
            raise ValueError(f"max_bytes too small: {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # Segments are deleted whole, so smaller ones give disk space back sooner while
        # a long backlog drains.
        self.segment_bytes = segment_bytes or max(min(max_bytes // 8, 64 * MiB), 64 * 1024)
        self._lock = threading.Lock()
        self._records: deque[_Record] = deque()
        self._segment_sizes: dict[int, int] = {}
        self._bytes = 0  # sum of _segment_sizes, readable from any thread without the lock
        self._rows = 0
        self._active_segment: int | None = None
        self._active_fd: int | None = None
        self._next_segment = 1
        self._closed = False
        # Rows of CRC-valid batches that could not be decoded, discarded by peek().
        self.discarded_rows = 0
        self._lost: dict[SpoolLoss, int] = dict.fromkeys(SpoolLoss, 0)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SpoolLockedError(f"spool directory {self.directory} is in use") from exc
            raise
        try:
            self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- state -----------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """Rows stored and not yet acknowledged."""
        return self._rows

    @property
    def batches(self) -> int:
        return len(self._records)

    @property
    def bytes(self) -> int:
        """Disk space of the segment files (acked records count until their segment goes)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._records)

    def stats(self) -> SpoolStats:
        """Counts for metrics; lock-free (an append holds the lock through its fsync)."""
        return SpoolStats(
            rows=self._rows,
            batches=len(self._records),
            bytes=self._bytes,
            discarded_rows=self.discarded_rows,
            lost_records={reason.value: count for reason, count in self._lost.items()},
        )

    # -- opening ---------------------------------------------------------------------------

    def _segment_path(self, sequence: int) -> Path:
        return self.directory / _segment_name(sequence)

    @property
    def _cursor_path(self) -> Path:
        return self.directory / "cursor"

    def _read_cursor(self) -> tuple[int, int] | None:
        try:
            raw = json.loads(self._cursor_path.read_text(encoding="utf-8"))
            return int(raw["segment"]), int(raw["offset"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("spool %s: ignoring unreadable cursor file: %s", self.directory, exc)
            return None

    def _write_cursor(self, segment: int, offset: int) -> None:
        temporary = self.directory / "cursor.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, json.dumps({"segment": segment, "offset": offset}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self._cursor_path)

    def _load(self) -> None:
        sequences: list[int] = []
        for path in self.directory.glob("*" + SEGMENT_SUFFIX):
            stem = path.name[: -len(SEGMENT_SUFFIX)]
            if stem.isdigit():
                sequences.append(int(stem))
        sequences.sort()
        cursor = self._read_cursor()
        if cursor is not None and cursor[0] not in sequences:
            # Its segment was deleted after being fully acked; start at the oldest left.
            cursor = None
        highest = max([*sequences, cursor[0] if cursor else 0], default=0)
        self._next_segment = highest + 1
        versions: dict[int, int | None] = {}
        for sequence in sequences:
            if cursor is not None and sequence < cursor[0]:
                # Fully acked before a crash, not yet deleted.
                self._delete_segment(sequence)
                continue
            skip_before = cursor[1] if cursor is not None and sequence == cursor[0] else 0
            versions[sequence] = self._scan_segment(sequence, skip_before)
        if sequences and self._segment_sizes:
            last = max(self._segment_sizes)
            # Appends go on in the newest segment only if it has room and is in the format
            # written today (records of two formats never share a segment).
            if (
                self._segment_sizes[last] < self.segment_bytes
                and versions.get(last) == SEGMENT_FORMAT_VERSION
            ):
                self._active_segment = last
                self._active_fd = os.open(self._segment_path(last), os.O_WRONLY | os.O_APPEND)
        # Segments with nothing left to replay (except the one still being appended to).
        pending = {record.segment for record in self._records}
        for sequence in list(self._segment_sizes):
            if sequence not in pending and sequence != self._active_segment:
                self._delete_segment(sequence)
        if not self._records:
            self._reset_empty()
        if self._rows:
            logger.info(
                "spool %s: %d rows in %d batches waiting to be replayed",
                self.directory,
                self._rows,
                len(self._records),
            )

    def _scan_segment(self, sequence: int, skip_before: int) -> int | None:
        """Index the records of one segment; its format version, or None if it is gone."""
        path = self._segment_path(sequence)
        data = path.read_bytes()
        header_size = _SEGMENT_HEADER.size
        if len(data) < header_size:
            # Crashed while creating it: nothing was ever stored in it.
            logger.warning("spool %s: removing incomplete segment %s", self.directory, path.name)
            path.unlink()
            return None
        magic, version = _SEGMENT_HEADER.unpack_from(data, 0)
        if magic != SEGMENT_MAGIC or version not in _READABLE_FORMAT_VERSIONS:
            quarantined = path.with_name(path.name + ".unreadable")
            logger.error(
                "spool %s: %s is not a pluginmon spool segment (version %s); moved to %s",
                self.directory,
                path.name,
                version,
                quarantined.name,
            )
            path.rename(quarantined)
            return None
        pos = header_size
        end = len(data)
        while pos < end:
            frame = _frame_at(data, pos, version)
            if isinstance(frame, _Framed):
                next_pos = pos + frame.header_bytes + frame.length
                try:
                    row_count = payload_row_count(
                        memoryview(data)[pos + frame.header_bytes : next_pos]
                    )
                except SpoolCodecError as exc:
                    # Framed and checksummed, so only this record is in doubt.
                    self._lose(
                        path, pos, next_pos, skip_before, SpoolLoss.MALFORMED_PAYLOAD, str(exc)
                    )
                else:
                    if pos >= skip_before:
                        self._records.append(
                            _Record(sequence, pos, frame.header_bytes, frame.length, row_count)
                        )
                        self._rows += row_count
                pos = next_pos
                continue
            resume = _next_frame(data, pos, version, frame)
            if resume is None:
                self._lose(path, pos, end, skip_before, SpoolLoss.TORN_TAIL, frame.detail)
                with path.open("r+b") as handle:
                    handle.truncate(pos)
                    handle.flush()
                    os.fsync(handle.fileno())
                break
            # A header claiming more bytes than there are, with a valid record inside them,
            # is a damaged header, not a crash.
            reason = SpoolLoss.BAD_HEADER if frame.reason is SpoolLoss.TORN_TAIL else frame.reason
            self._lose(path, pos, resume, skip_before, reason, frame.detail)
            pos = resume
        self._set_segment_size(sequence, pos)
        return int(version)

    def _lose(
        self, path: Path, start: int, stop: int, skip_before: int, reason: SpoolLoss, detail: str
    ) -> None:
        """Count and log the damaged bytes [start, stop) of a segment as one lost record."""
        if stop <= skip_before:
            # Inside records acknowledged before: nothing pending was lost.
            logger.debug("spool %s: damage in acked part of %s", self.directory, path.name)
            return
        self._lost[reason] += 1
        action = "truncating" if reason is SpoolLoss.TORN_TAIL else "skipping"
        logger.warning(
            "spool %s: lost a record in %s at byte %d (%s: %s); %s %d bytes",
            self.directory,
            path.name,
            start,
            reason.value,
            detail,
            action,
            stop - start,
        )

    # -- appending -------------------------------------------------------------------------

    def append(
        self, rows: Sequence[Row], *, batch_id: uuid.UUID | None = None
    ) -> SpooledBatch | None:
        """Store one batch durably (fsync'ed) or raise; an empty batch is a no-op (None).

        The batch is stored with ``batch_id`` (a new random id when None). Returns its
        handle for :meth:`ack`, with empty ``rows`` (the caller holds them; a handle kept
        until the ack should not keep them in memory too).
        Raises SpoolFullError at the size cap, SpoolCodecError for a value the codec does
        not carry, OSError when the disk refuses; in every case nothing was stored.
        """
        handles = self.append_many([(rows, batch_id)])
        return handles[0] if handles else None

    def append_many(
        self, batches: Sequence[tuple[Sequence[Row], uuid.UUID | None]]
    ) -> list[SpooledBatch]:
        """Store several batches (rows, batch id or None) with one write and one fsync: all
        of them or none; empty batches are skipped.

        Returns their handles for :meth:`ack`, in order (``rows`` empty, as from
        :meth:`append`). Raises like :meth:`append`, and then nothing was stored.
        """
        named = [(rows, batch_id or uuid.uuid4()) for rows, batch_id in batches if rows]
        if not named:
            return []
        records: list[tuple[bytes, int]] = []  # (record, payload length)
        for rows, batch_id in named:
            payload = encode_rows(rows, batch_id=batch_id)
            head = _RECORD_HEADER_CHECKED.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload))
            records.append((head + _U32.pack(zlib.crc32(head)) + payload, len(payload)))
        data = b"".join(record for record, _ in records)
        with self._lock:
            self._check_open()
            new_segment = (
                self._active_segment is None
                or self._segment_sizes[self._active_segment] + len(data) > self.segment_bytes
            )
            needed = len(data) + (_SEGMENT_HEADER.size if new_segment else 0)
            used = self.bytes
            if used + needed > self.max_bytes:
                what = (
                    f"a batch of {len(named[0][0])} rows"
                    if len(named) == 1
                    else f"{len(named)} batches of {sum(len(r) for r, _ in named)} rows"
                )
                raise SpoolFullError(
                    f"spool {self.directory} is at its cap: {used} of {self.max_bytes} bytes "
                    f"used, {what} needs {needed} more"
                )
            if new_segment:
                self._open_new_segment()
            assert self._active_fd is not None
            assert self._active_segment is not None
            sequence = self._active_segment
            offset = self._segment_sizes[sequence]
            try:
                _write_all(self._active_fd, data)
                os.fsync(self._active_fd)
            except OSError:
                # Leave no partial record behind for the next append to follow.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._active_fd, offset)
                raise
            self._set_segment_size(sequence, offset + len(data))
            handles: list[SpooledBatch] = []
            for (rows, batch_id), (_, length) in zip(named, records, strict=True):
                stored = _Record(sequence, offset, _RECORD_HEADER.size, length, len(rows))
                self._records.append(stored)
                self._rows += len(rows)
                handles.append(
                    SpooledBatch(
                        segment=sequence,
                        offset=offset,
                        end_offset=stored.end_offset,
                        rows=(),
                        batch_id=batch_id,
                    )
                )
                offset = stored.end_offset
        return handles

    def _open_new_segment(self) -> None:
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        sequence = self._next_segment
        self._next_segment += 1
        path = self._segment_path(sequence)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            _write_all(fd, _SEGMENT_HEADER.pack(SEGMENT_MAGIC, SEGMENT_FORMAT_VERSION))
            os.fsync(fd)
            _fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._active_fd = fd
        self._active_segment = sequence
        self._set_segment_size(sequence, _SEGMENT_HEADER.size)

    # -- replaying -------------------------------------------------------------------------

    def _read(self, record: _Record) -> SpooledBatch:
        with self._segment_path(record.segment).open("rb") as handle:
            handle.seek(record.payload_offset)
            payload = handle.read(record.length)
        if len(payload) != record.length:
            raise SpoolCodecError(f"segment {record.segment} shorter than its index")
        batch_id, rows = decode_batch(payload)
        return SpooledBatch(
            segment=record.segment,
            offset=record.offset,
            end_offset=record.end_offset,
            rows=tuple(rows),
            batch_id=batch_id,
        )

    def peek(self) -> SpooledBatch | None:
        """The oldest batch not yet acked, or None when the spool is empty.

        A batch whose checksum matched but whose payload does not decode (written by a
        newer pluginmon, say) is logged, discarded and counted in ``discarded_rows``.
        """
        with self._lock:
            self._check_open()
            while self._records:
                record = self._records[0]
                try:
                    return self._read(record)
                except SpoolCodecError as exc:
                    logger.error(
                        "spool %s: discarding undecodable batch of %d rows in segment %d: %s",
                        self.directory,
                        record.row_count,
                        record.segment,
                        exc,
                    )
                    self.discarded_rows += record.row_count
                    self._lost[SpoolLoss.UNDECODABLE] += 1
                    self._ack_head_locked()
            return None

    def replay(self) -> Iterator[SpooledBatch]:
        """Batches oldest first, from the oldest not yet acked.

        Nothing is deleted while iterating: ack each batch once it is safely written, in
        order. Batches appended during the iteration are yielded too. An undecodable batch
        is logged and skipped here (``peek`` discards it once it is the oldest).
        """
        last: tuple[int, int] | None = None
        while True:
            with self._lock:
                self._check_open()
                record = next(
                    (r for r in self._records if last is None or (r.segment, r.offset) > last),
                    None,
                )
            if record is None:
                return
            last = (record.segment, record.offset)
            try:
                batch = self._read(record)
            except SpoolCodecError as exc:
                logger.error(
                    "spool %s: skipping undecodable batch in segment %d: %s",
                    self.directory,
                    record.segment,
                    exc,
                )
                continue
            yield batch

    def ack(self, batch: SpooledBatch) -> None:
        """Forget ``batch`` (it was written); acks must come in order, oldest first."""
        with self._lock:
            self._check_open()
            if not self._records:
                raise ValueError("ack on an empty spool")
            head = self._records[0]
            if (head.segment, head.offset) != (batch.segment, batch.offset):
                raise ValueError(
                    f"acks must be in order: oldest is segment {head.segment} byte "
                    f"{head.offset}, got segment {batch.segment} byte {batch.offset}"
                )
            self._ack_head_locked()

    def ack_many(self, batches: Sequence[SpooledBatch]) -> None:
        """:meth:`ack` for several batches, oldest first, with one cursor write.

        Raises ValueError (and acks none of them) unless they are the oldest batches, in
        order.
        """
        if not batches:
            return
        with self._lock:
            self._check_open()
            if len(batches) > len(self._records):
                raise ValueError(f"ack of {len(batches)} batches, {len(self._records)} stored")
            for record, batch in zip(self._records, batches, strict=False):
                if (record.segment, record.offset) != (batch.segment, batch.offset):
                    raise ValueError(
                        f"acks must be in order: next is segment {record.segment} byte "
                        f"{record.offset}, got segment {batch.segment} byte {batch.offset}"
                    )
            done: list[_Record] = [self._records.popleft() for _ in batches]
            self._rows -= sum(record.row_count for record in done)
            if not self._records:
                self._reset_empty()
                return
            head_segment = self._records[0].segment
            for sequence in sorted({record.segment for record in done}):
                # Segments left behind (and no longer appended to) are done.
                if sequence != head_segment and sequence != self._active_segment:
                    self._delete_segment(sequence)
            last = done[-1]
            if last.segment == head_segment:
                self._write_cursor(last.segment, last.end_offset)

    def _ack_head_locked(self) -> None:
        head = self._records.popleft()
        self._rows -= head.row_count
        if not self._records:
            self._reset_empty()
            return
        if self._records[0].segment != head.segment:
            # That segment is done (and no longer the one being appended to).
            if head.segment != self._active_segment:
                self._delete_segment(head.segment)
            return
        self._write_cursor(head.segment, head.end_offset)

    def _reset_empty(self) -> None:
        """Nothing left to replay: delete every segment and the cursor."""
        if self._active_fd is not None:
            os.close(self._active_fd)
            self._active_fd = None
        self._active_segment = None
        for sequence in list(self._segment_sizes):
            self._delete_segment(sequence)
        with contextlib.suppress(FileNotFoundError):
            self._cursor_path.unlink()
        self._rows = 0

    def _delete_segment(self, sequence: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._segment_path(sequence).unlink()
        self._bytes -= self._segment_sizes.pop(sequence, 0)

    def _set_segment_size(self, sequence: int, size: int) -> None:
        self._bytes += size - self._segment_sizes.get(sequence, 0)
        self._segment_sizes[sequence] = size

    # -- closing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.directory} is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._active_fd is not None:
                os.close(self._active_fd)
                self._active_fd = None
            os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
