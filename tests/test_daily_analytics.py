"""Daily plugin_analytics rows (storage.analytics): the day plan with an injected clock, and values for a constructed day exact against hand-computed numbers on both backends."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pluginmon.storage.analytics import (
    FIRST_RUN_DAYS,
    LOOKBACK,
    MAX_DAYS_PER_RUN,
    DayWindow,
    plan_days,
)
from pluginmon.storage.backend import MaintenanceReport, Retention, admin_connection
from pluginmon.storage.engines import maintenance_for
from pluginmon.storage.migrate import Backend
from tests.schema_helpers import (
    Conn,
    add_plugin,
    database_for_backend,
    insert_samples,
    partitioned_backend,
)

DAY = timedelta(days=1)
D = datetime(2026, 3, 19, tzinfo=UTC)  # the constructed day
RETENTION = Retention()


def _sample(
    at: datetime, tenant: str, plugin: int, *, cpu: float, rss: int, up: bool, restarts: int = 0
) -> tuple[object, ...]:
    return (at, tenant, plugin, "prod", "h1", cpu, rss, rss * 2, None, None, 4, None, None, None,
            None, None, 1, restarts, up)  # fmt: skip


def _percentile_cont(values: Sequence[float], fraction: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the two nearest ranks."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def _analytics(conn: Conn, plugin: int, day: datetime) -> dict[str, Any]:
    cur = conn.execute(
        "SELECT sample_count, observed_seconds, up_seconds, uptime_ratio, cpu_seconds,"
        " rss_bytes_p50, rss_bytes_p95, rss_bytes_p99, restarts, operations, operation_failures,"
        " invocations, errors, computed_through"
        " FROM plugin_analytics WHERE plugin_id = %s AND period = 'day' AND period_start = %s",
        (plugin, day),
    )
    row = cur.fetchone()
    assert row is not None, (plugin, day)
    assert cur.description is not None
    return {d.name: v for d, v in zip(cur.description, row, strict=True)}


async def _maintain(url: str, backend: Backend, now: datetime) -> MaintenanceReport:
    async with admin_connection(url) as conn:
        report = await maintenance_for(backend, clock=lambda: now).run(conn, RETENTION)
    assert report.ran
    assert report.failed_steps == ()
    return report


async def _catch_up(url: str, backend: Backend, now: datetime) -> list[datetime]:
    """The first runs ever: FIRST_RUN_DAYS caught up, MAX_DAYS_PER_RUN per maintenance run,
    until a run has nothing left; the days computed."""
    days: list[datetime] = []
    for _ in range(FIRST_RUN_DAYS):
        report = await _maintain(url, backend, now)
        if not report.analytics_days:
            return days
        assert len(report.analytics_days) <= MAX_DAYS_PER_RUN
        days.extend(report.analytics_days)
    pytest.fail(f"the catch-up did not finish: {days}")


def test_plan_days_whole_days_once_a_lookback_past_their_end() -> None:
    now = D + DAY + LOOKBACK + timedelta(minutes=30)
    first = plan_days(
        computed_through=None, now=now, raw_retention=timedelta(days=90), max_days=100
    )
    assert first is not None
    assert first.through == D + DAY
    assert first.windows == tuple(
        DayWindow(day=D - i * DAY, end=D - i * DAY + DAY) for i in range(FIRST_RUN_DAYS - 1, -1, -1)
    )
    # The rest of the next day, and its first LOOKBACK after midnight: nothing to do (today
    # is never computed before it is complete, so its raw rows are read once).
    for later in (timedelta(hours=12), DAY + LOOKBACK - timedelta(seconds=1)):
        assert plan_days(computed_through=D + DAY, now=D + DAY + later,
                         raw_retention=timedelta(days=90)) is None  # fmt: skip
    # A LOOKBACK past its end: that day, once.
    nxt = plan_days(computed_through=D + DAY, now=D + 2 * DAY + LOOKBACK,
                    raw_retention=timedelta(days=90))  # fmt: skip
    assert nxt is not None
    assert nxt.windows == (DayWindow(day=D + DAY, end=D + 2 * DAY),)
    assert nxt.through == D + 2 * DAY
    # Missed days are caught up, but never before the raw retention's first whole day.
    missed = plan_days(computed_through=D - 10 * DAY, now=D + timedelta(hours=3),
                       raw_retention=timedelta(days=3, hours=12))  # fmt: skip
    assert missed is not None
    assert [w.day for w in missed.windows] == [D - 3 * DAY, D - 2 * DAY, D - DAY]
    assert missed.through == D


def test_plan_days_spreads_a_catch_up_over_runs() -> None:
    now = D + timedelta(hours=3, minutes=10)
    retention = timedelta(days=90)
    mark: datetime | None = D - 10 * DAY
    covered: list[datetime] = []
    for _ in range(10):
        plan = plan_days(computed_through=mark, now=now, raw_retention=retention, max_days=3)
        if plan is None:
            break
        assert 1 <= len(plan.windows) <= 3
        # The mark moves to the end of what this run computed, and always forward.
        assert plan.through == plan.windows[-1].end
        assert mark is None or plan.through > mark
        covered.extend(w.day for w in plan.windows)
        mark = plan.through
    assert mark == D
    assert covered == [D - i * DAY for i in range(10, 0, -1)]  # each day once
    with pytest.raises(ValueError, match="max_days"):
        plan_days(computed_through=None, now=now, raw_retention=retention, max_days=0)


def _construct_day(conn: Conn) -> tuple[int, int, dict[str, Any]]:
    """Plugin A (acme): samples and operations on D; plugin B (globex): operations only."""
    a = add_plugin(conn, "acme", "resizer")
    b = add_plugin(conn, "globex", "indexer")
    rows: list[tuple[object, ...]] = []
    # The evening before: its restarts belong to D - 1; its timestamp makes D's first sample
    # stand for 5 s (an interval straddling midnight counts for the day it ends in).
    rows.append(_sample(D - timedelta(seconds=5), "acme", a, cpu=90.0, rss=1, up=True, restarts=5))
    rss_values: list[float] = []
    # 00:00:00 to 00:59:50 every 10 s, up, 50% CPU.
    for i in range(360):
        rss = 1_000_000 + (i * 7919) % 50_000
        rss_values.append(rss)
        rows.append(_sample(D + timedelta(seconds=10 * i), "acme", a, cpu=50.0, rss=rss, up=True))
    # 01:00 to 02:00: no samples (a gap longer than MAX_SAMPLE_GAP).
    # 02:00:00 to 02:59:50 every 10 s, 20% CPU, down from 02:30; a restart at 02:00 and 02:30.
    for i in range(360):
        at = D + timedelta(hours=2, seconds=10 * i)
        rss = 3_000_000 + (i * 104_729) % 900_000
        if i < 180:
            rss_values.append(rss)  # the percentiles are of samples with up: memory in use
        restarts = 1 if i in (0, 180) else 0
        rows.append(_sample(at, "acme", a, cpu=20.0, rss=rss, up=i < 180, restarts=restarts))
    insert_samples(conn, rows)
    for plugin, tenant, status, started in (
        (a, "acme", "succeeded", D + timedelta(hours=3)),
        (a, "acme", "failed", D + timedelta(hours=4)),
        (a, "acme", "running", D + timedelta(hours=23, minutes=59)),
        (a, "acme", "failed", D - timedelta(minutes=1)),  # the day before
        (b, "globex", "failed", D + timedelta(hours=5)),
    ):
        finished = started + timedelta(seconds=1) if status != "running" else None
        conn.execute(
            "INSERT INTO plugin_operations (tenant_id, plugin_id, environment, operation_type,"
            " status, started_at, finished_at) VALUES (%s, %s, 'prod', 'update', %s, %s, %s)",
            (tenant, plugin, status, started, finished),
        )
    # The platform's own usage figures for the day: pluginmon's upsert leaves them alone.
    conn.execute(
        "INSERT INTO plugin_analytics (tenant_id, plugin_id, environment, period, period_start,"
        " invocations, errors) VALUES ('acme', %s, 'prod', 'day', %s, 100, 3)",
        (a, D),
    )
    # Hand-computed: the first block covers 5 + 359 x 10 s, the second 359 x 10 s (its
    # first sample follows an hour's gap); up in the second block: 02:00:10 .. 02:29:50.
    observed = 5 + 3590 + 3590
    up = 5 + 3590 + 179 * 10
    expected = {
        "sample_count": 720,
        "observed_seconds": float(observed),
        "up_seconds": float(up),
        "uptime_ratio": up / observed,
        "cpu_seconds": 0.5 * 3595 + 0.2 * 3590,
        "rss_bytes_p50": _percentile_cont(rss_values, 0.50),
        "rss_bytes_p95": _percentile_cont(rss_values, 0.95),
        "rss_bytes_p99": _percentile_cont(rss_values, 0.99),
        "restarts": 2,
        "operations": 3,
        "operation_failures": 1,
        "invocations": 100,
        "errors": 3,
        "computed_through": D + DAY,
    }
    return a, b, expected


def _assert_values(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-12), key
        else:
            assert got[key] == value, key


async def _check_backend(pg_admin_url: str, backend: Backend) -> None:
    with (
        database_for_backend(pg_admin_url, backend) as url,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        a, b, expected = _construct_day(conn)
        days = await _catch_up(url, backend, D + DAY + LOOKBACK + timedelta(minutes=30))
        assert sorted(set(days)) == [D - i * DAY for i in range(FIRST_RUN_DAYS - 1, -1, -1)]
        _assert_values(_analytics(conn, a, D), expected)
        only_ops = _analytics(conn, b, D)
        assert (only_ops["sample_count"], only_ops["observed_seconds"]) == (0, 0.0)
        assert only_ops["uptime_ratio"] is None  # nothing observed: no ratio, not 0 or 1
        assert (only_ops["operations"], only_ops["operation_failures"]) == (1, 1)
        # The day before holds only the evening sample and the failed operation.
        before = _analytics(conn, a, D - DAY)
        assert (before["sample_count"], before["restarts"], before["operations"]) == (1, 5, 1)

        # Idempotent: a later run the same day does nothing; D keeps one row per plugin.
        again = await _maintain(url, backend, D + DAY + LOOKBACK + timedelta(hours=5))
        assert again.analytics_days == ()
        _assert_values(_analytics(conn, a, D), expected)
        count = conn.execute(
            "SELECT count(*) FROM plugin_analytics WHERE period = 'day' AND period_start = %s",
            (D,),
        ).fetchone()
        assert count == (2,)

        # Missed days: the daemon was down from D+1 07:30 until D+3 05:30. D+1 and D+2
        # (one hour of 60 s samples each, up) are caught up, each once; D is not redone.
        for offset in (1, 2):
            insert_samples(
                conn,
                [
                    _sample(
                        D + offset * DAY + timedelta(hours=6, minutes=m),
                        "acme",
                        a,
                        cpu=10.0,
                        rss=5_000,
                        up=True,
                    )
                    for m in range(60)
                ],
            )
        missed = await _maintain(url, backend, D + 3 * DAY + timedelta(hours=5, minutes=30))
        assert missed.analytics_days == (D + DAY, D + 2 * DAY)
        for offset in (1, 2):
            caught = _analytics(conn, a, D + offset * DAY)
            assert caught["sample_count"] == 60
            assert caught["observed_seconds"] == 59 * 60.0
            assert caught["uptime_ratio"] == 1.0
            assert caught["cpu_seconds"] == pytest.approx(0.1 * 59 * 60, rel=1e-12)
            assert caught["rss_bytes_p95"] == 5_000.0
            assert caught["computed_through"] == D + (offset + 1) * DAY
        _assert_values(_analytics(conn, a, D), expected)


async def test_daily_analytics_on_postgres(pg_admin_url: str) -> None:
    await _check_backend(pg_admin_url, partitioned_backend(pg_admin_url))


@pytest.mark.timescaledb
async def test_daily_analytics_on_timescaledb(
    requires_timescaledb: None, pg_admin_url: str
) -> None:
    await _check_backend(pg_admin_url, Backend.TIMESCALEDB)


async def test_rows_up_to_the_lookback_late_are_folded_in(pg_admin_url: str) -> None:
    """A day is computed once, LOOKBACK after its end: a row written before then is counted,
    a later one stays out (docs/storage.md)."""
    backend = partitioned_backend(pg_admin_url)
    with (
        database_for_backend(pg_admin_url, backend) as url,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        a = add_plugin(conn, "acme", "resizer")
        # 22:00 .. 23:58 every 60 s, up: 118 intervals of 60 s.
        insert_samples(
            conn,
            [
                _sample(D + timedelta(hours=22, minutes=m), "acme", a, cpu=0.0, rss=1, up=True)
                for m in range(119)
            ],
        )
        # Not computed yet 30 minutes after midnight: the day waits for its lookback.
        assert D not in await _catch_up(url, backend, D + DAY + timedelta(minutes=30))
        # Late by less than the lookback: a down sample at 23:59, written at 00:50.
        insert_samples(conn, [_sample(D + DAY - timedelta(minutes=1), "acme", a, cpu=0.0, rss=1,
                                      up=False)])  # fmt: skip
        report = await _maintain(url, backend, D + DAY + LOOKBACK + timedelta(minutes=1))
        assert report.analytics_days == (D,)
        folded = _analytics(conn, a, D)
        assert (folded["observed_seconds"], folded["up_seconds"]) == (119 * 60.0, 118 * 60.0)
        assert folded["uptime_ratio"] == pytest.approx(118 / 119, rel=1e-12)
        assert folded["sample_count"] == 120

        # Later than that: 23:59:30 written at 03:00 is not folded in.
        insert_samples(conn, [_sample(D + DAY - timedelta(seconds=30), "acme", a, cpu=0.0,
                                      rss=1, up=True)])  # fmt: skip
        late = await _maintain(url, backend, D + DAY + timedelta(hours=3, minutes=1))
        assert late.analytics_days == ()
        assert _analytics(conn, a, D)["sample_count"] == 120
