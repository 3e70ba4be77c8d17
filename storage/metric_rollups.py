"""Rollups of plugins' own metrics (plugin_metrics -> rollup_metrics_1m / _1h, read through the views plugin_metrics_1m / _1h) on both backends.

Kept apart from the plugin_samples rollups: their own tables or continuous aggregates, own
watermarks and refresh function (sql/051), called from the same maintenance pass. What each
kind keeps in a bucket (see sql/051): every series gets sample_count and
value_avg/min/max/first/last; gauges are read as avg/min/max/last, counters and histogram
buckets as value_last per bucket (a rate or a quantile over a period comes from consecutive
buckets, resets handled as on raw rows).

PostgreSQL: ``maintain_metric_rollups`` refreshes each table from its watermark (minus a
lookback for late rows) and deletes buckets past retention (``rollup_1m`` / ``rollup_1h``,
as for the samples). TimescaleDB: ``metric_rollup_policies`` lists the refresh and
retention policies storage.timescale registers with the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import psycopg
from psycopg import sql

from pluginmon.storage.backend import (
    MAINTENANCE_STEP_ERRORS,
    AdminConnection,
    Retention,
    RollupRefresh,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MetricRollup:
    """One rollup of plugin_metrics and how it is kept fresh on either backend."""

    relation: str
    width: timedelta
    # PostgreSQL: buckets this far behind the watermark are recomputed for late rows.
    lookback: timedelta
    retention_field: str  # the Retention field its buckets expire by
    # TimescaleDB: the refresh policy materialises [now - start_offset, now - end_offset).
    start_offset: timedelta
    end_offset: timedelta
    schedule_interval: timedelta


METRIC_ROLLUPS: Final = (
    MetricRollup(
        relation="rollup_metrics_1m",
        width=timedelta(minutes=1),
        lookback=timedelta(minutes=10),
        retention_field="rollup_1m",
        start_offset=timedelta(hours=2),
        end_offset=timedelta(minutes=1),
        schedule_interval=timedelta(minutes=1),
    ),
    MetricRollup(
        relation="rollup_metrics_1h",
        width=timedelta(hours=1),
        lookback=timedelta(hours=1),
        retention_field="rollup_1h",
        start_offset=timedelta(days=1),
        end_offset=timedelta(hours=1),
        schedule_interval=timedelta(minutes=30),
    ),
)


async def refresh_metric_rollup(
    conn: AdminConnection,
    rollup: MetricRollup,
    now: datetime,
    *,
    refresh_from: datetime | None = None,
) -> RollupRefresh:
    """PostgreSQL: recompute ``rollup``'s buckets from its watermark (minus lookback), or
    from ``refresh_from``, up to the last complete bucket before ``now``. ``conn``: autocommit."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT window_start, window_end, buckets"
            " FROM pluginmon_refresh_metrics_rollup(%s::text::regclass, %s::interval,"
            " %s::interval, %s::timestamptz, %s::timestamptz)",
            (rollup.relation, rollup.width, rollup.lookback, now, refresh_from),
        )
        row = await cur.fetchone()
    assert row is not None
    return RollupRefresh(
        rollup=rollup.relation, window_start=row[0], window_end=row[1], buckets=int(row[2])
    )


@dataclass(frozen=True, slots=True)
class MetricRollupReport:
    refreshed: tuple[RollupRefresh, ...]
    removed: tuple[tuple[str, int], ...]  # (relation, buckets deleted for retention)
    failed: tuple[tuple[str, str], ...]  # (step, reason) postponed to the next run


async def maintain_metric_rollups(
    conn: AdminConnection,
    retention: Retention,
    now: datetime,
    *,
    rollups: tuple[MetricRollup, ...] = METRIC_ROLLUPS,
) -> MetricRollupReport:
    """PostgreSQL: one maintenance pass over the metrics rollups (the caller holds the
    maintenance lock): each refreshed, then its buckets past retention deleted."""
    refreshed: list[RollupRefresh] = []
    removed: list[tuple[str, int]] = []
    failed: list[tuple[str, str]] = []
    for rollup in rollups:
        try:
            refreshed.append(await refresh_metric_rollup(conn, rollup, now))
        except MAINTENANCE_STEP_ERRORS as exc:
            logger.warning("maintenance: refresh of %s postponed: %s", rollup.relation, exc)
            failed.append((f"refresh:{rollup.relation}", str(exc)))
        horizon = now - getattr(retention, rollup.retention_field)
        async with conn.transaction():
            cur = await conn.execute(
                sql.SQL("DELETE FROM {} WHERE bucket < %s").format(sql.Identifier(rollup.relation)),
                (horizon,),
            )
        removed.append((rollup.relation, max(cur.rowcount, 0)))
    return MetricRollupReport(tuple(refreshed), tuple(removed), tuple(failed))


