"""Every SQL query of the PostgreSQL dashboards, as Grafana would send it, on the migrated schema.

Data is written to the raw tables the daemon writes (plugin_samples, plugin_metrics, plugins,
plugin_alerts), rolled up by the schema's own refresh (pluginmon_refresh_rollup, or the
continuous aggregates on TimescaleDB), then each panel's query is expanded by the macro
expander in tests/dashboards_helpers.py and run. Values are checked for the main panels, as
the daemon's owner role and as a Grafana reader role bound to one tenant.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from dashboards.grafana_queries import (
    DashboardQuery,
    GrafanaContext,
    Variable,
    dashboard_files,
    dashboard_queries,
    grafana_sql,
)
from tests.dashboards_helpers import (
    DASHBOARDS_DIR,
)
from tests.dbutil import migrated_copy

FLEET = DASHBOARDS_DIR / "postgres" / "pluginmon-fleet.json"
PLUGIN = DASHBOARDS_DIR / "postgres" / "pluginmon-plugin.json"
MB = 1_000_000


@dataclass(frozen=True, slots=True)
class Loaded:
    url: str
    t0: datetime  # start of the 10 sampled minutes, on an hour boundary
    ids: Mapping[str, int]  # "tenant/plugin" -> plugins.id


def _sample_rows(
    t0: datetime, tenant: str, plugin_id: int, environment: str, kind: str
) -> Iterator[tuple[Any, ...]]:
    """60 samples, one every 10 s, for ten minutes."""
    for i in range(60):
        at = t0 + timedelta(seconds=10 * i)
        up, restarts = True, 0
        if kind == "resizer":  # 20% CPU on average, growing memory, down in the last minute
            up = i < 54
            cpu = (10.0 if i % 2 == 0 else 30.0) if up else 0.0
            rss = 100 * MB + (i // 6) * MB if up else 0
            vms, threads, procs = (500 * MB, 4, 1) if up else (0, 0, 0)
            restarts = 1 if i == 30 else 0
        elif kind == "thumbs":
            cpu, rss, vms, threads, procs = 50.0, 200 * MB, 800 * MB, 8, 2
        elif kind == "batch":
            cpu, rss, vms, threads, procs = 5.0, 50 * MB, 90 * MB, 1, 1
        else:  # the other tenant: loud numbers that must never show up for acme
            cpu, rss, vms, threads, procs = 99.0, 999 * MB, 999 * MB, 99, 9
            restarts = 5 if i == 10 else 0
        yield (
            at,
            tenant,
            plugin_id,
            environment,
            "host-1",
            cpu,
            rss,
            vms,
            threads,
            procs,
            restarts,
            up,
        )


def _refresh_rollups(conn: psycopg.Connection[Any], since: datetime) -> None:
    timescale = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    if timescale:
        for rollup in (
            "rollup_samples_1m",
            "rollup_samples_1h",
            "rollup_samples_pct_1m",
            "rollup_samples_pct_1h",
        ):
            conn.execute(
                sql.SQL("CALL refresh_continuous_aggregate({}, NULL, NULL)").format(
                    sql.Literal(rollup)
                )
            )
        return
    for rollup, width in (("rollup_samples_1m", "1 minute"), ("rollup_samples_1h", "1 hour")):
        conn.execute(
            "SELECT * FROM pluginmon_refresh_rollup(%s::regclass, %s::interval, interval '0', "
            "refresh_from => %s)",
            (rollup, width, since),
        )


def _load(url: str) -> Loaded:
    # A past, whole hour: every 1-minute and 1-hour bucket of the data is complete.
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    t0 = now - timedelta(hours=26)
    ids: dict[str, int] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES ('acme', 'Acme'), ('zeta', 'Zeta')")
        plugins = [
            ("acme", "resizer", "production", 40.0),
            ("acme", "thumbs", "production", 95.0),
            ("acme", "batch", "staging", None),
            ("zeta", "resizer", "production", 10.0),
        ]
        for tenant, name, environment, health in plugins:
            row = conn.execute(
                "INSERT INTO plugins (tenant_id, name, environment, health_score, last_health_check) "
                "VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (tenant, name, environment, health, t0 + timedelta(minutes=10)),
            ).fetchone()
            assert row is not None
            ids[f"{tenant}/{name}"] = row[0]
        with conn.cursor() as cur:
            with cur.copy(
                'COPY plugin_samples ("timestamp", tenant_id, plugin_id, environment, host, '
                "cpu_percent, rss_bytes, vms_bytes, threads, process_count, restarts, up) FROM STDIN"
            ) as copy:
                for tenant, name, environment, _health in plugins:
                    kind = name if tenant == "acme" else "other"
                    for sample in _sample_rows(
                        t0, tenant, ids[f"{tenant}/{name}"], environment, kind
                    ):
                        copy.write_row(sample)
            metrics: list[tuple[Any, ...]] = []
            for minute in range(10):
                at = t0 + timedelta(minutes=minute)
                resizer, thumbs, other = (
                    ids["acme/resizer"],
                    ids["acme/thumbs"],
                    ids["zeta/resizer"],
                )
                # As alerts/engine.py writes them: one health_score row per evaluation, the
                # components and the weakest one in labels.
                up_score = 100.0 if minute < 9 else 0.0
                resizer_labels = {
                    "components": {"up": up_score, "cpu": 80.0},
                    "weakest": "cpu" if minute < 9 else "up",
                    "weakest_score": 80.0 if minute < 9 else 0.0,
                    "weakest_detail": "cpu 20% of one core" if minute < 9 else "no process",
                }
                metrics += [
                    (
                        at,
                        "acme",
                        resizer,
                        "production",
                        "health_score",
                        90.0 if minute < 9 else 40.0,
                        resizer_labels,
                    ),
                    (
                        at,
                        "acme",
                        thumbs,
                        "production",
                        "health_score",
                        95.0,
                        {"components": {"up": 100.0}},
                    ),
                    # a row without components must not break the component panels
                    (at, "acme", thumbs, "production", "health_score", 95.0, {}),
                    (
                        at,
                        "zeta",
                        other,
                        "production",
                        "health_score",
                        10.0,
                        {"components": {"up": 1.0}},
                    ),
                    (at, "acme", resizer, "production", "queue_depth", 7.0, {}),
                ]
            cur.executemany(
                'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, '
                "metric_name, metric_kind, value, labels) VALUES (%s, %s, %s, %s, %s, 'gauge', %s, %s)",
                [(*row[:6], json.dumps(row[6])) for row in metrics],
            )
            # A counter the plugin exposes itself: 60 a minute, restarted (from 0) at minute 5.
            cur.executemany(
                'INSERT INTO plugin_metrics ("timestamp", tenant_id, plugin_id, environment, '
                "metric_name, metric_kind, value, labels) "
                "VALUES (%s, %s, %s, 'production', 'jobs_total', 'counter', %s, %s)",
                [
                    (
                        t0 + timedelta(minutes=minute),
                        tenant,
                        ids[f"{tenant}/resizer"],
                        60.0 * minute if minute < 5 else 30.0 + 60.0 * (minute - 5),
                        json.dumps({"queue": "a"}),
                    )
                    for minute in range(10)
                    for tenant in ("acme", "zeta")
                ],
            )
            alerts = [
                # (plugin, rule, severity, status, inhibited, started, fired, resolved, fingerprint)
                (
                    "acme/resizer",
                    "PluginDown",
                    "critical",
                    "firing",
                    False,
                    9 * 60,
                    9 * 60 + 30,
                    None,
                    "fp-down",
                ),
                (
                    "acme/resizer",
                    "PluginCpuHigh",
                    "warning",
                    "resolved",
                    False,
                    60,
                    120,
                    240,
                    "fp-cpu",
                ),
                (
                    "acme/resizer",
                    "PluginCpuHigh",
                    "warning",
                    "resolved",
                    False,
                    -48 * 3600,
                    -48 * 3600,
                    -47 * 3600,
                    "fp-old",
                ),
                (
                    "acme/thumbs",
                    "PluginHealthLow",
                    "warning",
                    "firing",
                    True,
                    0,
                    60,
                    None,
                    "fp-inhibited",
                ),
                (
                    "acme/thumbs",
                    "PluginMemoryHigh",
                    "warning",
                    "pending",
                    False,
                    500,
                    None,
                    None,
                    "fp-pending",
                ),
                ("zeta/resizer", "PluginDown", "critical", "firing", False, 0, 30, None, "fp-zeta"),
            ]
            for (
                key,
                rule,
                severity,
                status,
                inhibited,
                started,
                fired,
                resolved,
                fingerprint,
            ) in alerts:
                tenant = key.split("/")[0]
                cur.execute(
                    "INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name, fingerprint, "
                    "severity, status, inhibited, value, annotations, started_at, fired_at, resolved_at) "
                    "VALUES (%s, %s, 'production', %s, %s, %s, %s, %s, 1.0, %s, %s, %s, %s)",
                    (
                        tenant,
                        ids[key],
                        rule,
                        fingerprint,
                        severity,
                        status,
                        inhibited,
                        json.dumps({"summary": f"{rule} on {key}"}),
                        t0 + timedelta(seconds=started),
                        None if fired is None else t0 + timedelta(seconds=fired),
                        None if resolved is None else t0 + timedelta(seconds=resolved),
                    ),
                )
        _refresh_rollups(conn, since=t0 - timedelta(days=1))
    return Loaded(url, t0, ids)


@pytest.fixture(scope="module")
def loaded(pg_admin_url: str, migrated_template: str) -> Iterator[Loaded]:
    """One migrated database with the data above, shared by the module's read-only tests."""
    with migrated_copy(pg_admin_url, migrated_template, prefix="dash") as url:
        yield _load(url)


