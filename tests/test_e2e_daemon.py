"""End to end: `pluginmon run` as a subprocess, real plugin processes, a real PostgreSQL."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from pluginmon.storage.embedded import EmbeddedPostgres
from pluginmon.storage.spool import Spool
from tests.cpu_reference import CLOCK_TICKS_PER_SECOND, CpuRecorder
from tests.daemon_helpers import (
    DaemonProcess,
    WebhookReceiver,
    plugin_processes,
    run_cli,
    sample_rows,
    wait_for,
)
from tests.dbutil import create_database, drop_database, with_database

WEBHOOK_SECRET = "e2e-webhook-secret-value"

RULES = """
[[alerts.rules]]
name = "E2EBurnerBusy"
metric = "cpu_percent"
op = ">"
threshold = 1
for_seconds = 0
severity = "info"
"""


@pytest.fixture
def e2e_db(pg_admin_url: str) -> Iterator[str]:
    """An empty database on the test server: the daemon migrates it itself."""
    name = create_database(pg_admin_url, prefix="e2e")
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


def labels(plugin: str) -> dict[str, str]:
    return {"tenant": "e2e", "plugin": plugin, "environment": "test"}


def test_run_samples_exports_scores_and_stops_on_sigterm(e2e_db: str, tmp_path: Path) -> None:
    with plugin_processes() as plugins, WebhookReceiver() as receiver:
        webhook = f"""
