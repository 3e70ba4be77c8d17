"""The management commands as real subprocesses: token create/list/revoke, audit verify catching
changes made directly in SQL, and `pluginmon api` serving /api/v1 without sampling."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pluginmon.storage.embedded import EmbeddedPostgres
from tests.daemon_helpers import REPO, run_cli, wait_for
from tests.net_helpers import free_port, stop_process


def _env(url: str) -> dict[str, str]:
    return {"PLUGINMON_DATABASE_URL": url}


def _create(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("token", "create", *args, env=_env(url))


def _token(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    last = result.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith("pmt_")
    assert last.strip() == last
    return last


def _http(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http://127.0.0.1
    if token:
        request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            raw = response.read()
            return response.status, json.loads(raw) if raw.startswith((b"{", b"[")) else raw
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@contextlib.contextmanager
def _pluginmon_api(config: Path, *, database_url: str | None) -> Iterator[subprocess.Popen[bytes]]:
    """``pluginmon api --config CONFIG`` as a process of its own (stderr piped; the database
    of ``database_url``, or the embedded default without one), stopped at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINMON_")}
    if database_url is not None:
        env.update(_env(database_url))
    env["PYTHONPATH"] = str(REPO)
    process = subprocess.Popen(
        [sys.executable, "-m", "pluginmon.daemon.cli", "api", "--config", str(config)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            stop_process(process)
        if process.stderr is not None:
            process.stderr.close()


def _ready(base: str) -> bool:
    try:
        return _http("GET", base + "/readyz")[0] == 200
    except OSError:
        return False


def test_token_create_list_revoke(migrated_db: str) -> None:
    created = _create(migrated_db, "--tenant", "acme", "--role", "writer", "--name", "ci")
    token = _token(created)
    assert "acme" in created.stdout
    operator = _token(_create(migrated_db, "--operator", "--role", "admin", "--name", "ops"))
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT id FROM tenants").fetchall() == [("acme",)]
        rows = conn.execute(
            "SELECT name, tenant_id, role, encode(secret_sha256, 'hex') FROM api_tokens ORDER BY id"
        ).fetchall()
        assert [r[:3] for r in rows] == [("ci", "acme", "writer"), ("ops", None, "admin")]
        # Only hashes: neither token, nor any part of its secret, is stored.
        dump = json.dumps(
            [list(r) for r in conn.execute("SELECT * FROM api_tokens").fetchall()], default=str
        )
        for text in (token, operator):
            assert text[21:] not in dump
        actions = conn.execute(
            "SELECT tenant_id, action, actor FROM audit_log ORDER BY id"
        ).fetchall()
    user_actor = actions[0][2]
    assert user_actor.startswith("cli:")
    assert [a[:2] for a in actions] == [
        ("acme", "tenant.create"),
        ("acme", "token.create"),
        ("_system", "token.create"),
    ]

    listed = run_cli("token", "list", env=_env(migrated_db))
    assert listed.returncode == 0, listed.stderr
    assert "ci" in listed.stdout
    assert "(operator)" in listed.stdout
    assert "pmt_" not in listed.stdout
    as_json = json.loads(run_cli("token", "list", "--json", env=_env(migrated_db)).stdout)
    assert [(t["name"], t["operator"], t["revoked_at"]) for t in as_json] == [
        ("ops", True, None),
        ("ci", False, None),
    ]

    revoked = run_cli("token", "revoke", "ci", env=_env(migrated_db))
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stdout
    again = run_cli("token", "revoke", "ci", env=_env(migrated_db))
    assert (again.returncode, "already revoked" in again.stdout) == (0, True)
    missing = run_cli("token", "revoke", "nobody", env=_env(migrated_db))
    assert missing.returncode == 1
    assert "no token named 'nobody'" in missing.stderr
    listed = run_cli("token", "list", "--tenant", "acme", env=_env(migrated_db))
    assert "revoked" in listed.stdout
    assert "ops" not in listed.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("--tenant", "acme", "--role", "owner", "--name", "x"), 2, "invalid choice"),
        (("--role", "reader", "--name", "x"), 2, "one of the arguments --tenant --operator"),
        (("--tenant", "a", "--operator", "--role", "reader", "--name", "x"), 2, "not allowed"),
        (("--tenant", "Not A Slug", "--role", "reader", "--name", "x"), 2, "--tenant"),
        (("--tenant", "acme", "--role", "reader", "--name", "bad name"), 2, "--name"),
    ],
)
def test_token_create_bad_arguments(
    migrated_db: str, args: tuple[str, ...], code: int, needle: str
) -> None:
    result = _create(migrated_db, *args)
    assert result.returncode == code, result.stdout + result.stderr
    assert needle in result.stderr
    with psycopg.connect(migrated_db) as conn:
        assert conn.execute("SELECT count(*) FROM api_tokens").fetchone() == (0,)


