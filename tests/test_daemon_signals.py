"""Signals: the first SIGTERM/SIGINT stops gracefully, a second one exits at once."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pluginmon.daemon.lifecycle import install_signal_handlers
from pluginmon.daemon.signal_guard import HANDLED_SIGNALS
from pluginmon.storage.embedded import EmbeddedPostgres
from tests.daemon_helpers import (
    REPO,
    DaemonProcess,
    PluginProcesses,
    plugin_processes,
    run_cli,
    sample_rows,
    self_signed_certificate,
    wait_for,
)
from tests.dbutil import create_database, drop_database, with_database
from tests.waiting import wait_until

LABELS_BURNER = {"tenant": "e2e", "plugin": "burner", "environment": "test"}
LABELS_SLEEPER = {"tenant": "e2e", "plugin": "sleeper", "environment": "test"}


async def test_first_signal_stops_second_calls_exit() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    second: list[int] = []
    previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    install_signal_handlers(loop, stop, on_second=second.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
        assert second == []
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(50):
            if second:
                break
            await asyncio.sleep(0.02)
        assert second == [signal.SIGINT]
    finally:
        _restore(loop, previous)


def test_sigint_while_waiting_for_the_database_exits_0(tmp_path: Path) -> None:
    # Nothing listens on port 1: the daemon waits for its database, retrying.
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="postgresql://pluginmon:hunter2@127.0.0.1:1/pluginmon?connect_timeout=2",
        config_text="",
    ).start()
    try:
        wait_for(
            "the daemon to report the database unreachable",
            lambda: any(
                r.get("message", "").startswith("database unreachable at start-up")
                for r in daemon.log_records()
            ),
            timeout=90,  # a daemon's start-up takes over 30 s at load 20
        )
        assert daemon.get("/healthz")[0] == 200  # alive while it waits
        status, text = daemon.get("/readyz")
        assert status == 503
        assert "database unreachable" in text
        daemon.signal(signal.SIGINT)
        assert daemon.wait_exit(timeout=30) == 0
    finally:
        daemon.kill()
    log = daemon.log_text()
    assert "hunter2" not in log
    assert "Traceback" not in log
    messages = [r.get("message", "") for r in daemon.log_records()]
    assert sum(m.startswith("database unreachable at start-up") for m in messages) == 1
    assert any(m.startswith("SIGINT received") for m in messages)


def test_basic_auth_and_tls_from_settings(tmp_path: Path) -> None:
    """The daemon's endpoint with http_auth_* and http_tls_* set, over real HTTPS."""
    cert, key = self_signed_certificate(tmp_path)
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="postgresql://pluginmon:x@127.0.0.1:1/pluginmon?connect_timeout=2",
        config_text=f'http_tls_cert_file = "{cert}"\nhttp_tls_key_file = "{key}"\n'
        'http_auth_username = "prom"\n',
        extra_env={"PLUGINMON_HTTP_AUTH_PASSWORD": "s3cret-pw"},
    ).start()
    context = ssl.create_default_context(cafile=str(cert))

    def get(headers: dict[str, str], path: str = "/metrics") -> int:
        request = urllib.request.Request(f"https://127.0.0.1:{daemon.port}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    token = base64.b64encode(b"prom:s3cret-pw").decode()
    try:
        wait_for("HTTPS to answer", lambda: get({}) == 401, timeout=30)
        assert get({"Authorization": f"Basic {token}"}) == 200
        wrong = base64.b64encode(b"prom:nope").decode()
        assert get({"Authorization": f"Basic {wrong}"}) == 401
        # Probes answer without credentials (http_auth_probes = false by default).
        assert get({}, "/healthz") == 200
        assert get({}, "/readyz") == 503  # no database: not ready, but not 401
        assert daemon.get("/healthz")[0] == 0  # plain HTTP is not served
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=30) == 0
    assert "s3cret-pw" not in daemon.log_text()


def test_second_signal_exits_1_at_once(tmp_path: Path) -> None:
    """DESIGN allows exit codes 0, 1, 2: a forced stop (second signal) is 1, not 128+n."""
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="postgresql://pluginmon:x@127.0.0.1:1/pluginmon?connect_timeout=2",
        config_text="",
    ).start()
    try:
        wait_for("/healthz", lambda: daemon.get("/healthz")[0] == 200, timeout=30)
        assert daemon.proc is not None
        # Two different signals never merge into one pending signal: both are handled.
        os.kill(daemon.proc.pid, signal.SIGTERM)
        os.kill(daemon.proc.pid, signal.SIGINT)
        assert daemon.wait_exit(timeout=30) == 1
    finally:
        daemon.kill()
    _assert_one_stopped_the_other_forced(daemon)