@pytest.fixture(scope="module")
def reader_url(loaded: Loaded, pg_admin_url: str) -> Iterator[str]:
    """A login role bound to tenant acme, as a Grafana data source would use (docs/operations.md)."""
    role = f"grafana_acme_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with psycopg.connect(loaded.url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute("SELECT pluginmon_bind_tenant_role(%s, 'acme')", (role,))
    parts = urlsplit(loaded.url)
    netloc = f"{quote(role)}:{quote(password)}@{parts.hostname}:{parts.port}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc))
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            # pg_db_role_setting rows and memberships go with the role.
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _context(
    loaded: Loaded,
    *,
    tenant: str = "acme",
    environments: Sequence[str] = ("production",),
    plugin: str = "acme/resizer",
    long_range: bool = False,
) -> GrafanaContext:
    start = loaded.t0 - timedelta(days=4) if long_range else loaded.t0
    return GrafanaContext(
        time_from=start,
        time_to=loaded.t0 + timedelta(minutes=10),
        interval="1h" if long_range else "1m",
        variables={
            "tenant": Variable((tenant,)),
            "environment": Variable(tuple(environments), multi=True),
            "plugin": Variable((str(loaded.ids.get(plugin, 0)),)),
            "top": Variable(("10",)),
        },
    )


