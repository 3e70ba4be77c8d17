"""Helpers for the schema, RLS, retention and TimescaleDB tests (admin plane, psycopg)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import psycopg

from pluginmon.storage.migrate import Backend, migrate
from tests.dbutil import create_database, drop_database, is_citus, with_database

SAMPLE_COLUMNS: tuple[str, ...] = (
    "timestamp",
    "tenant_id",
    "plugin_id",
    "environment",
    "host",
    "cpu_percent",
    "rss_bytes",
    "vms_bytes",
    "uss_bytes",
    "swap_bytes",
    "threads",
    "fds",
    "read_bytes",
    "write_bytes",
    "ctx_switches_voluntary",
    "ctx_switches_involuntary",
    "process_count",
    "restarts",
    "up",
)

ROLLUP_COLUMNS: tuple[str, ...] = (
    "bucket",
    "tenant_id",
    "plugin_id",
    "environment",
    "sample_count",
    "cpu_percent_avg",
    "cpu_percent_max",
    "rss_bytes_avg",
    "rss_bytes_max",
    "vms_bytes_max",
    "threads_max",
    "process_count_max",
    "up_ratio",
    "restarts_sum",
)

# Plain tenant tables of 001 (the key column is tenant_id except on tenants).
TENANT_TABLES: tuple[str, ...] = (
    "tenants",
    "plugins",
    "plugin_operations",
    "plugin_config",
    "plugin_dependencies",
    "plugin_alerts",
    "audit_log",
    "plugin_backups",
    "plugin_restore_points",
    "plugin_approvals",
    "plugin_vulnerabilities",
    "plugin_analytics",
)

Conn = psycopg.Connection[tuple[Any, ...]]


@contextmanager
def database_for_backend(admin_url: str, backend: Backend) -> Iterator[str]:
    """A new database migrated for ``backend`` (PostgreSQL works on any server)."""
    name = create_database(admin_url, prefix=f"pm_{backend.value[:2]}")
    url = with_database(admin_url, name)
    try:
        migrate(url, backend=backend)
        yield url
    finally:
        drop_database(admin_url, name)


def partitioned_backend(admin_url: str) -> Backend:
    """The PostgreSQL backend, or on a Citus coordinator (where the PostgreSQL backend's
    files cannot run: 031 grants as a NOLOGIN role, which the workers refuse) the Citus
    backend, which keeps its partitions, rollups and maintenance pass (sql/100-102)."""
    return Backend.CITUS if is_citus(admin_url) else Backend.POSTGRES


def backend_of(conn: Conn) -> Backend:
    row = conn.execute("SELECT min(backend) FROM schema_migrations").fetchone()
    assert row is not None
    return Backend(row[0])


def add_plugin(conn: Conn, tenant: str, name: str, **columns: object) -> int:
    conn.execute(
        "INSERT INTO tenants (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING", (tenant, tenant)
    )
    names = ["tenant_id", "name", *columns]
    values = [tenant, name, *columns.values()]
    placeholders = ", ".join(["%s"] * len(values))
    row = conn.execute(
        f"INSERT INTO plugins ({', '.join(names)}) VALUES ({placeholders}) RETURNING id",  # noqa: S608
        values,
    ).fetchone()
    assert row is not None
    return int(row[0])


def sample_row(
    at: datetime, tenant: str, plugin_id: int, rng: random.Random, environment: str = "prod"
) -> tuple[object, ...]:
    return (
        at,
        tenant,
        plugin_id,
        environment,
        "host-1",
        round(rng.uniform(0, 400), 3),
        rng.randrange(1, 2**33),
        rng.randrange(2**33, 2**35),
        None,
        rng.choice([None, 0, 4096]),
        rng.randrange(1, 64),
        rng.randrange(3, 500),
        None,
        None,
        None,
        None,
        rng.randrange(1, 5),
        rng.randrange(0, 3),
        rng.random() > 0.2,
    )


def insert_samples(conn: Conn, rows: Iterable[Sequence[object]]) -> int:
    count = 0
    columns = ", ".join('"' + column + '"' for column in SAMPLE_COLUMNS)
    with conn.cursor().copy(f"COPY plugin_samples ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


def samples_series(
    start: datetime,
    end: datetime,
    step: timedelta,
    plugins: Sequence[tuple[str, int]],
    seed: int = 7,
) -> list[tuple[object, ...]]:
    rng = random.Random(seed)
    rows: list[tuple[object, ...]] = []
    at = start
    while at < end:
        for tenant, plugin_id in plugins:
            # Jitter inside the step so buckets get uneven counts.
            rows.append(sample_row(at + step * rng.random() * 0.5, tenant, plugin_id, rng))
        at += step
    return rows


def group_by_rollup(
    conn: Conn, width: str, where: str = "true"
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """The rollup by a plain GROUP BY over the raw rows: {(bucket, tenant, plugin, env): values}.

    ``width`` is an interval literal ('1 minute'); ``where`` a constant SQL condition.
    """
    rows = conn.execute(
        f"""
        SELECT date_bin(%s::interval, "timestamp", timestamptz '2000-01-03 00:00:00+00') AS bucket,
               tenant_id, plugin_id, environment,
               count(*), avg(cpu_percent), max(cpu_percent), avg(rss_bytes)::float8,
               max(rss_bytes), max(vms_bytes), max(threads), max(process_count),
               avg(up::int)::float8, sum(restarts)
          FROM plugin_samples WHERE {where}
         GROUP BY 1, 2, 3, 4
        """,  # noqa: S608
        (width,),
    ).fetchall()
    return {(r[0], r[1], r[2], r[3]): tuple(r[4:]) for r in rows}


def rollup_rows(
    conn: Conn, view: str, where: str = "true"
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    rows = conn.execute(
        f"SELECT {', '.join(ROLLUP_COLUMNS)} FROM {view} WHERE {where}"  # noqa: S608
    ).fetchall()
    return {(r[0], r[1], r[2], r[3]): tuple(r[4:]) for r in rows}


def assert_rollups_equal(
    actual: dict[tuple[Any, ...], tuple[Any, ...]],
    expected: dict[tuple[Any, ...], tuple[Any, ...]],
) -> None:
    assert actual.keys() == expected.keys()
    for key, want in expected.items():
        got = actual[key]
        for index, (g, w) in enumerate(zip(got, want, strict=True)):
            if isinstance(w, float) or isinstance(g, float):
                assert g is not None, (key, index)
                assert w is not None, (key, index)
                assert abs(float(g) - float(w)) <= 1e-9 * max(1.0, abs(float(w))), (
                    key,
                    index,
                    g,
                    w,
                )
            else:
                assert g == w, (key, index, g, w)
