"""Times every PostgreSQL dashboard query on a synthetic fleet, as owner and as a tenant reader.

Run by hand: ``python bench/dashboard_queries.py [--plugins 1000] [--hours 6]``. It starts a
private embedded PostgreSQL, migrates it, writes ``--hours`` of raw samples and health rows
(one per plugin every 10 s, the daemon's defaults) for ``--plugins`` plugins (90 % in tenant
acme), refreshes the rollups with the schema's own function, then runs each query of
dashboards/postgres as Grafana would send it (the tests' macro expander) for the default 6 h
range. The last line is the slowest fleet-dashboard query as the tenant reader.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dashboards.grafana_queries import (
    GrafanaContext,
    Variable,
    dashboard_files,
    dashboard_queries,
    grafana_sql,
)
from pluginmon.storage.embedded import EmbeddedPostgres
from pluginmon.storage.migrate import migrate


def _load(url: str, plugins: int, start: datetime, end: datetime) -> dict[str, int]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id) VALUES ('acme'), ('zeta')")
        conn.execute(
            "INSERT INTO plugins (tenant_id, name, environment, health_score) "
            "SELECT CASE WHEN g %% 10 = 0 THEN 'zeta' ELSE 'acme' END, 'plugin-' || g, "
            "'production', 50 + g %% 50 FROM generate_series(1, %s) g",
            (plugins,),
        )
        conn.execute(
            'INSERT INTO plugin_samples ("timestamp", tenant_id, plugin_id, environment, host, '
            "cpu_percent, rss_bytes, vms_bytes, threads, process_count, restarts, up) "
            "SELECT ts, p.tenant_id, p.id, 'production', 'host-1', (p.id %% 100)::float8, "
            "100000000 + p.id, 400000000, 4, 1, 0, true "
            "FROM plugins p, generate_series(%s::timestamptz, %s::timestamptz - interval '10 s', "
            "interval '10 s') ts",
            (start, end),
        )
        conn.execute(
            'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, '
            "metric_name, metric_kind, value, labels) "
            "SELECT ts, p.tenant_id, p.id, 'production', 'health_score', 'gauge', p.health_score, "
            """'{"components": {"up": 100, "cpu": 80}, "weakest": "cpu"}' """
            "FROM plugins p, generate_series(%s::timestamptz, %s::timestamptz - interval '10 s', "
            "interval '10 s') ts",
            (start, end),
        )
        for rollup, width in (("rollup_samples_1m", "1 minute"), ("rollup_samples_1h", "1 hour")):
            conn.execute(
                "SELECT * FROM pluginmon_refresh_rollup(%s::regclass, %s::interval, interval '0', "
                "at_time => %s)",
                (rollup, width, end),
            )
        conn.execute("VACUUM ANALYZE")
        counts: dict[str, int] = {}
        for table in ("plugin_samples", "plugin_metrics", "rollup_samples_1m", "rollup_samples_1h"):
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            ).fetchone()
            counts[table] = row[0] if row else 0
        return counts


def _reader_url(url: str) -> str:
    role, password = f"grafana_bench_{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute("SELECT pluginmon_bind_tenant_role(%s, 'acme')", (role,))
    parts = urlsplit(url)
    return urlunsplit(
        parts._replace(netloc=f"{quote(role)}:{quote(password)}@{parts.hostname}:{parts.port}")
    )


def _median_ms(url: str, query: bytes, repeats: int) -> tuple[float, int]:
    times: list[float] = []
    rows = 0
    with psycopg.connect(url) as conn:
        for _ in range(repeats):
            started = time.perf_counter()
            rows = len(conn.execute(query).fetchall())
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", type=int, default=1000)
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pluginmon-dash-bench-") as data_dir:
        server = EmbeddedPostgres(Path(data_dir))
        server.start()
        try:
            with psycopg.connect(server.url("postgres"), autocommit=True) as conn:
                conn.execute("CREATE DATABASE dashbench")
            url = server.url("dashbench")
            migrate(url)
            end = datetime.now(UTC).replace(second=0, microsecond=0)
            start = end - timedelta(hours=args.hours)
            started = time.perf_counter()
            counts = _load(url, args.plugins, start, end)
            print(f"loaded in {time.perf_counter() - started:.0f} s: {counts}")
            reader = _reader_url(url)
            context = GrafanaContext(
                time_from=start,
                time_to=end,
                interval="1m",
                variables={
                    "tenant": Variable(("acme",)),
                    "environment": Variable(("production",), multi=True),
                    "plugin": Variable(("1",)),
                    "top": Variable(("10",)),
                },
            )
            print(f"{'query':64s} {'owner ms':>9s} {'reader ms':>9s} {'rows':>7s}")
            slowest_fleet = 0.0
            for path in dashboard_files("postgres"):
                for query in dashboard_queries(path):
                    text = grafana_sql(query.text, context).encode()
                    owner_ms, rows = _median_ms(url, text, args.repeats)
                    reader_ms, _ = _median_ms(reader, text, args.repeats)
                    label = f"{path.stem} {query.location}"[:64]
                    print(f"{label:64s} {owner_ms:9.1f} {reader_ms:9.1f} {rows:7d}")
                    if "fleet" in path.stem:
                        slowest_fleet = max(slowest_fleet, reader_ms)
        finally:
            server.stop(mode="fast")
    print(f"dashboard_fleet_slowest_query_ms={slowest_fleet:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