@dataclass(frozen=True, slots=True)
class Result:
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def one(self) -> dict[str, Any]:
        assert len(self.rows) == 1, self.rows
        return self.records()[0]


def _run(url: str, text: str, context: GrafanaContext) -> Result:
    query = grafana_sql(text, context)
    with psycopg.connect(url) as conn:
        cur = conn.execute(query.encode())  # as Grafana sends it: literal SQL, no parameters
        columns = tuple(column.name for column in cur.description or ())
        return Result(columns, cur.fetchall())


def _query(path: Any, title: str) -> DashboardQuery:
    matches = [query for query in dashboard_queries(path) if query.title == title]
    assert len(matches) == 1, f"{path.name}: {len(matches)} queries titled {title!r}"
    return matches[0]


def _panel(url: str, path: Any, title: str, context: GrafanaContext) -> Result:
    return _run(url, _query(path, title).text, context)


def _series(result: Result) -> dict[str, dict[int, float]]:
    """A time_series result with a `metric` column, as Grafana splits it: {metric: {t: v}}."""
    assert result.columns[:2] == ("time", "metric"), result.columns
    series: dict[str, dict[int, float]] = {}
    for time, metric, value in result.rows:
        series.setdefault(metric, {})[int(time)] = value
    return series


def _columns(result: Result) -> dict[str, dict[int, Any]]:
    """A wide time_series result: {column: {t: v}}."""
    assert result.columns[0] == "time", result.columns
    return {
        column: {int(row[0]): row[index] for row in result.rows}
        for index, column in enumerate(result.columns)
        if index > 0
    }