def test_first_sigint_is_a_graceful_exit_0(tmp_path: Path) -> None:
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="postgresql://pluginmon:x@127.0.0.1:1/pluginmon?connect_timeout=2",
        config_text="",
    ).start()
    try:
        wait_for("/healthz", lambda: daemon.get("/healthz")[0] == 200, timeout=30)
        daemon.signal(signal.SIGINT)
        assert daemon.wait_exit(timeout=30) == 0
    finally:
        daemon.kill()
    assert "final counts" in daemon.log_text()


# -- signals early in start-up ------------------------------------------------------------------


def _caught(pid: int, signum: int) -> bool:
    """The process has a handler for ``signum`` (its SigCgt mask in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


def _send_as_soon_as_caught(daemon: DaemonProcess, *signums: int) -> None:
    """Send each signal the moment the daemon can catch it: right after its signal guard is
    installed, hundreds of milliseconds before the old code installed any handler."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    deadline = time.monotonic() + 30
    while not all(_caught(pid, s) for s in signums):
        assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
        assert time.monotonic() < deadline, "the daemon never caught the signals"
        time.sleep(0.001)
    for signum in signums:
        os.kill(pid, signum)


def _postmasters(pgdata: Path) -> list[int]:
    """Pids of PostgreSQL servers running on ``pgdata`` (from the process table)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"postgres") and str(pgdata).encode() in argv:
            found.append(int(proc.name))
    return found


def _embedded_daemon(tmp_path: Path, data_dir: Path, **kw: object) -> DaemonProcess:
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="",
        config_text="",
        data_dir=data_dir,
        **kw,  # type: ignore[arg-type]
    )
    del daemon.env["PLUGINMON_DATABASE_URL"]  # unset: the embedded default
    return daemon


def _assert_no_server_left(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir)
    running = server.is_running()
    pids = _postmasters(server.pgdata)
    if running or pids:
        server.stop(mode="immediate")
    assert not running, "pg_ctl status: the embedded server is still running"
    assert pids == [], f"postgres processes left on {server.pgdata}: {pids}"


def _assert_one_stopped_the_other_forced(daemon: DaemonProcess) -> None:
    """After SIGTERM and SIGINT sent back to back: one began the graceful stop, the other
    forced the exit. Either order: signals both pending when the daemon next runs (a loaded
    host) are delivered lowest number first, SIGINT (2) before SIGTERM (15)."""
    messages = _messages(daemon)
    stopping = [m.split()[0] for m in messages if m.endswith(" received: stopping")]
    forced = [m.split()[1].rstrip(":") for m in messages if m.endswith(": exiting now")]
    assert sorted([*stopping, *forced]) == ["SIGINT", "SIGTERM"], messages


def test_sigterm_first_thing_is_a_graceful_exit_0(tmp_path: Path, server_tmp_dir: Path) -> None:
    """Today's 143: SIGTERM before the handlers are installed. The guard takes it from the
    start, and the daemon leaves without building anything (no embedded server)."""
    data_dir = server_tmp_dir / "state"
    daemon = _embedded_daemon(tmp_path, data_dir).start()
    try:
        _send_as_soon_as_caught(daemon, signal.SIGTERM)
        assert daemon.wait_exit(timeout=60) == 0, daemon.log_text()[-3000:]
    finally:
        daemon.kill()
    messages = [r.get("message", "") for r in daemon.log_records()]
    assert "SIGTERM arrived during start-up" in messages, messages
    assert any(m.startswith("stopped during start-up") for m in messages), messages
    assert not (data_dir / "postgres" / "PG_VERSION").exists()  # never even initialised
    _assert_no_server_left(data_dir)
    assert "Traceback" not in daemon.log_text()


def test_sigterm_while_the_embedded_server_starts_stops_it_exit_0(
    tmp_path: Path, server_tmp_dir: Path
) -> None:
    data_dir = server_tmp_dir / "state"
    daemon = _embedded_daemon(tmp_path, data_dir).start()
    try:
        wait_for(
            "the embedded server's start",
            lambda: any(
                r.get("message", "").startswith("no database_url: using the embedded")
                for r in daemon.log_records()
            ),
            timeout=60,
        )
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=120) == 0, daemon.log_text()[-3000:]
    finally:
        daemon.kill()
    assert (data_dir / "postgres" / "PG_VERSION").exists()  # it was being set up
    messages = [r.get("message", "") for r in daemon.log_records()]
    assert "embedded PostgreSQL stopped" in messages, messages
    _assert_no_server_left(data_dir)


def test_second_signal_while_the_embedded_server_starts_exits_1_and_stops_it(
    tmp_path: Path, server_tmp_dir: Path
) -> None:
    data_dir = server_tmp_dir / "state"
    daemon = _embedded_daemon(tmp_path, data_dir).start()
    try:
        # pg_ctl is starting the server: left alone, it would bring it up after we exit.
        wait_for(
            "pg_ctl start",
            lambda: any(
                r.get("message", "").startswith("starting embedded PostgreSQL on")
                for r in daemon.log_records()
            ),
            timeout=90,
        )
        assert daemon.proc is not None
        os.kill(daemon.proc.pid, signal.SIGTERM)
        os.kill(daemon.proc.pid, signal.SIGINT)
        assert daemon.wait_exit(timeout=120) == 1, daemon.log_text()[-3000:]
    finally:
        daemon.kill()
    _assert_one_stopped_the_other_forced(daemon)
    _assert_no_server_left(data_dir)


def test_early_sighup_usr1_usr2_do_not_kill(tmp_path: Path) -> None:
    """HUP exited 129 and USR1 138 before the handlers were installed."""
    daemon = DaemonProcess(
        tmp_path=tmp_path,
        database_url="postgresql://pluginmon:x@127.0.0.1:1/pluginmon?connect_timeout=2",
        config_text="",
    ).start()
    try:
        _send_as_soon_as_caught(daemon, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
        wait_for(
            "the reload asked for during start-up",
            lambda: any(
                r.get("message", "").startswith("configuration reloaded")
                for r in daemon.log_records()
            ),
            timeout=60,
        )
        daemon.assert_alive()
        assert daemon.get("/healthz")[0] == 200
        assert daemon.proc is not None
        os.kill(daemon.proc.pid, signal.SIGPIPE)
        os.kill(daemon.proc.pid, signal.SIGUSR2)
        os.kill(daemon.proc.pid, signal.SIGHUP)
        wait_for(
            "a second reload",
            lambda: (
                sum(
                    r.get("message", "").startswith("configuration reloaded")
                    for r in daemon.log_records()
                )
                == 2
            ),
            timeout=60,
        )
        daemon.assert_alive()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=60) == 0
    finally:
        daemon.kill()
    messages = [r.get("message", "") for r in daemon.log_records()]
    assert "SIGHUP arrived during start-up" in messages, messages
    assert "configuration reloaded: no changes applied" in messages, messages


# -- SIGHUP and SIGUSR1 on a running daemon -----------------------------------------------------


@pytest.fixture
def e2e_db(pg_admin_url: str) -> Iterator[str]:
    """An empty database on the test server: the daemon migrates it itself."""
    name = create_database(pg_admin_url, prefix="sig")
    try:
        yield with_database(pg_admin_url, name)
    finally:
        drop_database(pg_admin_url, name)


def _plugin(plugins: PluginProcesses, name: str) -> str:
    return f"""