[[alerts.webhooks]]
name = "e2e"
url = "{receiver.url}"
secret = "{WEBHOOK_SECRET}"
"""
        daemon = DaemonProcess(
            tmp_path=tmp_path,
            database_url=e2e_db,
            config_text=plugins.config() + RULES + webhook,
        )
        daemon.start()
        try:
            daemon.wait_ready()
            assert daemon.get("/healthz")[0] == 200

            def enough_samples() -> bool:
                samples = daemon.metric("pluginmon_samples_total") or 0
                health = daemon.metric("pluginmon_plugin_health_score", **labels("burner"))
                return samples >= 16 and health is not None

            wait_for("samples and health scores", enough_samples, timeout=40)
            metrics = daemon.metrics()

            def value(name: str, plugin: str, **extra: str) -> float:
                key = (name, tuple(sorted({**labels(plugin), **extra}.items())))
                assert key in metrics, f"{name} for {plugin} missing"
                return metrics[key]

            # The burner asks for ~30% of a core, but a loaded machine grants what it grants:
            # here it only has to be burning; the amount is checked against /proc below.
            assert value("pluginmon_plugin_cpu_percent", "burner") > 0
            # An idle process: load can only lower its share, never raise it.
            assert value("pluginmon_plugin_cpu_percent", "sleeper") < 5
            assert value("pluginmon_plugin_up", "burner") == 1
            assert value("pluginmon_plugin_processes", "burner") == 1
            assert value("pluginmon_plugin_processes", "sleeper") == 2  # parent + child
            assert value("pluginmon_plugin_memory_rss_bytes", "burner") > 1024 * 1024
            assert value("pluginmon_plugin_threads", "burner") >= 1
            assert 0 <= value("pluginmon_plugin_health_score", "sleeper") <= 100
            assert value("pluginmon_plugin_health_component_score", "burner", component="up") == 100
            assert metrics[("pluginmon_database_up", ())] == 1
            assert metrics[("pluginmon_build_info", (("version", "0.1.0"),))] == 1
            assert (
                value(
                    "pluginmon_alerts_firing", "burner", alertname="E2EBurnerBusy", severity="info"
                )
                == 1
            )

            # The firing alert reached the webhook, signed with the configured secret.
            def firing_posted() -> list[dict[str, object]]:
                out = []
                for headers, body in list(receiver.requests):
                    payload = json.loads(body)
                    names = {a["labels"]["alertname"] for a in payload["alerts"]}
                    if payload["status"] == "firing" and "E2EBurnerBusy" in names:
                        expected = hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256)
                        assert headers["x-pluginmon-signature"] == "sha256=" + expected.hexdigest()
                        out.append(payload)
                return out

            posted = wait_for("the webhook to receive the firing alert", firing_posted)
            assert posted[0]["version"] == "4"
            assert posted[0]["receiver"] == "e2e"

            # The burner's CPU counter, read from /proc every 10 ms while the daemon takes
            # about 12 more sampling cycles: the reference for the stored cpu_percent below.
            with CpuRecorder(plugins.procs[0].pid) as burner_cpu:
                time.sleep(1.0)  # readings before the first sample that the window uses
                window_start = time.time()
                taken = daemon.metric("pluginmon_samples_total") or 0
                daemon.wait_metric(
                    "12 more sampling cycles",
                    lambda v: v >= taken + 24,  # 2 plugins per cycle
                    "pluginmon_samples_total",
                )
                window_end = time.time()
                time.sleep(1.0)  # and after the last one
        except BaseException:
            daemon.kill()
            raise

        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=30) == 0, daemon.log_text()[-3000:]

    counts = daemon.final_counts()
    assert counts["samples_taken"] >= 16
    assert counts["rows_in_spool"] == 0
    # Everything accepted before SIGTERM is in the database: nothing lost, nothing doubled.
    assert sample_rows(e2e_db) == counts["samples_taken"]

    with psycopg.connect(e2e_db) as conn:
        rows = conn.execute(
            """SELECT p.name, count(*), min(s.cpu_percent), max(s.cpu_percent),
                      min(s.rss_bytes), bool_and(s.up), max(s.process_count),
                      min(p.health_score), max(p.last_health_check)
                 FROM plugin_samples s
                 JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id
                WHERE p.tenant_id = 'e2e'
                GROUP BY p.name ORDER BY p.name"""
        ).fetchall()
    by_name = {r[0]: r for r in rows}
    assert set(by_name) == {"burner", "sleeper"}
    burner, sleeper = by_name["burner"], by_name["sleeper"]
    assert burner[1] + sleeper[1] == counts["samples_taken"]
    assert burner[3] > 5  # the burner was seen burning
    assert burner[2] > 0  # in every interval: each sample saw it use CPU
    assert burner[4] > 1024 * 1024  # rss of a Python process
    assert burner[5] is True
    assert sleeper[5] is True
    assert sleeper[6] == 2
    assert burner[7] is not None  # health written to plugins
    assert 0 <= burner[7] <= 100
    assert burner[8] is not None

    # cpu_percent is CPU over the interval since the previous sample, so the stored values
    # times their intervals add up to the CPU the burner used from the sample before the
    # window to the last one in it. The daemon reads /proc during its sample, at most
    # READ_LAG after the sample's timestamp; the recorder bounds the CPU used between the
    # possible read moments from both sides.
    with psycopg.connect(e2e_db) as conn:
        stored = conn.execute(
            """SELECT extract(epoch FROM s."timestamp")::float8, s.cpu_percent
                 FROM plugin_samples s
                 JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id
                WHERE p.tenant_id = 'e2e' AND p.name = 'burner' ORDER BY 1"""
        ).fetchall()
    times = [float(t) for t, _ in stored]
    inside = [i for i, t in enumerate(times) if i > 0 and window_start <= t <= window_end]
    assert len(inside) >= 8, (window_start, window_end, times)
    first, last = inside[0], inside[-1]
    used = sum(
        float(stored[i][1]) / 100 * (times[i] - times[i - 1]) for i in range(first, last + 1)
    )
    read_lag = 0.25
    least, _ = burner_cpu.cpu_between(times[first - 1] + read_lag, times[last])
    _, most = burner_cpu.cpu_between(times[first - 1], times[last] + read_lag)
    tick = 1 / CLOCK_TICKS_PER_SECOND
    assert least - 2 * tick <= used <= most + 2 * tick, (used, least, most)
    assert most > 0.05, "the burner hardly ran: the comparison shows nothing"

    # The test server's password never reaches the log.
    password = urlsplit(e2e_db).password
    log = daemon.log_text()
    if password:
        assert password not in log
    assert WEBHOOK_SECRET not in log
    messages = [r.get("message", "") for r in daemon.log_records()]
    assert any(m.startswith("SIGTERM received") for m in messages)

    # `pluginmon status` reads the same database.
    env = {"PLUGINMON_DATABASE_URL": e2e_db}
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    status = {row["plugin"]: row for row in json.loads(result.stdout)}
    assert set(status) == {"burner", "sleeper"}
    assert status["burner"]["up"] is True
    assert status["burner"]["cpu_percent"] > 0
    assert status["burner"]["rss_bytes"] > 1024 * 1024
    assert status["sleeper"]["processes"] == 2
    assert 0 <= status["burner"]["health_score"] <= 100
    assert status["burner"]["weakest_component"]
    assert "E2EBurnerBusy/info" in status["burner"]["firing_alerts"]
    table = run_cli("status", "--tenant", "e2e", env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["TENANT", "PLUGIN", "ENV", "UP"]
    assert any(line.split()[:4] == ["e2e", "burner", "test", "up"] for line in lines[1:])
    assert "E2EBurnerBusy/info" in table.stdout
    assert run_cli("status", "--tenant", "nobody", env=env).stdout.strip() == (
        "no plugins in the database yet"
    )


def _metric(daemon: DaemonProcess, name: str) -> float:
    try:
        return daemon.metric(name) or 0.0
    except AssertionError:
        return 0.0


@pytest.mark.slow
def test_database_outage_then_sigkill_loses_nothing(tmp_path: Path, server_tmp_dir: Path) -> None:
    """30 s without PostgreSQL: rows spool and replay; a SIGKILLed daemon's spool replays."""
    server = EmbeddedPostgres(server_tmp_dir / "pg")
    url = server.start()
    data_dir = tmp_path / "data"
    try:
        with plugin_processes() as plugins:
            config = plugins.config()
            first = DaemonProcess(
                tmp_path=tmp_path, database_url=url, config_text=config, data_dir=data_dir
            ).start()
            try:
                first.wait_ready()
                first.wait_metric("samples", lambda v: v >= 6, "pluginmon_samples_total")

                server.stop(mode="fast")
                outage_end = time.monotonic() + 30
                spool_peak = 0.0
                database_down_seen = False
                while time.monotonic() < outage_end:
                    first.assert_alive()
                    spool_peak = max(spool_peak, _metric(first, "pluginmon_spool_samples"))
                    database_down_seen |= first.metric("pluginmon_database_up") == 0
                    time.sleep(1)
                assert spool_peak > 0, "nothing went to the spool during the outage"
                assert database_down_seen
                assert first.get("/readyz")[0] == 503

                server.start()
                wait_for(
                    "the spool to drain",
                    lambda: (
                        _metric(first, "pluginmon_spool_samples") == 0
                        and first.metric("pluginmon_database_up") == 1
                    ),
                    timeout=60,
                )
                first.wait_ready()
            except BaseException:
                first.kill()
                raise
            first.signal(signal.SIGTERM)
            assert first.wait_exit(timeout=30) == 0, first.log_text()[-3000:]
            counts = first.final_counts()
            assert counts["rows_in_spool"] == 0
            assert sample_rows(url) == counts["samples_taken"]
            messages = [r.get("message", "") for r in first.log_records()]
            # State changes logged once, not on every tick.
            assert sum(m.startswith("database unreachable") for m in messages) == 1
            assert sum(m == "database recovered" for m in messages) == 1

            # SIGKILL while rows sit in the spool; the next daemon replays them.
            second = DaemonProcess(
                tmp_path=tmp_path,
                database_url=url,
                config_text=config,
                data_dir=data_dir,
                name="second",
            ).start()
            try:
                second.wait_ready()
                server.stop(mode="fast")
                second.wait_metric("rows in the spool", lambda v: v >= 4, "pluginmon_spool_samples")
            finally:
                second.kill()
            # Rows with a plugin id, plus samples taken before the ids were known (the
            # daemon may have been killed before it replayed those).
            with (
                Spool(data_dir / "spool") as spool,
                Spool(data_dir / "spool-unresolved") as unresolved,
            ):
                spooled = spool.rows + unresolved.rows
            assert spooled >= 4

            server.start()
            rows_before = sample_rows(url)
            third = DaemonProcess(
                tmp_path=tmp_path,
                database_url=url,
                config_text=config,
                data_dir=data_dir,
                name="third",
            ).start()
            try:
                third.wait_ready()
                # New samples count in sample_rows too, so the replay is done when both
                # spools are empty as well (the unresolved one replays after its ids).
                wait_for(
                    "the replay",
                    lambda: (
                        sample_rows(url) >= rows_before + spooled
                        and _metric(third, "pluginmon_spool_samples") == 0
                    ),
                )
            except BaseException:
                third.kill()
                raise
            third.signal(signal.SIGTERM)
            assert third.wait_exit(timeout=30) == 0, third.log_text()[-3000:]
            final = third.final_counts()
            assert final["rows_in_spool"] == 0
            assert sample_rows(url) == rows_before + spooled + final["samples_taken"]
    finally:
        server.stop(mode="immediate")


