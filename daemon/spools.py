"""The daemon's disk spools: drop counting by reason, and samples whose plugin id is not known yet."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pluginmon.collectors.models import PluginKey, PluginSample
from pluginmon.storage.spool import Row, Spool, SpoolCodecError, SpooledBatch, SpoolFullError

logger = logging.getLogger(__name__)

# pluginmon_dropped_samples_total{reason}: one reason per way a sample can be lost.
DROP_BUFFER_FULL = "buffer_full"  # the writer's in-memory queue overflowed
DROP_SPOOL_FULL = "spool_full"  # a batch did not fit under spool_max_bytes
DROP_SPOOL_IO = "spool_io_error"  # the disk refused an append
DROP_SPOOL_CODEC = "spool_codec_error"  # a value the spool codec cannot carry
DROP_SPOOL_DISCARDED = "spool_discarded"  # a spooled batch that no longer decodes
DROP_REJECTED = "rejected_by_database"  # a row the database refused (constraint, type)
DROP_INVALID_PLUGIN = "invalid_plugin"  # a plugin the schema refuses (a bad tenant id)


class CountingSpool(Spool):
    """A Spool that counts the rows of failed appends by cause.

    The writer folds every failed append into one ``rows_dropped``; counting here (the
    exception is re-raised unchanged, so the writer's handling is the same) lets the exporter
    give each cause its own ``reason``.
    """

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        super().__init__(directory, max_bytes=max_bytes)
        self.failed_rows: dict[str, int] = {
            DROP_SPOOL_FULL: 0,
            DROP_SPOOL_IO: 0,
            DROP_SPOOL_CODEC: 0,
        }
        self._oldest_acked: datetime | None = None
        self._oldest_lock = threading.Lock()

    def ack(self, batch: SpooledBatch) -> None:
        super().ack(batch)
        # Rows leaving a spool are late: older than the rollups' regular refresh may look
        # back. Remember the oldest, so maintenance back-fills the rollups from there.
        oldest = min((row[0] for row in batch.rows if isinstance(row[0], datetime)), default=None)
        if oldest is not None:
            self.note_late_rows(oldest)

    def note_late_rows(self, since: datetime) -> None:
        with self._oldest_lock:
            if self._oldest_acked is None or since < self._oldest_acked:
                self._oldest_acked = since

    def take_late_rows_since(self) -> datetime | None:
        """The oldest timestamp acked since the last call (None: nothing), and forget it."""
        with self._oldest_lock:
            oldest, self._oldest_acked = self._oldest_acked, None
            return oldest

    def append(self, rows: Sequence[Row]) -> None:
        try:
            super().append(rows)
        except SpoolFullError:
            self.failed_rows[DROP_SPOOL_FULL] += len(rows)
            raise
        except SpoolCodecError:
            self.failed_rows[DROP_SPOOL_CODEC] += len(rows)
            raise
        except OSError:
            self.failed_rows[DROP_SPOOL_IO] += len(rows)
            raise


def sample_values(sample: PluginSample, plugin: int | str, host: str) -> Row:
    """One plugin_samples row in the writer's PLUGIN_SAMPLES_COLUMNS order, with ``plugin``
    (a plugin id, or a plugin name while the id is not known yet) in the plugin column."""
    return (
        sample.timestamp,
        sample.key.tenant,
        plugin,
        sample.key.environment,
        host,
        max(sample.cpu_percent, 0.0),
        sample.rss_bytes,
        sample.vms_bytes,
        sample.uss_bytes,
        sample.swap_bytes,
        sample.threads,
        sample.fds,
        sample.read_bytes,
        sample.write_bytes,
        sample.ctx_switches_voluntary,
        sample.ctx_switches_involuntary,
        sample.process_count,
        max(sample.restarts, 0),
        sample.up,
    )


def unresolved_row(sample: PluginSample, host: str) -> Row:
    """A sample keyed by (tenant, plugin, environment) instead of a plugin id."""
    return sample_values(sample, sample.key.plugin, host)


def row_key(row: Row) -> PluginKey:
    tenant, plugin, environment = row[1], row[2], row[3]
    return PluginKey(tenant=str(tenant), plugin=str(plugin), environment=str(environment))


def resolved_row(row: Row, plugin_id: int) -> Row:
    """An unresolved row as a plugin_samples row (PLUGIN_SAMPLES_COLUMNS order)."""
    return (row[0], row[1], plugin_id, *row[3:])


@dataclass(frozen=True, slots=True)
class PendingBatch:
    batch: SpooledBatch
    keys: frozenset[PluginKey]


class UnresolvedSpool:
    """Samples of plugins whose id the database has not given us yet, on disk.

    A plugin seen for the first time while the database is away (or before the schema is
    migrated) has no plugin_id, so its samples cannot be plugin_samples rows yet. They are
    appended here, fsync'ed, keyed by (tenant, plugin, environment); once the ids resolve they
    are replayed, oldest first, into the writer. While a plugin has rows here, its newer
    samples are appended behind them, so its rows reach the writer in time order. Blocking:
    call through ``asyncio.to_thread``.
    """

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.spool = CountingSpool(directory, max_bytes=max_bytes)
        # Plugins with rows in the spool; rebuilt from disk after a restart.
        self.keys: set[PluginKey] = set()
        for batch in self.spool.replay():
            self.keys.update(row_key(row) for row in batch.rows)

    @property
    def rows(self) -> int:
        return self.spool.rows

    def append(self, rows: Sequence[Row]) -> None:
        """Store rows durably or raise (SpoolFullError, SpoolCodecError, OSError)."""
        self.spool.append(rows)
        self.keys.update(row_key(row) for row in rows)

    def peek(self) -> PendingBatch | None:
        batch = self.spool.peek()
        if batch is None:
            self.keys.clear()
            return None
        return PendingBatch(batch, frozenset(row_key(row) for row in batch.rows))

    def ack(self, pending: PendingBatch) -> None:
        self.spool.ack(pending.batch)
        if self.spool.rows == 0:
            self.keys.clear()

    def close(self) -> None:
        self.spool.close()


class DataDirLockedError(RuntimeError):
    """Another pluginmon runs on this data_dir."""


class DataDirLock:
    """An exclusive flock(2) on ``data_dir/pluginmon.lock`` for the daemon's lifetime.

    Taken before anything under data_dir is touched (the embedded server, the spools), so
    a second daemon on the same data_dir exits without stopping or adopting the first one's
    server. The kernel releases the lock when the process dies, however it dies.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "pluginmon.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DataDirLockedError(
                f"data_dir {self.path.parent} is in use by another pluginmon"
                + (f" (pid {holder})" if holder else "")
            ) from exc
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