[[plugins]]
tenant = "e2e"
name = "{name}"
environment = "test"
match = {{ cmdline = "{plugins.marker}-{name}$" }}
"""


def _rule(name: str, metric: str, op: str, threshold: float, matchers: str = "") -> str:
    return f"""
[[alerts.rules]]
name = "{name}"
metric = "{metric}"
op = "{op}"
threshold = {threshold}
{matchers}
"""


def _firing(daemon: DaemonProcess, alertname: str, plugin: str = "burner") -> float | None:
    return daemon.metric(
        "pluginmon_alerts_firing",
        tenant="e2e",
        plugin=plugin,
        environment="test",
        alertname=alertname,
        severity="warning",
    )


def _messages(daemon: DaemonProcess) -> list[str]:
    return [str(r.get("message", "")) for r in daemon.log_records()]


def _wait_message(daemon: DaemonProcess, prefix: str, *, count: int = 1) -> list[str]:
    def found() -> list[str]:
        daemon.assert_alive()
        hits = [m for m in _messages(daemon) if m.startswith(prefix)]
        return hits if len(hits) >= count else []

    return wait_for(f"{count} log line(s) starting {prefix!r}", found, timeout=60)


def _plugin_rows(url: str, plugin: str) -> int:
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT count(*) FROM plugin_samples s"
            " JOIN plugins p ON p.tenant_id = s.tenant_id AND p.id = s.plugin_id "
            "WHERE p.tenant_id = 'e2e' AND p.name = %s",
            (plugin,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _alert_rows(url: str) -> dict[str, tuple[int, str, object]]:
    """rule -> (id, status, fired_at) of the e2e burner's newest alert row per rule."""
    with psycopg.connect(url, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT rule_name, id, status, fired_at FROM plugin_alerts "
            "WHERE tenant_id = 'e2e' AND labels->>'plugin' = 'burner' ORDER BY id"
        ).fetchall()
    return {r[0]: (int(r[1]), str(r[2]), r[3]) for r in rows}


