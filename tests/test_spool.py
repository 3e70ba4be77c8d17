"""The disk spool on a real directory: codec, order, durability across reopen, torn tails, cap."""

from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pluginmon.storage.drops import SpoolLosses
from pluginmon.storage.spool import (
    RECORD_HEADER_BYTES,
    RECORD_MAGIC,
    Spool,
    SpoolCodecError,
    SpoolFullError,
    SpoolLockedError,
    SpoolLoss,
    decode_rows,
    encode_rows,
    payload_row_count,
)

Row = tuple[object, ...]


def batch(start: int, count: int) -> list[Row]:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    return [
        (base + timedelta(seconds=i), "acme", i, f"host-{i % 3}", i * 0.5, None, i % 2 == 0)
        for i in range(start, start + count)
    ]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def drain(spool: Spool) -> list[Row]:
    rows: list[Row] = []
    while (item := spool.peek()) is not None:
        rows.extend(item.rows)
        spool.ack(item)
    return rows


def test_codec_round_trips_every_supported_type() -> None:
    aware = datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=timezone(timedelta(hours=2)))
    rows: list[Row] = [
        (None, True, False, 0, -1, 2**63 - 1, -(2**63), 1.5, -0.0, math.inf),
        ("", "päckchen ✓", b"\x00\xff", bytearray(b"ab"), aware, datetime(1969, 12, 31, 23, 59)),
    ]
    rows = [tuple(r) + (None,) * (10 - len(r)) for r in rows]
    decoded = decode_rows(encode_rows(rows))
    assert decoded[0] == rows[0]
    assert decoded[1][:4] == ("", "päckchen ✓", b"\x00\xff", b"ab")
    # Aware datetimes come back as the same instant in UTC; naive ones stay naive.
    assert decoded[1][4] == aware
    assert isinstance(decoded[1][4], datetime)
    assert decoded[1][4].tzinfo is UTC
    assert decoded[1][5] == datetime(1969, 12, 31, 23, 59)
    assert isinstance(decoded[1][5], datetime)
    assert decoded[1][5].tzinfo is None
    assert type(decoded[0][1]) is bool
    assert type(decoded[0][3]) is int
    assert math.isnan(decode_rows(encode_rows([(math.nan,)]))[0][0])  # type: ignore[arg-type]


def test_codec_keeps_types_and_nulls_in_every_column_layout() -> None:
    class Level(IntEnum):
        LOW = 1

    naive = datetime(2026, 5, 6, 7, 8, 9)
    aware = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    rows: list[Row] = [
        # int, float, bool, str, aware, naive, all-NULL, int/float mix, enum, bytes
        (1, 0.5, True, "a", aware, naive, None, 1, Level.LOW, b"x"),
        (None, None, None, None, None, None, None, 2.5, 3, None),
        (-(2**63), -1e300, False, "ü" * 300, aware + timedelta(days=1), naive, None, None, 4, b""),
    ]
    decoded = decode_rows(encode_rows(rows))
    assert decoded == rows
    for original, back in zip(rows, decoded, strict=True):
        for before, after in zip(original, back, strict=True):
            if isinstance(before, IntEnum):
                assert type(after) is int
            elif isinstance(before, bytes):
                assert type(after) is bytes
            else:
                assert type(after) is type(before)
    assert decode_rows(encode_rows([(), ()])) == [(), ()]
    assert decode_rows(encode_rows([])) == []


def test_codec_refuses_what_it_cannot_carry(tmp_path: Path) -> None:
    with pytest.raises(SpoolCodecError, match="64-bit"):
        encode_rows([(2**64,)])
    with pytest.raises(SpoolCodecError, match="type object"):
        encode_rows([(object(),)])
    with pytest.raises(SpoolCodecError, match="expected 2"):
        encode_rows([(1, 2), (3,)])
    with pytest.raises(SpoolCodecError, match="codec version"):
        decode_rows(b"\x09" + encode_rows([(1,)])[1:])
    with pytest.raises(SpoolCodecError, match=r"malformed|trailing|past the end"):
        decode_rows(encode_rows([("abc",)])[:-2])
    with Spool(tmp_path / "spool") as spool:
        with pytest.raises(SpoolCodecError):
            spool.append([(object(),)])
        assert spool.rows == 0
        assert segment_files(tmp_path / "spool") == []


