"""Reading plugin_metrics back for the rules (storage.plugin_metrics.series_windows): only the
(plugin, environment) pairs and the names asked for, points since ``since``, and increases
over the rate window with counter resets handled, on a real database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg

from pluginmon.storage.plugin_metrics import SeriesWindow, series_windows

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
SINCE = NOW - timedelta(minutes=5)
RATE_SINCE = NOW - timedelta(minutes=3)


async def _plugin(conn: asyncpg.Connection, name: str) -> int:
    await conn.execute(
        "INSERT INTO tenants (id, name) VALUES ('acme', 'acme') ON CONFLICT DO NOTHING"
    )
    return int(
        await conn.fetchval(
            "INSERT INTO plugins (tenant_id, name) VALUES ('acme', $1) RETURNING id", name
        )
    )


async def _points(
    conn: asyncpg.Connection,
    plugin_id: int,
    environment: str,
    name: str,
    kind: str,
    values: list[tuple[timedelta, float]],
    labels: dict[str, str] | None = None,
) -> None:
    await conn.executemany(
        'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment,'
        " metric_name, metric_kind, value, labels) VALUES ($1, 'acme', $2, $3, $4, $5, $6, $7)",
        [
            (NOW - ago, plugin_id, environment, name, kind, value, json.dumps(labels or {}))
            for ago, value in values
        ],
    )


def _key(window: SeriesWindow) -> tuple[int, str, str, str]:
    return (window.plugin_id, window.environment, window.name, json.dumps(dict(window.labels)))


async def test_only_the_pairs_and_names_asked_for_with_resets_handled(
    conn: asyncpg.Connection,
) -> None:
    a = await _plugin(conn, "a")
    b = await _plugin(conn, "b")
    minutes = timedelta(minutes=1)
    # a/production: a counter that resets once inside the rate window, with one point
    # before ``since`` (not read) and one between ``since`` and the rate window (read as the
    # previous value of the first rated point, not rated itself)
    await _points(
        conn,
        a,
        "production",
        "requests_total",
        "counter",
        [
            (6 * minutes, 1.0),
            (4 * minutes, 10.0),
            (2 * minutes, 20.0),
            (minutes, 5.0),
            (0 * minutes, 15.0),
        ],
    )
    await _points(
        conn, a, "production", "queue_depth", "gauge", [(2 * minutes, 7.0), (minutes, 3.0)]
    )
    # the same names of pairs not asked for: a/staging, b/production
    await _points(conn, a, "staging", "requests_total", "counter", [(minutes, 100.0)])
    await _points(conn, b, "production", "queue_depth", "gauge", [(minutes, 99.0)])
    # b/staging: a gauge with labels, and a name not asked for
    await _points(
        conn, b, "staging", "queue_depth", "gauge", [(minutes, 4.0)], labels={"queue": "in"}
    )
    await _points(conn, b, "staging", "other_metric", "gauge", [(minutes, 1.0)])

    got = await series_windows(
        conn,
        [(a, "production"), (b, "staging")],
        ["requests_total", "queue_depth"],
        since=SINCE,
        rate_since=RATE_SINCE,
    )
    by_key = {_key(w): w for w in got}
    assert sorted(by_key) == sorted(
        [
            (a, "production", "queue_depth", "{}"),
            (a, "production", "requests_total", "{}"),
            (b, "staging", "queue_depth", json.dumps({"queue": "in"})),
        ]
    )
    counter = by_key[(a, "production", "requests_total", "{}")]
    assert counter.kind == "counter"
    assert counter.last_value == 15.0
    assert counter.last_at == NOW
    # within the rate window (both ends of a step in it, as Prometheus's increase): 20 -> 5
    # is a reset (+5), 5 -> 15 (+10); the step 10 -> 20 starts before the window
    assert counter.increase == 15.0
    assert counter.rate_points == 3
    assert counter.rate_seconds == 120.0
    gauge = by_key[(a, "production", "queue_depth", "{}")]
    assert (gauge.kind, gauge.last_value, gauge.rate_points) == ("gauge", 3.0, 2)
    assert by_key[(b, "staging", "queue_depth", json.dumps({"queue": "in"}))].last_value == 4.0

    # the same pairs asked twice, and a's staging too: each series once, a/staging's now
    again = await series_windows(
        conn,
        [(a, "production"), (b, "staging"), (a, "production"), (a, "staging")],
        ["requests_total", "queue_depth"],
        since=SINCE,
        rate_since=RATE_SINCE,
    )
    assert sorted(_key(w) for w in again) == sorted(
        [*by_key, (a, "staging", "requests_total", "{}")]
    )
    assert {_key(w): (w.rate_points, w.increase) for w in again if w.plugin_id == a} == {
        (a, "production", "queue_depth", "{}"): (2, 3.0),  # a gauge: its increase unused
        (a, "production", "requests_total", "{}"): (3, 15.0),
        (a, "staging", "requests_total", "{}"): (1, 0.0),
    }


async def test_nothing_asked_reads_nothing(conn: asyncpg.Connection) -> None:
    a = await _plugin(conn, "a")
    await _points(conn, a, "production", "queue_depth", "gauge", [(timedelta(0), 1.0)])
    # points of another environment only, or before ``since``: none
    assert (
        await series_windows(
            conn, [(a, "staging")], ["queue_depth"], since=SINCE, rate_since=RATE_SINCE
        )
        == []
    )
    later = NOW + timedelta(seconds=1)
    assert (
        await series_windows(
            conn, [(a, "production")], ["queue_depth"], since=later, rate_since=later
        )
        == []
    )
    assert await series_windows(conn, [], ["queue_depth"], since=SINCE, rate_since=RATE_SINCE) == []
    assert (
        await series_windows(conn, [(a, "production")], [], since=SINCE, rate_since=RATE_SINCE)
        == []
    )