def _stop_and_check_nothing_lost(daemon: DaemonProcess, url: str) -> dict[str, object]:
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(timeout=60) == 0, daemon.log_text()[-3000:]
    counts = daemon.final_counts()
    assert counts["rows_in_spool"] == 0
    assert counts["rows_dropped"] == 0
    # Every sample taken, before and after the signals, is in the database exactly once.
    assert sample_rows(url) == counts["samples_taken"]
    return counts


def test_sighup_reloads_plugins_and_rules_and_keeps_restart_settings(
    e2e_db: str, tmp_path: Path
) -> None:
    with plugin_processes() as plugins:
        head = f'database_url = "{e2e_db}"\n[alerts]\nbuiltin_rules = false\n'
        kept_rule = _rule("E2EUp", "up", "==", 1, 'matchers = { plugin = "burner" }')
        daemon = DaemonProcess(
            tmp_path=tmp_path,
            database_url=e2e_db,
            config_text=head
            + _plugin(plugins, "burner")
            + kept_rule
            + _rule("E2ECpu", "cpu_percent", ">=", 0)
            + _rule("E2EGone", "up", "==", 1),
        )
        # The database URL comes from the file, so that a reload can try to change it.
        del daemon.env["PLUGINMON_DATABASE_URL"]
        daemon.start()
        try:
            daemon.wait_ready()
            wait_for(
                "three alerts firing for the burner",
                lambda: all(_firing(daemon, n) == 1 for n in ("E2EUp", "E2ECpu", "E2EGone")),
            )
            assert daemon.metric("pluginmon_plugin_up", **LABELS_SLEEPER) is None
            # Alerts are evaluated from the first sample, before the plugin has a database
            # id; their rows follow once it has one (a cycle or so later).
            before = wait_for(
                "the three alerts' rows in plugin_alerts",
                lambda: rows if len(rows := _alert_rows(e2e_db)) == 3 else None,
            )
            assert {r: before[r][1] for r in before} == {
                "E2EUp": "firing",
                "E2ECpu": "firing",
                "E2EGone": "firing",
            }
            loaded_at = daemon.metric("pluginmon_config_last_reload_success_timestamp_seconds")
            assert loaded_at is not None
            assert daemon.metric("pluginmon_config_last_reload_successful") == 1

            # A new plugin, E2ECpu's threshold out of reach, E2EGone removed, and a
            # database_url that would lose every sample if it were taken.
            daemon.config_path.write_text(
                'database_url = "postgresql://nobody:n0t-this-one@127.0.0.1:1/elsewhere"\n'
                "[alerts]\nbuiltin_rules = false\n"
                + _plugin(plugins, "burner")
                + _plugin(plugins, "sleeper")
                + kept_rule
                + _rule("E2ECpu", "cpu_percent", ">=", 1e12)
            )
            daemon.signal(signal.SIGHUP)
            (reloaded,) = _wait_message(daemon, "configuration reloaded:")
            assert reloaded == (
                "configuration reloaded: plugins +e2e/sleeper/test; rules -E2EGone ~E2ECpu; "
                "not applied until a restart: database_url"
            )
            (restart,) = _wait_message(daemon, "changed settings that need a restart")
            assert restart.endswith(": database_url")

            wait_for(
                "the new plugin in /metrics",
                lambda: daemon.metric("pluginmon_plugin_up", **LABELS_SLEEPER) == 1,
            )
            wait_for(
                "the new plugin's samples in the database", lambda: _plugin_rows(e2e_db, "sleeper")
            )
            wait_for(
                "the changed and the removed rule's alerts to resolve",
                lambda: _firing(daemon, "E2ECpu") is None and _firing(daemon, "E2EGone") is None,
            )
            assert _firing(daemon, "E2EUp") == 1
            assert daemon.metric("pluginmon_config_last_reload_successful") == 1
            reloaded_at = daemon.metric("pluginmon_config_last_reload_success_timestamp_seconds")
            assert reloaded_at is not None
            assert reloaded_at > loaded_at
            # Still writing to the database it started with.
            rows = sample_rows(e2e_db)
            wait_for("more rows in the first database", lambda: sample_rows(e2e_db) > rows)
        except BaseException:
            daemon.kill()
            raise
        _stop_and_check_nothing_lost(daemon, e2e_db)

    after = _alert_rows(e2e_db)
    # The kept rule's alert is the same one, still firing since the same moment.
    assert after["E2EUp"] == before["E2EUp"]
    assert after["E2ECpu"][0] == before["E2ECpu"][0]
    assert after["E2ECpu"][1] == "resolved"
    assert after["E2EGone"][0] == before["E2EGone"][0]
    assert after["E2EGone"][1] == "resolved"
    assert "n0t-this-one" not in daemon.log_text()