def test_embedded_default_starts_and_stops_its_server(tmp_path: Path, server_tmp_dir: Path) -> None:
    """The README's path: no database URL, a private PostgreSQL under data_dir."""
    data_dir = server_tmp_dir / "state"
    with plugin_processes() as plugins:
        daemon = DaemonProcess(
            tmp_path=tmp_path,
            database_url="",  # unset: the embedded default
            config_text=plugins.config(),
            data_dir=data_dir,
        )
        del daemon.env["PLUGINMON_DATABASE_URL"]
        daemon.start()
        try:
            daemon.wait_ready(timeout=90)
            daemon.wait_metric("samples", lambda v: v >= 4, "pluginmon_samples_total")
            assert daemon.metric("pluginmon_plugin_up", **labels("sleeper")) == 1
            # Samples taken while the embedded server was still being migrated wait in the
            # unresolved spool until the next tick replays them: let it, before SIGTERM.
            daemon.wait_metric("the spools to drain", lambda v: v == 0, "pluginmon_spool_samples")
            # The daemon's own sessions come through the server's Unix socket (client_port
            # -1), this test's through TCP.
            with psycopg.connect(EmbeddedPostgres(data_dir).url(), autocommit=True) as conn:
                ports = [
                    port
                    for (port,) in conn.execute(
                        "SELECT client_port FROM pg_stat_activity"
                        " WHERE datname = 'pluginmon' AND backend_type = 'client backend'"
                        " AND pid <> pg_backend_pid()"
                    )
                ]
            assert ports, "no session of the daemon"
            assert set(ports) == {-1}, ports
        except BaseException:
            daemon.kill()
            EmbeddedPostgres(data_dir).stop(mode="immediate")
            raise
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=60) == 0, daemon.log_text()[-3000:]
    server = EmbeddedPostgres(data_dir)
    assert not server.is_running()  # the daemon stopped the server it started
    counts = daemon.final_counts()
    # `status` starts the stopped embedded server for itself and stops it again.
    result = run_cli("status", "--json", env={"PLUGINMON_DATA_DIR": str(data_dir)})
    assert result.returncode == 0, result.stderr
    rows = {row["plugin"]: row for row in json.loads(result.stdout)}
    assert rows["sleeper"]["processes"] == 2
    assert not server.is_running()
    assert counts["rows_in_spool"] == 0