# TimescaleDB: sql/132 replaced each metrics aggregate by one that leaves the health rows out
# and kept what the old one had materialised under this suffix (read by the views for the
# buckets before the replacement, no refresh policy, expiring with the same retention).
SUPERSEDED_SUFFIX: Final = "_before_132"


def metric_rollup_policies(
    retention: Retention,
    *,
    retention_proc: str,
    refresh_proc: str,
    superseded: frozenset[str] = frozenset(),
) -> list[tuple[str, str, dict[str, timedelta], timedelta | None]]:
    """TimescaleDB: (relation, policy procedure, config, schedule) of each continuous
    aggregate's retention and refresh policy, in storage.timescale's form; and the retention
    policy of each aggregate sql/132 superseded that is among ``superseded`` (the
    database's continuous aggregates: a new database has none)."""
    out: list[tuple[str, str, dict[str, timedelta], timedelta | None]] = []
    for rollup in METRIC_ROLLUPS:
        old = rollup.relation + SUPERSEDED_SUFFIX
        if old in superseded:
            out.append(
                (
                    old,
                    retention_proc,
                    {"drop_after": getattr(retention, rollup.retention_field)},
                    None,
                )
            )
        out.append(
            (
                rollup.relation,
                retention_proc,
                {"drop_after": getattr(retention, rollup.retention_field)},
                None,
            )
        )
        out.append(
            (
                rollup.relation,
                refresh_proc,
                {"start_offset": rollup.start_offset, "end_offset": rollup.end_offset},
                rollup.schedule_interval,
            )
        )
    return out


# A superseded aggregate's retirement locks plugin_metrics exclusively (TimescaleDB drops a
# continuous aggregate under that lock): it waits this long at most, holding up the agents'
# writes of plugin metrics meanwhile, and the next maintenance run tries again.
RETIRE_LOCK_TIMEOUT = "500ms"

# The permanent reasons already logged at ERROR (once each per process).
_retire_errors_logged: set[str] = set()


async def retire_superseded_aggregates(
    conn: AdminConnection, *, failed: list[tuple[str, str]]
) -> tuple[str, ...]:
    """TimescaleDB, one step of the maintenance pass (the caller holds the maintenance
    lock): drop each aggregate sql/132 superseded once retention has emptied it, the view
    then reading the new aggregate only. Returns the aggregates dropped.

    A lock not granted within ``RETIRE_LOCK_TIMEOUT`` postpones it (a warning, and named in
    ``failed``). A permanent refusal (another role owns the aggregates, an object of the
    operator's depends on the old aggregate) is logged at ERROR once with the database's
    words, named in ``failed`` on every run, and leaves the rest of the pass alone.
    """
    try:
        async with conn.transaction():
            await conn.execute(
                "SELECT set_config('lock_timeout', %s, true)", (RETIRE_LOCK_TIMEOUT,)
            )
            cur = await conn.execute(
                "SELECT * FROM pluginmon_retire_superseded_metric_aggregates()"
            )
            retired = tuple(str(row[0]) for row in await cur.fetchall())
    except MAINTENANCE_STEP_ERRORS as exc:
        logger.warning(
            "maintenance: retirement of the superseded metrics aggregates postponed: %s", exc
        )
        failed.append(("retire:metrics-aggregates", str(exc)))
        return ()
    except psycopg.OperationalError:
        raise  # the connection: the run as a whole is retried
    except psycopg.Error as exc:
        reason = f"{exc.sqlstate or ''} {exc}".strip()
        if reason not in _retire_errors_logged:
            _retire_errors_logged.add(reason)
            detail = exc.diag.message_detail if exc.diag else None
            logger.error(
                "maintenance: the metrics aggregates sql/132 superseded cannot be dropped "
                "(%s%s); they stay, read through the views, until this is mended (run the "
                "daemon as their owner, or drop what depends on them): this is not retried "
                "in the logs, only named in each run's failed steps",
                reason,
                f"; {detail}" if detail else "",
            )
        failed.append(("retire:metrics-aggregates (permanent)", reason))
        return ()
    for name in retired:
        logger.info("maintenance: %s emptied by retention and dropped (sql/132)", name)
    return retired