def test_token_names_are_never_reused(migrated_db: str) -> None:
    _token(_create(migrated_db, "--tenant", "acme", "--role", "reader", "--name", "dash"))
    assert run_cli("token", "revoke", "dash", env=_env(migrated_db)).returncode == 0
    again = _create(migrated_db, "--tenant", "acme", "--role", "reader", "--name", "dash")
    assert again.returncode == 1
    assert "exists already" in again.stderr


def _tamper(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as owner, owner.transaction():
        owner.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        for statement in statements:
            owner.execute(statement)
        owner.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")


@pytest.mark.parametrize(
    ("statements", "needle"),
    [
        (
            ("UPDATE audit_log SET actor = 'mallory' WHERE tenant_id = 'acme' AND seq = 3",),
            "entry seq=3 id={ids[3]} was changed",
        ),
        (("DELETE FROM audit_log WHERE tenant_id = 'acme' AND seq = 2",), "entry seq=2 is missing"),
        (
            (
                "UPDATE audit_log SET seq = 1000 WHERE tenant_id = 'acme' AND seq = 2",
                "UPDATE audit_log SET seq = 2 WHERE tenant_id = 'acme' AND seq = 3",
                "UPDATE audit_log SET seq = 3 WHERE tenant_id = 'acme' AND seq = 1000",
            ),
            "entry seq=2 id={ids[3]} does not follow entry seq=1",
        ),
    ],
    ids=["update", "delete", "swap"],
)
def test_audit_verify_names_the_first_bad_entry(
    migrated_db: str, statements: tuple[str, ...], needle: str
) -> None:
    for name in ("one", "two", "three"):
        _token(_create(migrated_db, "--tenant", "acme", "--role", "reader", "--name", name))
    _token(_create(migrated_db, "--tenant", "other", "--role", "reader", "--name", "four"))
    intact = run_cli("audit", "verify", env=_env(migrated_db))
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "tenant acme: intact, 4 entries in 1 chain(s)" in intact.stdout
    with psycopg.connect(migrated_db) as conn:
        rows = conn.execute("SELECT seq, id FROM audit_log WHERE tenant_id = 'acme'").fetchall()
    ids = {int(seq): int(entry_id) for seq, entry_id in rows}
    _tamper(migrated_db, *statements)
    broken = run_cli("audit", "verify", env=_env(migrated_db))
    assert broken.returncode == 1, broken.stdout
    assert "tenant acme: BROKEN: " + needle.format(ids=ids) in broken.stdout
    assert "tenant other: intact" in broken.stdout
    only_other = run_cli("audit", "verify", "--tenant", "other", env=_env(migrated_db))
    assert only_other.returncode == 0
    assert "acme" not in only_other.stdout


def test_pluginmon_api_serves_without_sampling(migrated_db: str, tmp_path: Any) -> None:
    port = free_port()
    config = tmp_path / "api.toml"
    config.write_text(
        f"""
http_host = "127.0.0.1"
http_port = {port}
maintenance_interval_seconds = 1

[[approvals.policies]]
operation_types = ["install"]
environments = ["production"]
required_approvals = 1
expires_after_seconds = 3600
"""
    )
    base = f"http://127.0.0.1:{port}"
    with _pluginmon_api(config, database_url=migrated_db) as process:
        wait_for("pluginmon api to answer /readyz", lambda: _ready(base), timeout=60)
        requester = _token(
            _create(migrated_db, "--tenant", "acme", "--role", "admin", "--name", "ann")
        )
        approver = _token(
            _create(migrated_db, "--tenant", "acme", "--role", "admin", "--name", "bob")
        )
        status, plugin = _http("POST", base + "/api/v1/plugins", requester, {"name": "resizer"})
        assert (status, plugin["installed_by"]) == (201, "ann")
        status, op = _http(
            "POST", base + "/api/v1/plugins/resizer/operations", requester, {"type": "install"}
        )
        assert (status, op["status"]) == (201, "awaiting_approval")
        status, decided = _http(
            "POST",
            base + f"/api/v1/approvals/{op['approval_id']}/decision",
            approver,
            {"decision": "approved"},
        )
        assert (status, decided["status"]) == (200, "approved")
        status, _ = _http("GET", base + "/api/v1/plugins")
        assert status == 401
        status, document = _http("GET", base + "/api/v1/openapi.json")
        assert status == 200
        assert document["openapi"] == "3.1.0"
        status, metrics = _http("GET", base + "/metrics")
        assert status == 200
        assert (
            b'pluginmon_operations_total{status="awaiting_approval",tenant="acme",type="install"} 1.0'
            in metrics
        )
        # Nothing sampled: no sample rows.
        with psycopg.connect(migrated_db) as conn:
            assert conn.execute("SELECT count(*) FROM plugin_samples").fetchone() == (0,)
        assert run_cli("audit", "verify", env=_env(migrated_db)).returncode == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        (
            '[[approvals.policies]]\noperation_types = ["explode"]\n',
            "approvals.policies: [0].operation_types: unknown type 'explode'",
        ),
        (
            "[[approvals.policies]]\nrequired_approvals = 0\n",
            "approvals.policies: [0].required_approvals: must be >= 1",
        ),
        ("[api]\nmax_body_bytes = 10\n", "api.max_body_bytes"),
        ("[api]\nenable = true\n", "api.enable: unknown field"),
    ],
)
def test_check_config_names_bad_api_settings(tmp_path: Any, toml: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2, result.stdout
    assert needle in result.stderr


def test_api_enabled_false_mounts_nothing() -> None:
    from pluginmon.daemon.api_wiring import api_subapps
    from pluginmon.daemon.settings import Settings

    off = Settings(api={"enabled": False})  # type: ignore[arg-type]
    assert api_subapps(off, lambda: None, version="t", metrics=None) == []
    on = api_subapps(Settings(), lambda: None, version="t", metrics=None)
    assert [prefix for prefix, _ in on] == ["/api/v1"]


def test_pluginmon_api_survives_hup_usr1_usr2_and_stops_on_term(
    migrated_db: str, tmp_path: Any
) -> None:
    """Operators send HUP to reload (systemd's ExecReload): it, USR1 and USR2 must not kill
    the API server (they did, exit 129/138); TERM still stops it with exit 0."""
    port = free_port()
    config = tmp_path / "api.toml"
    config.write_text(f'http_host = "127.0.0.1"\nhttp_port = {port}\n')
    base = f"http://127.0.0.1:{port}"
    with _pluginmon_api(config, database_url=migrated_db) as process:
        wait_for("pluginmon api to answer /readyz", lambda: _ready(base), timeout=60)
        for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            process.send_signal(signum)
            # Answering after the signal proves it was handled, not pending.
            wait_for(
                f"pluginmon api to answer after {signum.name}", lambda: _ready(base), timeout=30
            )
            assert process.poll() is None, f"{signum.name} ended pluginmon api"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stderr is not None
        log = process.stderr.read().decode(errors="replace")
        assert "SIGHUP received: pluginmon api reads its configuration at start only" in log
        assert "SIGUSR1 received: ignored" in log
        assert "SIGTERM received: stopping" in log


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        # TEST-NET-1 (RFC 5737): a valid address that is no address of this machine.
        ('http_host = "192.0.2.1"\n', "http_host: cannot listen on 192.0.2.1"),
        (
            'http_tls_cert_file = "{garbage}"\nhttp_tls_key_file = "{garbage}"\n',
            "http_tls_cert_file: {garbage} holds no PEM certificate",
        ),
        # Files the API reads only at first use (a secret, a scan, a verification).
        (
            'secret_keys_file = "/no/such/keys.json"\n',
            "secret_keys_file: no readable file /no/such/keys.json",
        ),
        ('vulnerability_db = "/no/such/osv"\n', "vulnerability_db: no such directory"),
        (
            '[backups.providers.sftp]\nknown_hosts_file = "/no/such/known_hosts"\n',
            "backups.providers.sftp.known_hosts_file: no readable file /no/such/known_hosts",
        ),
    ],
)
def test_pluginmon_api_refuses_what_run_refuses_with_exit_2(
    tmp_path: Any, toml: str, needle: str
) -> None:
    """As `run` and `check-config` do (issue 15: exit 2 naming the field), not exit 1 with
    "[SSL] PEM lib" or "Cannot assign requested address". No database is needed to say so."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    config = tmp_path / "api.toml"
    config.write_text(f'data_dir = "{tmp_path / "state"}"\n' + toml.format(garbage=garbage))
    unreachable = {"PLUGINMON_DATABASE_URL": "postgresql://u@127.0.0.1:1/x?connect_timeout=1"}
    result = run_cli("api", "--config", str(config), env=unreachable)
    assert result.returncode == 2, result.stderr
    assert "invalid configuration" in result.stderr
    assert needle.format(garbage=garbage) in result.stderr
    assert "Traceback" not in result.stderr


def _catches(pid: int, signum: int) -> bool:
    """The process has a handler for ``signum`` (its SigCgt mask in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    line = next((x for x in status.splitlines() if x.startswith("SigCgt:")), "SigCgt: 0")
    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))