@pytest.mark.slow
def test_daemon_started_while_database_down_loses_nothing(
    tmp_path: Path, server_tmp_dir: Path
) -> None:
    """The daemon boots with PostgreSQL down and plugins it has never seen: it samples at
    once, every sample goes to disk; SIGTERM while still down leaves them all in the spools;
    the next daemon (started while still down) replays them once the database comes up."""
    server = EmbeddedPostgres(server_tmp_dir / "pg")
    url = server.start()
    server.stop(mode="fast")
    data_dir = tmp_path / "data"
    try:
        with plugin_processes() as plugins:
            config = plugins.config(tenant="fresh")  # no plugins row for these yet
            first = DaemonProcess(
                tmp_path=tmp_path, database_url=url, config_text=config, data_dir=data_dir
            ).start()
            try:
                first.wait_metric(
                    "samples while the database is down",
                    lambda v: v >= 6,
                    "pluginmon_samples_total",
                )
                first.wait_metric("samples on disk", lambda v: v >= 6, "pluginmon_spool_samples")
                assert first.get("/readyz")[0] == 503
            except BaseException:
                first.kill()
                raise
            first.signal(signal.SIGTERM)
            assert first.wait_exit(timeout=60) == 0, first.log_text()[-3000:]
            down = first.final_counts()
            assert down["samples_taken"] >= 6
            # Nothing written, nothing dropped, nothing only in memory: all of it on disk.
            assert down["rows_written"] == 0
            assert down["rows_dropped"] == 0
            assert down["rows_in_spool"] == down["samples_taken"]

            second = DaemonProcess(
                tmp_path=tmp_path,
                database_url=url,
                config_text=config,
                data_dir=data_dir,
                name="second",
            ).start()
            try:
                second.wait_metric(
                    "samples while still down", lambda v: v >= 4, "pluginmon_samples_total"
                )
                server.start()
                second.wait_metric(
                    "the spools to drain", lambda v: v == 0, "pluginmon_spool_samples", timeout=120
                )
                second.wait_ready(timeout=60)
            except BaseException:
                second.kill()
                raise
            second.signal(signal.SIGTERM)
            assert second.wait_exit(timeout=60) == 0, second.log_text()[-3000:]
            up = second.final_counts()
            assert up["rows_in_spool"] == 0
            assert up["rows_dropped"] == 0
            # Every sample either daemon took is in plugin_samples, exactly once.
            assert sample_rows(url) == down["samples_taken"] + up["samples_taken"]
            with psycopg.connect(url) as conn:
                names = conn.execute(
                    "SELECT DISTINCT p.name FROM plugin_samples s "
                    "JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id"
                    " WHERE p.tenant_id = 'fresh'"
                ).fetchall()
            assert {n for (n,) in names} == {"burner", "sleeper"}
    finally:
        server.stop(mode="immediate")