def _minute(loaded: Loaded, minute: int) -> int:
    return int((loaded.t0 + timedelta(minutes=minute)).timestamp())


# -- every query runs ----------------------------------------------------------------------------


def _all_sql_queries() -> list[DashboardQuery]:
    return [query for path in dashboard_files("postgres") for query in dashboard_queries(path)]


def test_postgres_dashboards_have_queries() -> None:
    queries = _all_sql_queries()
    assert {query.dashboard for query in queries} == {
        "pluginmon-fleet.json",
        "pluginmon-plugin.json",
    }
    assert len(queries) >= 25
    assert all(query.datasource_uid == "pluginmon-postgres" for query in queries)


@pytest.mark.parametrize("long_range", [False, True], ids=["1m-rollup", "1h-rollup"])
@pytest.mark.parametrize("as_reader", [False, True], ids=["owner", "tenant-reader"])
def test_every_sql_query_runs_and_has_grafana_shape(
    loaded: Loaded, reader_url: str, long_range: bool, as_reader: bool
) -> None:
    url = reader_url if as_reader else loaded.url
    context = _context(loaded, environments=("production", "staging"), long_range=long_range)
    for query in _all_sql_queries():
        result = _run(url, query.text, context)
        where = f"{query.dashboard} {query.location}"
        if query.format == "time_series":
            assert result.columns[0] == "time", where
            times = [row[0] for row in result.rows]
            assert times == sorted(times), f"{where}: not ordered by time"
            assert result.rows, f"{where}: no rows"
        if query.format == "annotation":
            assert {"time", "timeend", "text", "tags"} <= set(result.columns), where
        if query.format == "variable":
            assert result.rows, where


def test_every_sql_query_as_reader_of_another_tenant_sees_nothing(
    loaded: Loaded, reader_url: str
) -> None:
    # The acme-bound role asks for zeta (a user editing the tenant variable): RLS returns nothing.
    context = _context(loaded, tenant="zeta", plugin="zeta/resizer")
    for query in _all_sql_queries():
        result = _run(reader_url, query.text, context)
        values = [value for row in result.rows for value in row if value not in (0, None)]
        if query.location == "variable tenant":
            assert result.rows == [("acme",)]
            continue
        assert not values, f"{query.dashboard} {query.location}: {result.rows}"


def test_reader_sees_the_same_numbers_as_the_owner(loaded: Loaded, reader_url: str) -> None:
    context = _context(loaded, environments=("production", "staging"))
    for query in _all_sql_queries():
        if query.location == "variable tenant":
            continue
        assert _run(reader_url, query.text, context) == _run(loaded.url, query.text, context), (
            query.location
        )


# -- variables -----------------------------------------------------------------------------------


def test_variables(loaded: Loaded, reader_url: str) -> None:
    context = _context(loaded)
    tenant = _query(FLEET, "tenant").text
    assert _run(loaded.url, tenant, context).rows == [("acme",), ("zeta",)]
    assert _run(reader_url, tenant, context).rows == [("acme",)]
    assert _run(loaded.url, _query(FLEET, "environment").text, context).rows == [
        ("production",),
        ("staging",),
    ]
    plugins = _run(loaded.url, _query(PLUGIN, "plugin").text, context)
    assert plugins.columns == ("__text", "__value")
    assert plugins.rows == [
        ("resizer", loaded.ids["acme/resizer"]),
        ("thumbs", loaded.ids["acme/thumbs"]),
    ]