def test_replay_is_oldest_first_across_segments_and_acks_delete_segments(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory, segment_bytes=4096) as spool:
        for start in range(0, 1000, 50):
            spool.append(batch(start, 50))
        assert spool.rows == 1000
        assert spool.batches == 20
        assert len(segment_files(directory)) > 2
        replayed = [row for item in spool.replay() for row in item.rows]
        assert [row[2] for row in replayed] == list(range(1000))
        # replay() does not consume.
        assert spool.rows == 1000

        first_segments = len(segment_files(directory))
        rows = drain(spool)
        assert [row[2] for row in rows] == list(range(1000))
        assert rows == batch(0, 1000)
        assert spool.rows == 0
        assert spool.bytes == 0
        assert first_segments > 0
        assert segment_files(directory) == []
        assert not (directory / "cursor").exists()

        # Usable again after draining.
        spool.append(batch(5, 2))
        assert drain(spool) == batch(5, 2)


def test_acks_must_come_in_order(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool") as spool:
        spool.append(batch(0, 2))
        spool.append(batch(2, 2))
        items = list(spool.replay())
        with pytest.raises(ValueError, match="in order"):
            spool.ack(items[1])
        spool.ack(items[0])
        spool.ack(items[1])
        with pytest.raises(ValueError, match="empty"):
            spool.ack(items[1])


def test_a_new_spool_on_the_directory_sees_unacked_batches_only(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory, segment_bytes=2048) as spool:
        for start in range(0, 300, 30):
            spool.append(batch(start, 30))
        # Ack the first four batches, then "restart".
        for _ in range(4):
            item = spool.peek()
            assert item is not None
            spool.ack(item)
        assert spool.rows == 180

    with Spool(directory, segment_bytes=2048) as reopened:
        assert reopened.rows == 180
        assert reopened.batches == 6
        reopened.append(batch(300, 10))
        rows = drain(reopened)
    assert [row[2] for row in rows] == list(range(120, 310))


def test_the_directory_is_locked_by_one_spool(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    first = Spool(directory)
    with pytest.raises(SpoolLockedError, match="in use"):
        Spool(directory)
    first.close()
    Spool(directory).close()


def lost(spool: Spool) -> dict[str, int]:
    """The spool's lost-record counters that are not zero."""
    return {reason: count for reason, count in spool.stats().lost_records.items() if count}


def three_records(directory: Path, middle: list[Row] | None = None) -> tuple[Path, list[int]]:
    """A closed spool with batches 0-9, ``middle`` (default 10-19) and 20-29 in one segment;
    the segment and the offset of each record."""
    with Spool(directory) as spool:
        for rows in (batch(0, 10), middle or batch(10, 10), batch(20, 10)):
            spool.append(rows)
        offsets = [item.offset for item in spool.replay()]
    (segment,) = segment_files(directory)
    return segment, offsets


def forge(data: bytearray, offset: int, payload: bytes) -> bytes:
    """Replace the record at ``offset`` by one carrying ``payload`` with valid checksums, as
    someone who knows the format would write it."""
    (length,) = struct.unpack_from("<I", data, offset + 4)
    head = struct.pack("<4sII", RECORD_MAGIC, len(payload), zlib.crc32(payload))
    record = head + struct.pack("<I", zlib.crc32(head)) + payload
    end = offset + RECORD_HEADER_BYTES + length
    return bytes(data[:offset]) + record + bytes(data[end:])


def test_torn_tail_is_truncated_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        for start in (0, 10, 20):
            spool.append(batch(start, 10))
    (segment,) = segment_files(directory)
    intact_size = segment.stat().st_size
    # A crash in the middle of writing the third record: cut it short.
    os.truncate(segment, intact_size - 7)

    with (
        caplog.at_level(logging.WARNING, logger="pluginmon.storage.spool"),
        Spool(directory) as reopened,
    ):
        assert reopened.rows == 20
        assert "torn record" in caplog.text
        assert "truncating" in caplog.text
        assert lost(reopened) == {"torn_tail": 1}
        truncated_size = segment.stat().st_size
        assert truncated_size < intact_size - 7
        # Appends continue cleanly after the truncation point.
        reopened.append(batch(100, 5))
        rows = drain(reopened)
    assert [row[2] for row in rows] == [*range(20), *range(100, 105)]
    # The truncation is durable: nothing is found or counted again.
    with Spool(directory) as again:
        assert again.rows == 0
        assert lost(again) == {}


# Where in the middle record one byte is flipped, and how the loss is counted.
CORRUPTIONS = {
    "payload byte": (RECORD_HEADER_BYTES + 20, SpoolLoss.CHECKSUM_MISMATCH),
    "record magic": (0, SpoolLoss.BAD_HEADER),
    "length field": (5, SpoolLoss.BAD_HEADER),
    # The header checksum covers the payload checksum too.
    "payload checksum": (9, SpoolLoss.BAD_HEADER),
    "header checksum": (13, SpoolLoss.BAD_HEADER),
}


@pytest.mark.parametrize("where", CORRUPTIONS)
def test_a_corrupt_middle_record_loses_only_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    directory = tmp_path / "spool"
    segment, offsets = three_records(directory)
    data = bytearray(segment.read_bytes())
    at, reason = CORRUPTIONS[where]
    data[offsets[1] + at] ^= 0xFF
    segment.write_bytes(bytes(data))

    with (
        caplog.at_level(logging.WARNING, logger="pluginmon.storage.spool"),
        Spool(directory) as reopened,
    ):
        assert reopened.rows == 20
        assert lost(reopened) == {reason.value: 1}
        assert f"lost a record in {segment.name} at byte {offsets[1]}" in caplog.text
        assert drain(reopened) == batch(0, 10) + batch(20, 10)
        assert reopened.stats().discarded_rows == 0


def test_resync_rejects_the_magic_inside_a_payload(tmp_path: Path) -> None:
    """The middle batch carries the record magic and a would-be header in a bytes value;
    with its real header destroyed, the scan passes over that false match (its header
    checksum is wrong) and resumes at the third record."""
    fake_header = RECORD_MAGIC + struct.pack("<III", 40, 0, 0)
    middle: list[Row] = [(i, fake_header * 3) for i in range(10)]
    directory = tmp_path / "spool"
    segment, offsets = three_records(directory, middle)
    data = bytearray(segment.read_bytes())
    assert data.count(RECORD_MAGIC) == 3 + 30
    data[offsets[1] : offsets[1] + RECORD_HEADER_BYTES] = bytes(RECORD_HEADER_BYTES)
    segment.write_bytes(bytes(data))
    with Spool(directory) as reopened:
        assert lost(reopened) == {"bad_header": 1}
        assert drain(reopened) == batch(0, 10) + batch(20, 10)


def test_a_forged_row_count_is_one_lost_record_not_four_billion_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    segment, offsets = three_records(directory)
    payload = bytearray(encode_rows(batch(10, 10)))
    struct.pack_into("<I", payload, 3, 0xFFFFFFFF)  # u8 version, u16 columns, u32 rows
    segment.write_bytes(forge(bytearray(segment.read_bytes()), offsets[1], bytes(payload)))

    with (
        caplog.at_level(logging.WARNING, logger="pluginmon.storage.spool"),
        Spool(directory) as reopened,
    ):
        stats = reopened.stats()
        assert (stats.rows, stats.batches, stats.discarded_rows) == (20, 2, 0)
        assert lost(reopened) == {"malformed_payload": 1}
        assert "implausible row count 4294967295" in caplog.text
        assert drain(reopened) == batch(0, 10) + batch(20, 10)
        assert reopened.stats().discarded_rows == 0


def test_a_row_count_its_payload_cannot_hold_is_refused(tmp_path: Path) -> None:
    """Plausible but wrong: 11 rows claimed, 10 encoded. Caught at open by the layout walk,
    so the count never reaches the rows gauge or a drop counter."""
    payload = bytearray(encode_rows(batch(10, 10)))
    struct.pack_into("<I", payload, 3, 11)
    assert payload_row_count(encode_rows(batch(10, 10))) == 10
    with pytest.raises(SpoolCodecError):  # which check trips depends on where the walk drifts
        payload_row_count(bytes(payload))
    directory = tmp_path / "spool"
    segment, offsets = three_records(directory)
    segment.write_bytes(forge(bytearray(segment.read_bytes()), offsets[1], bytes(payload)))
    with Spool(directory) as reopened:
        assert reopened.rows == 20
        assert lost(reopened) == {"malformed_payload": 1}
        assert drain(reopened) == batch(0, 10) + batch(20, 10)


def test_a_header_claiming_an_absurd_size_is_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    segment, offsets = three_records(directory)
    data = bytearray(segment.read_bytes())
    # 4 GiB claimed, with a header checksum that matches the forged header.
    head = struct.pack("<4sII", RECORD_MAGIC, 0xFFFFFFF0, 0)
    data[offsets[1] : offsets[1] + RECORD_HEADER_BYTES] = head + struct.pack("<I", zlib.crc32(head))
    segment.write_bytes(bytes(data))
    with Spool(directory) as reopened:
        assert lost(reopened) == {"bad_header": 1}
        assert drain(reopened) == batch(0, 10) + batch(20, 10)


def test_damage_in_acknowledged_records_is_not_counted(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        for start in (0, 10, 20):
            spool.append(batch(start, 10))
        first = spool.peek()
        assert first is not None
        spool.ack(first)
    (segment,) = segment_files(directory)
    data = bytearray(segment.read_bytes())
    data[first.offset + RECORD_HEADER_BYTES + 20] ^= 0xFF
    segment.write_bytes(bytes(data))
    with Spool(directory) as reopened:
        assert lost(reopened) == {}
        assert drain(reopened) == batch(10, 20)


def test_format_1_segments_are_still_read_and_never_appended_to(tmp_path: Path) -> None:
    """A spool written before record headers had a magic: replayed after an upgrade (one
    corrupt payload byte loses only its record, found again by the record's length), and
    new batches go to a new segment in today's format."""
    directory = tmp_path / "spool"
    directory.mkdir()
    records = b""
    offsets = []
    for start in (0, 10, 20):
        payload = encode_rows(batch(start, 10))
        offsets.append(10 + len(records))
        records += struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    data = bytearray(b"PLMSPOOL" + struct.pack("<H", 1) + records)
    data[offsets[1] + 8 + 20] ^= 0xFF
    old = directory / "00000000000000000001.seg"
    old.write_bytes(bytes(data))

    with Spool(directory) as spool:
        assert spool.rows == 20
        assert lost(spool) == {"checksum_mismatch": 1}
        spool.append(batch(100, 5))
        assert [path.name for path in segment_files(directory)] == [
            old.name,
            "00000000000000000002.seg",
        ]
        assert old.read_bytes() == bytes(data)  # untouched
        assert drain(spool) == batch(0, 10) + batch(20, 10) + batch(100, 5)


def test_undecodable_batch_is_counted_on_replay(tmp_path: Path) -> None:
    """Checksums and layout fine, content not (invalid UTF-8 in a string column): dropped
    when it comes up, its rows in discarded_rows and the record in lost_records."""
    directory = tmp_path / "spool"
    segment, offsets = three_records(directory)
    payload = bytearray(encode_rows([("ab",)] * 4))
    payload[-1] = 0xFF  # the last string's second byte: not UTF-8
    segment.write_bytes(forge(bytearray(segment.read_bytes()), offsets[1], bytes(payload)))
    with Spool(directory) as reopened:
        assert (reopened.rows, lost(reopened)) == (24, {})
        assert drain(reopened) == batch(0, 10) + batch(20, 10)
        stats = reopened.stats()
        assert stats.discarded_rows == 4
        assert lost(reopened) == {"undecodable": 1}
        assert set(stats.lost_records) == {reason.value for reason in SpoolLoss}


def test_foreign_file_is_quarantined_not_replayed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "00000000000000000001.seg").write_bytes(b"not a spool segment at all")
    with (
        caplog.at_level(logging.ERROR, logger="pluginmon.storage.spool"),
        Spool(directory) as spool,
    ):
        assert spool.rows == 0
        spool.append(batch(0, 3))
        assert drain(spool) == batch(0, 3)
    assert "not a pluginmon spool segment" in caplog.text
    assert (directory / "00000000000000000001.seg.unreadable").exists()


def test_cap_is_enforced_with_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with Spool(directory, max_bytes=64 * 1024) as spool:
        stored = 0
        record_bytes = len(encode_rows(batch(0, 100))) + RECORD_HEADER_BYTES
        while spool.bytes + record_bytes + 10 <= 64 * 1024:
            spool.append(batch(stored, 100))
            stored += 100
        with pytest.raises(SpoolFullError, match=r"at its cap: \d+ of 65536 bytes"):
            spool.append(batch(stored, 100))
        assert stored > 0
        assert spool.rows == stored
        assert spool.bytes <= 64 * 1024
        # The refused batch left nothing behind.
        sizes = sum(path.stat().st_size for path in segment_files(directory))
        assert sizes == spool.bytes

    with Spool(directory, max_bytes=64 * 1024) as reopened:
        assert reopened.rows == stored
        rows = drain(reopened)
        assert [row[2] for row in rows] == list(range(stored))
        reopened.append(batch(0, 100))
        assert reopened.rows == 100


def test_lost_records_are_exported_by_spool_and_reason(tmp_path: Path) -> None:
    damaged, offsets = three_records(tmp_path / "damaged")
    data = bytearray(damaged.read_bytes())
    data[offsets[1] + RECORD_HEADER_BYTES + 1] ^= 0xFF  # inside the middle payload
    damaged.write_bytes(bytes(data))
    three_records(tmp_path / "intact")
    registry = CollectorRegistry()
    with Spool(tmp_path / "damaged") as first, Spool(tmp_path / "intact") as second:
        registry.register(SpoolLosses({"samples": first, "unresolved": second}))

        def value(spool: str, reason: str) -> float | None:
            return registry.get_sample_value(
                "pluginmon_spool_lost_records_total", {"spool": spool, "reason": reason}
            )

        assert value("samples", "checksum_mismatch") == 1
        assert value("unresolved", "checksum_mismatch") == 0
        for reason in SpoolLoss:
            if reason is not SpoolLoss.CHECKSUM_MISMATCH:
                assert value("samples", reason.value) == 0