def test_sighup_with_an_invalid_file_keeps_the_running_configuration(
    e2e_db: str, tmp_path: Path
) -> None:
    with plugin_processes() as plugins:
        config = plugins.config()
        daemon = DaemonProcess(tmp_path=tmp_path, database_url=e2e_db, config_text=config)
        daemon.start()
        try:
            daemon.wait_ready()
            daemon.wait_metric("samples", lambda v: v >= 4, "pluginmon_samples_total")
            daemon.config_path.write_text(
                "maintenance_interval_seconds = inf\n"
                + config
                + _plugin(plugins, "broken").replace(f"{plugins.marker}-broken$", "(unclosed")
                + _rule("Bad", "up", "=~", 1)
            )
            env = {k: v for k, v in daemon.env.items() if k.startswith("PLUGINMON_")}
            check = run_cli("check-config", "--config", str(daemon.config_path), env=env)
            assert check.returncode == 2, check.stderr
            expected = [line.strip() for line in check.stderr.splitlines() if line.startswith("  ")]
            assert len(expected) == 3, check.stderr

            daemon.signal(signal.SIGHUP)
            _wait_message(daemon, "configuration reload refused, 3 problem(s)")
            logged = [
                m.removeprefix("invalid configuration: ")
                for m in _messages(daemon)
                if m.startswith("invalid configuration: ")
            ]
            assert logged == expected  # the same located problems as check-config's
            assert daemon.metric("pluginmon_config_last_reload_successful") == 0
            taken = daemon.metric("pluginmon_samples_total") or 0
            daemon.wait_metric(
                "sampling to go on with the old plugins",
                lambda v: v >= taken + 4,
                "pluginmon_samples_total",
            )
            assert daemon.metric("pluginmon_plugin_up", **LABELS_SLEEPER) == 1
            assert daemon.metric("pluginmon_plugin_up", **LABELS_BURNER) == 1

            # Fixed, without the sleeper: the next SIGHUP succeeds, the metric says so, and
            # the sleeper leaves /metrics at once instead of showing as down for minutes.
            daemon.config_path.write_text(_plugin(plugins, "burner"))
            daemon.signal(signal.SIGHUP)
            _wait_message(daemon, "configuration reloaded: plugins -e2e/sleeper/test")
            assert daemon.metric("pluginmon_config_last_reload_successful") == 1
            wait_for(
                "the removed plugin to leave /metrics",
                lambda: daemon.metric("pluginmon_plugin_up", **LABELS_SLEEPER) is None,
                timeout=10,  # plugin_grace_seconds is 300: this is not the grace period
            )
            assert daemon.metric("pluginmon_plugin_up", **LABELS_BURNER) == 1
        except BaseException:
            daemon.kill()
            raise
        _stop_and_check_nothing_lost(daemon, e2e_db)