def test_variable_values_are_quoted(loaded: Loaded) -> None:
    # A hostile tenant value stays one string literal.
    base = _context(loaded)
    context = replace(base, variables={**base.variables, "tenant": Variable(("x' OR '1'='1",))})
    assert "tenant_id = 'x'' OR ''1''=''1'" in grafana_sql(
        _query(FLEET, "Firing alerts").text, context
    )
    assert _panel(loaded.url, FLEET, "Firing alerts", context).one() == {"firing": 0}


# -- fleet overview ------------------------------------------------------------------------------


def test_fleet_stats(loaded: Loaded) -> None:
    production = _context(loaded)
    everything = _context(loaded, environments=("production", "staging"))
    assert _panel(loaded.url, FLEET, "Plugins", production).one() == {"plugins": 2}
    assert _panel(loaded.url, FLEET, "Plugins", everything).one() == {"plugins": 3}
    # Latest sample per plugin: resizer's last minute is down, thumbs is up.
    assert _panel(loaded.url, FLEET, "Up now", production).one() == {"up": 1, "down": 1}
    assert _panel(loaded.url, FLEET, "Average health", production).one() == {"health_score": 67.5}
    assert _panel(loaded.url, FLEET, "Lowest health", production).one() == {"health_score": 40.0}
    # Inhibited and pending alerts, and the other tenant's, do not count.
    assert _panel(loaded.url, FLEET, "Firing alerts", production).one() == {"firing": 1}
    assert _panel(loaded.url, FLEET, "Restarts", production).one() == {"restarts": 1}


@pytest.mark.parametrize("long_range", [False, True], ids=["1m-rollup", "1h-rollup"])
def test_fleet_plugins_table(loaded: Loaded, long_range: bool) -> None:
    rows = _panel(
        loaded.url, FLEET, "Plugin overview", _context(loaded, long_range=long_range)
    ).records()
    assert [row["plugin"] for row in rows] == ["resizer", "thumbs"]  # least healthy first
    resizer, thumbs = rows
    assert resizer["plugin_id"] == loaded.ids["acme/resizer"]
    assert resizer["health_score"] == 40.0
    # 54 samples at 10/30 % alternately and 6 down samples at 0 %.
    assert resizer["cpu_percent_avg"] == pytest.approx(18.0)
    assert resizer["cpu_percent_max"] == 30.0
    assert resizer["rss_bytes_max"] == 108 * MB
    assert resizer["up_ratio"] == pytest.approx(0.9)
    assert resizer["restarts"] == 1
    assert resizer["firing_alerts"] == 1
    assert thumbs["cpu_percent_avg"] == pytest.approx(50.0)
    assert thumbs["rss_bytes_max"] == 200 * MB
    assert thumbs["up_ratio"] == pytest.approx(1.0)
    assert thumbs["restarts"] == 0
    assert thumbs["firing_alerts"] == 0  # its firing alert is inhibited


def test_fleet_cpu_memory_availability_series(loaded: Loaded) -> None:
    context = _context(loaded)
    cpu = _series(_panel(loaded.url, FLEET, "CPU by plugin", context))
    assert set(cpu) == {"resizer", "thumbs"}
    assert cpu["resizer"] == {
        _minute(loaded, m): pytest.approx(20.0 if m < 9 else 0.0) for m in range(10)
    }
    assert cpu["thumbs"] == {_minute(loaded, m): pytest.approx(50.0) for m in range(10)}
    memory = _series(_panel(loaded.url, FLEET, "Resident memory by plugin", context))
    assert memory["resizer"][_minute(loaded, 3)] == pytest.approx(103 * MB)
    assert memory["resizer"][_minute(loaded, 9)] == 0
    availability = _series(_panel(loaded.url, FLEET, "Availability by plugin", context))
    assert availability["resizer"] == {
        _minute(loaded, m): pytest.approx(1.0 if m < 9 else 0.0) for m in range(10)
    }