def test_pluginmon_api_survives_hup_and_usr1_sent_while_it_starts(
    tmp_path: Any, server_tmp_dir: Path
) -> None:
    """Sent while it starts the embedded database, seconds before its event loop handles
    signals: they used to kill it (129, 138) and leave that server running."""
    port = free_port()
    data_dir = server_tmp_dir / "state"
    config = tmp_path / "api.toml"
    config.write_text(f'data_dir = "{data_dir}"\nhttp_host = "127.0.0.1"\nhttp_port = {port}\n')
    try:
        with _pluginmon_api(config, database_url=None) as process:
            wait_for(
                "the embedded database to be initialised",
                lambda: (
                    (data_dir / "postgres" / "PG_VERSION").exists() or process.poll() is not None
                ),
                timeout=120,
                interval=0.01,
            )
            assert process.poll() is None, f"pluginmon api exited with {process.returncode}"
            assert _catches(process.pid, signal.SIGHUP), "nothing catches SIGHUP while it starts"
            process.send_signal(signal.SIGHUP)
            process.send_signal(signal.SIGUSR1)
            ready = urllib.request.Request(f"http://127.0.0.1:{port}/readyz")

            def answers() -> bool:
                try:
                    with urllib.request.urlopen(ready, timeout=5) as response:  # noqa: S310
                        return bool(response.status == 200)
                except OSError:
                    return process.poll() is not None  # stop polling a dead process

            wait_for("pluginmon api to answer /readyz", answers, timeout=180)
            assert process.poll() is None, (
                f"an early signal ended pluginmon api ({process.returncode})"
            )
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            assert process.stderr is not None
            log = process.stderr.read().decode(errors="replace")
            assert "SIGHUP received: pluginmon api reads its configuration at start only" in log
            assert not EmbeddedPostgres(data_dir).is_running()
    finally:
        server = EmbeddedPostgres(data_dir)
        if (data_dir / "postgres" / "PG_VERSION").exists() and server.is_running():
            server.stop(mode="immediate")
