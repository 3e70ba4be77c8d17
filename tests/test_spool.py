"""The disk spool on a real directory: codec, order, durability across reopen, torn tails, cap."""

from __future__ import annotations

import logging
import math
import os
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum
from pathlib import Path

import pytest

from pluginmon.storage.spool import (
    Spool,
    SpoolCodecError,
    SpoolFullError,
    SpoolLockedError,
    decode_rows,
    encode_rows,
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
        truncated_size = segment.stat().st_size
        assert truncated_size < intact_size - 7
        # Appends continue cleanly after the truncation point.
        reopened.append(batch(100, 5))
        rows = drain(reopened)
    assert [row[2] for row in rows] == [*range(20), *range(100, 105)]


def test_garbage_and_checksum_mismatch_truncate_from_the_bad_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    with Spool(directory) as spool:
        for start in (0, 10, 20):
            spool.append(batch(start, 10))
    (segment,) = segment_files(directory)
    data = bytearray(segment.read_bytes())
    # Flip one byte inside the second record's payload.
    second_record = 10 + (len(data) - 10) // 3 + 20
    data[second_record] ^= 0xFF
    segment.write_bytes(bytes(data) + b"\x01\x02\x03")

    with (
        caplog.at_level(logging.WARNING, logger="pluginmon.storage.spool"),
        Spool(directory) as reopened,
    ):
        assert "checksum mismatch" in caplog.text
        assert drain(reopened) == batch(0, 10)


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
        record_bytes = len(encode_rows(batch(0, 100))) + 8
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