def test_fleet_series_regroup_rollups_by_interval(loaded: Loaded) -> None:
    # A 5-minute $__interval over 1-minute buckets: sample-weighted averages per 5 minutes.
    context = replace(_context(loaded), interval="5m")
    cpu = _series(_panel(loaded.url, FLEET, "CPU by plugin", context))
    first, second = _minute(loaded, 0), _minute(loaded, 5)
    assert cpu["resizer"] == {first: pytest.approx(20.0), second: pytest.approx((24 * 20.0) / 30)}


def test_fleet_long_range_reads_hourly_rollup(loaded: Loaded) -> None:
    context = _context(loaded, long_range=True)
    cpu = _series(_panel(loaded.url, FLEET, "CPU by plugin", context))
    hour = int(loaded.t0.timestamp())
    assert cpu == {"resizer": {hour: pytest.approx(18.0)}, "thumbs": {hour: pytest.approx(50.0)}}


def test_fleet_health_top_cpu_and_alerts(loaded: Loaded) -> None:
    context = _context(loaded)
    health = _series(_panel(loaded.url, FLEET, "Health score by plugin", context))
    assert health["resizer"][_minute(loaded, 0)] == 90.0
    assert health["resizer"][_minute(loaded, 9)] == 40.0
    assert set(health) == {"resizer", "thumbs"}
    top = _panel(loaded.url, FLEET, "Top CPU", context)
    assert [(row["plugin"], round(row["cpu_percent"], 6)) for row in top.records()] == [
        ("thumbs", 50.0),
        ("resizer", 18.0),
    ]
    alerts = _panel(loaded.url, FLEET, "Open alerts", context).records()
    assert [(a["plugin"], a["rule_name"], a["status"]) for a in alerts] == [
        ("resizer", "PluginDown", "firing"),
        ("thumbs", "PluginMemoryHigh", "pending"),
    ]
    assert alerts[0]["summary"] == "PluginDown on acme/resizer"


# -- plugin detail -------------------------------------------------------------------------------


def test_plugin_stats(loaded: Loaded) -> None:
    context = _context(loaded)
    health = _panel(loaded.url, PLUGIN, "Health score", context).one()
    assert health["health_score"] == 40.0
    assert _panel(loaded.url, PLUGIN, "Up", context).one() == {"up": 0}
    assert _panel(loaded.url, PLUGIN, "CPU now", context).one() == {"cpu_percent": 0.0}
    assert _panel(loaded.url, PLUGIN, "Resident memory now", context).one() == {"rss_bytes": 0}
    assert _panel(loaded.url, PLUGIN, "Restarts", context).one() == {"restarts": 1}
    assert _panel(loaded.url, PLUGIN, "Firing alerts", context).one() == {"firing": 1}
    thumbs = _context(loaded, plugin="acme/thumbs")
    assert _panel(loaded.url, PLUGIN, "Up", thumbs).one() == {"up": 1}
    assert _panel(loaded.url, PLUGIN, "CPU now", thumbs).one() == {"cpu_percent": 50.0}
    assert _panel(loaded.url, PLUGIN, "Resident memory now", thumbs).one() == {
        "rss_bytes": 200 * MB
    }


def test_plugin_cpu_and_memory_series(loaded: Loaded) -> None:
    context = _context(loaded)
    cpu = _columns(_panel(loaded.url, PLUGIN, "CPU", context))
    assert set(cpu) == {"cpu_percent_avg", "cpu_percent_max"}
    assert cpu["cpu_percent_avg"][_minute(loaded, 4)] == pytest.approx(20.0)
    assert cpu["cpu_percent_max"][_minute(loaded, 4)] == 30.0
    assert cpu["cpu_percent_max"][_minute(loaded, 9)] == 0.0
    memory = _columns(_panel(loaded.url, PLUGIN, "Memory", context))
    assert memory["rss_bytes_avg"] == {
        _minute(loaded, m): pytest.approx((100 + m) * MB if m < 9 else 0) for m in range(10)
    }
    assert memory["rss_bytes_max"][_minute(loaded, 8)] == 108 * MB
    assert memory["vms_bytes_max"][_minute(loaded, 0)] == 500 * MB
    other = _columns(_panel(loaded.url, PLUGIN, "Threads, processes and restarts", context))
    assert other["threads_max"][_minute(loaded, 0)] == 4
    assert other["process_count_max"][_minute(loaded, 9)] == 0
    assert sum(other["restarts"].values()) == 1
    assert other["restarts"][_minute(loaded, 5)] == 1
    availability = _columns(_panel(loaded.url, PLUGIN, "Availability", context))
    assert availability["up_ratio"][_minute(loaded, 9)] == 0.0