def test_sigusr1_logs_the_state_and_changes_nothing(e2e_db: str, tmp_path: Path) -> None:
    with plugin_processes() as plugins:
        daemon = DaemonProcess(
            tmp_path=tmp_path,
            database_url=e2e_db,
            config_text="[alerts]\nbuiltin_rules = false\n"
            + plugins.config()
            + _rule("E2EUp", "up", "==", 1, 'matchers = { plugin = "burner" }'),
        )
        daemon.start()
        try:
            daemon.wait_ready()
            wait_for("the burner's alert", lambda: _firing(daemon, "E2EUp") == 1)
            daemon.signal(signal.SIGUSR1)
            _wait_message(daemon, "state (SIGUSR1):")
            (summary,) = [r for r in daemon.log_records() if "plugins_sampled" in r]
            assert summary["plugins_sampled"] == 2
            assert summary["plugins_up"] == 2
            assert summary["database"] == "up"
            assert summary["alerts_firing"] == 1
            assert summary["alerts_open"] == 1
            assert isinstance(summary["spool_rows"], int)
            assert summary["samples_so_far"] >= 2
            assert summary["config_reload"] == "last reload ok"
            assert "sample " in summary["message"]
            assert "flush " in summary["message"]

            # USR1 again, with USR2 and SIGPIPE, which are ignored: still sampling.
            assert daemon.proc is not None
            for signum in (signal.SIGUSR2, signal.SIGPIPE, signal.SIGUSR1):
                os.kill(daemon.proc.pid, signum)
            _wait_message(daemon, "state (SIGUSR1):", count=2)
            taken = daemon.metric("pluginmon_samples_total") or 0
            daemon.wait_metric("more samples", lambda v: v >= taken + 4, "pluginmon_samples_total")
        except BaseException:
            daemon.kill()
            raise
        _stop_and_check_nothing_lost(daemon, e2e_db)
    messages = _messages(daemon)
    assert sum(m.startswith("state (SIGUSR1):") for m in messages) == 2
    assert not any(m.startswith("configuration reload") for m in messages)


# -- the handlers themselves --------------------------------------------------------------------


async def test_hup_usr1_usr2_reach_their_callbacks_and_stop_nothing() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    calls: list[str] = []
    previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
    install_signal_handlers(
        loop,
        stop,
        on_second=lambda _: calls.append("second"),
        on_reload=lambda: calls.append("reload"),
        on_summary=lambda: calls.append("summary"),
    )
    try:
        for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(os.getpid(), signum)
        await wait_until(
            lambda: sorted(calls) == ["reload", "summary"],
            timeout_seconds=5,
            what="SIGHUP and SIGUSR1 to be handled",
        )
        os.kill(os.getpid(), signal.SIGQUIT)  # a stop signal like SIGTERM
        await asyncio.wait_for(stop.wait(), 5)
        assert sorted(calls) == ["reload", "summary"]
    finally:
        _restore(loop, previous)


def _restore(loop: asyncio.AbstractEventLoop, previous: Mapping[signal.Signals, Any]) -> None:
    # remove_signal_handler resets to the kernel's default: put pytest's own back (None:
    # a handler set outside Python, which cannot be put back; the default it is).
    for signum, handler in previous.items():
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def test_guard_records_and_a_second_stop_forces_exit_1() -> None:
    """In a real process: what arrives before the loop is kept in order (HUPs merged, USR2
    ignored, SIGPIPE ignored), and a second stop signal exits 1 at once."""
    script = """
import os, signal
from pluginmon.daemon.signal_guard import SignalGuard
guard = SignalGuard()
guard.install()
for s in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGHUP,
          signal.SIGTERM):
    os.kill(os.getpid(), s)
print(",".join(signal.Signals(s).name for s in guard.take()), flush=True)
os.kill(os.getpid(), signal.SIGINT)   # the first stop since take(): recorded
print("still here", flush=True)
os.kill(os.getpid(), signal.SIGQUIT)  # the second: exit 1
print("not reached", flush=True)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.splitlines() == ["SIGHUP,SIGUSR1,SIGTERM", "still here"], result
    assert result.returncode == 1, result