def test_second_daemon_on_the_same_data_dir_exits_1_and_leaves_the_first_alone(
    tmp_path: Path,
    server_tmp_dir: Path,
) -> None:
    """The data_dir lock is taken before the embedded server is started or adopted."""
    data_dir = server_tmp_dir / "state"

    def daemon(name: str) -> DaemonProcess:
        process = DaemonProcess(
            tmp_path=tmp_path, database_url="", config_text="", data_dir=data_dir, name=name
        )
        del process.env["PLUGINMON_DATABASE_URL"]  # the embedded default
        return process

    first = daemon("first").start()
    try:
        first.wait_ready(timeout=90)
        second = daemon("second").start()
        try:
            assert second.wait_exit(timeout=60) == 1
        finally:
            second.kill()
        assert "in use by another pluginmon" in second.log_text()
        assert "embedded PostgreSQL" not in second.log_text()  # it never got that far
        # The first daemon's server is untouched: still up, still ready.
        assert EmbeddedPostgres(data_dir).is_running()
        assert first.get("/readyz")[0] == 200
    except BaseException:
        first.kill()
        EmbeddedPostgres(data_dir).stop(mode="immediate")
        raise
    first.signal(signal.SIGTERM)
    assert first.wait_exit(timeout=60) == 0, first.log_text()[-3000:]
    assert not EmbeddedPostgres(data_dir).is_running()