def test_plugin_p95_series(loaded: Loaded) -> None:
    """resizer: each minute 10, 30, 10, 30, 10, 30 % CPU (p95 = 30), (100 + m) MB; down in
    minute 9."""
    context = _context(loaded)
    cpu = _columns(_panel(loaded.url, PLUGIN, "CPU p95", context))
    assert cpu == {
        "cpu_percent_p95": {_minute(loaded, m): 30.0 if m < 9 else 0.0 for m in range(10)}
    }
    memory = _columns(_panel(loaded.url, PLUGIN, "Resident memory p95", context))
    assert memory == {
        "rss_bytes_p95": {_minute(loaded, m): (100 + m) * MB if m < 9 else 0.0 for m in range(10)}
    }


def test_plugin_health_and_components(loaded: Loaded) -> None:
    context = _context(loaded)
    health = _series(_panel(loaded.url, PLUGIN, "Health score and components", context))
    assert set(health) == {"score", "up", "cpu"}
    assert health["score"][_minute(loaded, 0)] == 90.0
    assert health["score"][_minute(loaded, 9)] == 40.0
    assert health["up"][_minute(loaded, 9)] == 0.0
    assert health["cpu"][_minute(loaded, 5)] == 80.0
    # The latest evaluation's components, weakest first, and the weakest named.
    now = _panel(loaded.url, PLUGIN, "Health components now", context)
    assert now.rows == [("up", 0.0), ("cpu", 80.0)]
    assert _panel(loaded.url, PLUGIN, "Weakest component", context).one() == {
        "weakest": "up",
        "weakest_score": 0.0,
        "detail": "no process",
    }
    earlier = replace(context, time_to=loaded.t0 + timedelta(minutes=5))
    assert _panel(loaded.url, PLUGIN, "Health components now", earlier).rows == [
        ("cpu", 80.0),
        ("up", 100.0),
    ]
    thumbs = _series(
        _panel(
            loaded.url,
            PLUGIN,
            "Health score and components",
            _context(loaded, plugin="acme/thumbs"),
        )
    )
    assert set(thumbs) == {"score", "up"}
    assert thumbs["score"][_minute(loaded, 0)] == 95.0


def test_plugin_own_metrics(loaded: Loaded) -> None:
    own = _series(_panel(loaded.url, PLUGIN, "Plugin's own metrics", _context(loaded)))
    assert set(own) == {"queue_depth", 'jobs_total {"queue": "a"} /s'}
    assert own["queue_depth"][_minute(loaded, 3)] == 7.0
    rates = own['jobs_total {"queue": "a"} /s']
    # One a second; the minute of the restart counts from 0 (30 in 60 s), never negative.
    assert rates == {
        _minute(loaded, m): pytest.approx(0.5 if m == 5 else 1.0) for m in range(1, 10)
    }


def test_plugin_alerts_table_and_annotations(loaded: Loaded) -> None:
    context = _context(loaded)
    alerts = _panel(loaded.url, PLUGIN, "Alerts", context).records()
    # Open now or active in the range; the alert resolved two days earlier is not.
    assert [(a["rule_name"], a["status"]) for a in alerts] == [
        ("PluginDown", "firing"),
        ("PluginCpuHigh", "resolved"),
    ]
    annotations = _run(loaded.url, _query(PLUGIN, "pluginmon alerts").text, context).records()
    assert [(a["text"], a["time"], a["timeend"]) for a in annotations] == [
        (
            "PluginCpuHigh (warning)",
            loaded.t0 + timedelta(minutes=2),
            loaded.t0 + timedelta(minutes=4),
        ),
        ("PluginDown (critical)", loaded.t0 + timedelta(seconds=570), None),
    ]


