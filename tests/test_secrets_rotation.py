"""Config and secrets from the command line, as real subprocesses against a real PostgreSQL:
`pluginmon config ...`, `pluginmon secrets rotate|rewrap|retire|status` (10,000 secrets
round-trip through a rotation, a rewrap killed in the middle resumes), and `pluginmon api`
keeping plaintext and key material out of its log."""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pluginmon.registry import crypto
from pluginmon.registry.keyring import read_key_file
from tests.config_helpers import encodings
from tests.daemon_helpers import REPO, run_cli, wait_for
from tests.net_helpers import free_port, stop_process

SECRET_COUNT = 10_000


def _env(url: str, key_file: Path) -> dict[str, str]:
    return {"PLUGINMON_DATABASE_URL": url, "PLUGINMON_SECRET_KEYS_FILE": str(key_file)}


def _cli_env(extra: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINMON_")}
    base.setdefault("XDG_STATE_HOME", "/tmp/pluginmon-cli-test-state")
    base["PYTHONPATH"] = str(REPO)
    return {**base, **extra}


def _plugin(url: str, *, tenant: str = "a", name: str = "gw", schema: Any = None) -> int:
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO tenants (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (tenant, tenant),
        )
        row = conn.execute(
            "INSERT INTO plugins (tenant_id, name, config_schema) VALUES (%s, %s, %s) RETURNING id",
            (tenant, name, None if schema is None else json.dumps(schema)),
        ).fetchone()
        assert row is not None
        return int(row[0])


def test_config_commands(migrated_db: str, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    env = _env(migrated_db, key_file)
    _plugin(
        migrated_db,
        schema={"type": "object", "properties": {"workers": {"type": "integer", "maximum": 8}}},
    )
    created = run_cli("secrets", "rotate", env=env)
    assert created.returncode == 0, created.stderr
    assert "new primary key k1" in created.stdout
    assert key_file.stat().st_mode & 0o777 == 0o600

    bad = run_cli("config", "set", "gw", "workers", "9", "--tenant", "a", env=env)
    assert bad.returncode == 2
    assert "config $.workers must be <= 8" in bad.stderr
    for value in ("2", "4"):
        ok = run_cli("config", "set", "gw", "workers", value, "--tenant", "a", env=env)
        assert ok.returncode == 0, ok.stderr
    assert "config gw/production/workers set: version 2" in ok.stdout
    staging = run_cli(
        "config", "set", "gw", "workers", "1", "--tenant", "a", "--environment", "staging", env=env
    )
    assert staging.returncode == 0, staging.stderr

    plaintext = "cli-secret-" + secrets.token_hex(8)
    piped = subprocess.run(
        [sys.executable, "-m", "pluginmon.daemon.cli", "config", "set", "gw", "token",
         "--stdin", "--string", "--secret", "--tenant", "a"],
        input=plaintext + "\n",
        env=_cli_env(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    assert "encrypted under key k1" in piped.stdout
    assert plaintext not in piped.stdout + piped.stderr

    masked = run_cli("config", "get", "gw", "token", "--tenant", "a", env=env)
    assert masked.stdout.strip() == '"***"'
    revealed = run_cli("config", "get", "gw", "token", "--tenant", "a", "--reveal", env=env)
    assert json.loads(revealed.stdout) == plaintext

    listing = run_cli("config", "list", "gw", "--tenant", "a", "--json", env=env)
    assert [(i["key"], i["value"], i["version"]) for i in json.loads(listing.stdout)] == [
        ("token", "***", 1),
        ("workers", 4, 2),
    ]
    staged = run_cli(
        "config", "list", "gw", "--tenant", "a", "--environment", "staging", "--json", env=env
    )
    assert [(i["key"], i["value"]) for i in json.loads(staged.stdout)] == [("workers", 1)]

    back = run_cli("config", "rollback", "gw", "workers", "1", "--tenant", "a", env=env)
    assert back.returncode == 0, back.stderr
    assert "rolled back to version 1: version 3" in back.stdout
    history = run_cli("config", "history", "gw", "workers", "--tenant", "a", env=env)
    lines = history.stdout.splitlines()
    assert lines[0].split() == ["VERSION", "CURRENT", "CREATED", "BY", "VALUE", "NOTE"]
    assert [line.split()[0] for line in lines[1:]] == ["3", "2", "1"]
    assert lines[1].endswith("rollback of 1")

    wrong_tenant = run_cli("config", "get", "gw", "token", "--tenant", "zz", env=env)
    assert wrong_tenant.returncode == 1
    assert "no tenant 'zz'" in wrong_tenant.stderr
    with psycopg.connect(migrated_db) as conn:
        actions = [
            r[0]
            for r in conn.execute(
                "SELECT action FROM audit_log WHERE entity_type IN ('plugin_config', 'keyring')"
                " ORDER BY id"
            )
        ]
        audit_text = conn.execute("SELECT string_agg(t::text, '') FROM audit_log t").fetchone()
    assert actions == [
        "keyring.rotate",
        "config.set",
        "config.set",
        "config.set",
        "config.set",
        "config.secret.reveal",
        "config.rollback",
    ]
    assert audit_text is not None
    assert plaintext not in audit_text[0]


def _seed_secrets(url: str, keyring: crypto.Keyring) -> dict[tuple[str, str, int], str]:
    """SECRET_COUNT secrets (a tenth with a second version) written the way the API writes
    them, straight into the table; returns (environment, key, version) -> plaintext."""
    plugin_id = _plugin(url)
    plain: dict[tuple[str, str, int], str] = {}
    rows = []
    first_versions = SECRET_COUNT * 9 // 10
    for n in range(SECRET_COUNT):
        i = n if n < first_versions else n - first_versions
        version = 1 if n < first_versions else 2
        environment = "production" if i % 2 else "staging"
        key = f"key{i}"
        text = secrets.token_urlsafe(12)
        blob, key_id = crypto.encrypt(
            keyring,
            json.dumps(text).encode(),
            aad=crypto.secret_aad(tenant_id="a", plugin="gw", environment=environment, key=key),
        )
        plain[(environment, key, version)] = text
        # The version and whether it is current given, as the API gives them on Citus (where
        # sql/100 dropped the version trigger); the trigger elsewhere agrees with them.
        current = version == 2 or i >= SECRET_COUNT - first_versions
        rows.append(("a", plugin_id, environment, key, version, current, True, blob, key_id))
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO plugin_config (tenant_id, plugin_id, environment, key, version,"
            " is_current, is_secret, secret_ciphertext, secret_key_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    return plain


def _under(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(
            conn.execute(
                "SELECT secret_key_id, count(*) FROM plugin_config WHERE is_secret GROUP BY 1"
            ).fetchall()
        )


@pytest.mark.slow
def test_rotate_rewrap_10000_secrets_resumes_after_kill(migrated_db: str, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.json"
    env = _env(migrated_db, key_file)
    assert run_cli("secrets", "rotate", env=env).returncode == 0
    plain = _seed_secrets(migrated_db, read_key_file(key_file))
    assert len(plain) == SECRET_COUNT
    assert _under(migrated_db) == {"k1": SECRET_COUNT}

    rotated = run_cli("secrets", "rotate", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert "new primary key k2" in rotated.stdout
    assert f"{SECRET_COUNT} secret(s) are under older keys" in rotated.stdout
    refused = run_cli("secrets", "retire", "k1", env=env)
    assert refused.returncode == 1
    assert f"key k1 still encrypts {SECRET_COUNT} secret(s)" in refused.stderr

    process = subprocess.Popen(
        [sys.executable, "-m", "pluginmon.daemon.cli", "secrets", "rewrap", "--batch-size", "100"],
        env=_cli_env(env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    blocker = psycopg.connect(migrated_db)
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # printed after the first batch committed
        assert first.strip() == b"100 re-wrapped", first
        # Hold the next batches at their audit entry, then kill the run in the middle.
        blocker.execute("LOCK TABLE audit_log IN EXCLUSIVE MODE")
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        blocker.rollback()
        blocker.close()
        if process.poll() is None:
            stop_process(process)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    halfway = _under(migrated_db)
    assert 100 <= halfway.get("k2", 0) < SECRET_COUNT, halfway
    assert halfway["k2"] % 100 == 0  # whole batches only: the killed one rolled back
    assert sum(halfway.values()) == SECRET_COUNT

    resumed = run_cli("secrets", "rewrap", "--batch-size", "500", env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"re-wrapped {SECRET_COUNT - halfway['k2']} secret(s) to key k2" in resumed.stdout
    assert "0 left under other keys" in resumed.stdout
    assert _under(migrated_db) == {"k2": SECRET_COUNT}

    retired = run_cli("secrets", "retire", "k1", env=env)
    assert retired.returncode == 0, retired.stderr
    status = run_cli("secrets", "status", env=env)
    assert status.returncode == 0, status.stderr
    table = {line.split()[0]: line.split()[1:] for line in status.stdout.splitlines()[2:]}
    assert table["k1"][0] == "retired"
    assert table["k1"][-1] == "0"
    assert table["k2"][0] == "primary"
    assert table["k2"][-1] == str(SECRET_COUNT)

    # Every value decrypts to what was written, under k2 alone (k1 retired).
    keyring = read_key_file(key_file)
    assert keyring.key("k1") is not None
    assert keyring.key("k1").retired  # type: ignore[union-attr]
    with psycopg.connect(migrated_db) as conn:
        rows = conn.execute(
            "SELECT environment, key, version, secret_ciphertext, secret_key_id"
            " FROM plugin_config WHERE is_secret"
        ).fetchall()
        audit_text = conn.execute(
            "SELECT string_agg(details::text, '') FROM audit_log WHERE action = 'config.secret.rewrap'"
        ).fetchone()
    decrypted = {
        (env_, key, version): json.loads(
            crypto.decrypt(
                keyring,
                bytes(blob),
                key_id=key_id,
                aad=crypto.secret_aad(tenant_id="a", plugin="gw", environment=env_, key=key),
                where="test",
            )
        )
        for env_, key, version, blob, key_id in rows
    }
    assert decrypted == plain
    assert audit_text is not None
    assert '"k1": 100' in audit_text[0]
    sample = next(iter(plain.values()))
    assert sample not in audit_text[0]


def test_pluginmon_api_keeps_secrets_out_of_its_log_and_metrics(
    migrated_db: str, tmp_path: Path
) -> None:
    material = base64.b64encode(b"\x07" * 32).decode()
    port = free_port()
    config = tmp_path / "api.toml"
    config.write_text(f'http_host = "127.0.0.1"\nhttp_port = {port}\nlog_level = "DEBUG"\n')
    env = _cli_env(
        {"PLUGINMON_DATABASE_URL": migrated_db, "PLUGINMON_SECRET_KEYS": f"kA:{material}"}
    )
    log = tmp_path / "api.log"
    plaintext = "api-secret-" + secrets.token_hex(8)
    token = run_cli(
        "token", "create", "--tenant", "a", "--role", "admin", "--name", "boss", env=env
    ).stdout.splitlines()[-1]
    _plugin(migrated_db)
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "pluginmon.daemon.cli", "api", "--config", str(config)],
            env=env,
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/api/v1/plugins/gw/config"
    try:
        import urllib.request

        def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
            request.add_header("Authorization", "Bearer " + token)
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return response.status, json.loads(response.read())

        def ready() -> bool:
            try:
                return call("GET", base)[0] == 200
            except OSError:
                return False

        wait_for("pluginmon api to answer", ready, timeout=60)
        status, put = call("PUT", base + "/password", {"value": plaintext, "secret": True})
        assert (status, put["value"], put["encryption_key_id"]) == (200, "***", "kA")
        status, shown = call("GET", base + "/password?reveal=true")
        assert (status, shown["value"]) == (200, plaintext)
        # The process's own /metrics after the write and the reveal, in both formats.
        scraped = b""
        for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept}
            )
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                assert response.status == 200
                scraped += response.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            stop_process(process)
    text = log.read_text()
    assert "secret keyring from PLUGINMON_SECRET_KEYS: primary key kA, 1 key(s)" in text
    assert plaintext not in text
    assert material not in text
    assert (
        b'pluginmon_api_requests_total{code="200",method="GET",'
        b'route="/api/v1/plugins/{name}/config/{key}"} 1.0'
    ) in scraped  # the reveal was counted: the scrape saw the requests
    for form in [*encodings(plaintext), material.encode(), material.rstrip("=").encode()]:
        assert form not in scraped, form
    assert "pluginmon api stopped" in text