def test_time_column_is_epoch_seconds(loaded: Loaded) -> None:
    # $__timeGroupAlias yields numeric epoch seconds, which Grafana reads as UNIX time.
    result = _panel(loaded.url, PLUGIN, "CPU", _context(loaded))
    assert isinstance(result.rows[0][0], Decimal | float | int)
    assert int(result.rows[0][0]) == int(loaded.t0.timestamp())


def test_range_chooses_the_rollup(loaded: Loaded) -> None:
    # With the 1-minute rollup emptied (in a transaction rolled back afterwards), a short range
    # finds nothing and a long one still reads the 1-hour rollup: each range reads one rollup.
    with psycopg.connect(loaded.url) as conn:
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
            pytest.skip("continuous aggregates cannot be emptied inside a transaction")
        conn.execute("DELETE FROM rollup_samples_1m")
        query = _query(FLEET, "Restarts").text
        short = conn.execute(grafana_sql(query, _context(loaded)).encode()).fetchone()
        long = conn.execute(
            grafana_sql(query, _context(loaded, long_range=True)).encode()
        ).fetchone()
        conn.rollback()
    assert short == (0,)
    assert long == (1,)


def test_fleet_per_plugin_panels_show_the_top_plugins(loaded: Loaded) -> None:
    base = _context(loaded)
    top1 = replace(base, variables={**base.variables, "top": Variable(("1",))})
    assert set(_series(_panel(loaded.url, FLEET, "CPU by plugin", top1))) == {"thumbs"}
    assert set(_series(_panel(loaded.url, FLEET, "Resident memory by plugin", top1))) == {"thumbs"}
    assert set(_series(_panel(loaded.url, FLEET, "CPU p95 by plugin", top1))) == {"thumbs"}
    assert set(_series(_panel(loaded.url, FLEET, "Resident memory p95 by plugin", top1))) == {
        "thumbs"
    }
    # thumbs: 50% CPU and 200 MB in every sample, so every p95 is exactly that.
    p95 = _series(_panel(loaded.url, FLEET, "CPU p95 by plugin", top1))["thumbs"]
    assert set(p95.values()) == {50.0}
    rss95 = _series(_panel(loaded.url, FLEET, "Resident memory p95 by plugin", top1))["thumbs"]
    assert set(rss95.values()) == {200.0 * MB}
    assert set(_series(_panel(loaded.url, FLEET, "Availability by plugin", top1))) == {"resizer"}
    assert set(_series(_panel(loaded.url, FLEET, "Health score by plugin", top1))) == {"resizer"}
    assert [row[0] for row in _panel(loaded.url, FLEET, "Top CPU", top1).rows] == ["thumbs"]
    # An edited URL cannot turn the limit into SQL.
    hostile = replace(
        base, variables={**base.variables, "top": Variable(("1; DROP TABLE plugins",))}
    )
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        _panel(loaded.url, FLEET, "CPU by plugin", hostile)


def test_every_sql_query_runs_with_the_timescaledb_switch_on(loaded: Loaded) -> None:
    # Operators who turn on the data source's TimescaleDB option get time_bucket() from
    # $__timeGroup; the dashboards must work that way too on a TimescaleDB server.
    with psycopg.connect(loaded.url) as conn:
        if not conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
            pytest.skip("the test database has no timescaledb extension")
    context = replace(_context(loaded), timescaledb=True)
    grouped = 0
    for query in _all_sql_queries():
        text = grafana_sql(query.text, context)
        grouped += "time_bucket('60.000s'," in text
        result = _run(loaded.url, query.text, context)
        if query.format == "time_series":
            assert result.rows, query.location
    assert grouped >= 8
    cpu = _panel(loaded.url, PLUGIN, "CPU", context).records()
    assert cpu[0]["time"] == loaded.t0
    assert cpu[0]["cpu_percent_avg"] == pytest.approx(20.0)
    assert len(cpu) == 10
