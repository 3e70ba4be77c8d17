"""The `pluginmon` console script as a real subprocess: check-config, --version, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
import pytest

from tests.daemon_helpers import run_cli

GOOD = """
sample_interval_seconds = 5
http_port = 9999
label_discovery = true

[[plugins]]
tenant = "acme"
name = "resizer"
match = { cmdline = "resizer\\\\s+--port" }

[[alerts.rules]]
name = "ResizerCpuHigh"
metric = "cpu_percent"
op = ">"
threshold = 80
for_seconds = 60
severity = "warning"

[[alerts.webhooks]]
url = "https://hooks.example/alerts"
secret = "do-not-print-me"
"""


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("pluginmon ")


def test_check_config_ok(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "configuration OK: 1 plugin(s) + label discovery" in result.stdout
    assert "1 webhook(s)" in result.stdout
    assert "do-not-print-me" not in result.stdout + result.stderr


def test_check_config_without_file_uses_defaults() -> None:
    result = run_cli("check-config")
    assert result.returncode == 0, result.stderr
    assert "0 plugin(s)" in result.stdout


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        """
sample_interval_seconds = -1
http_port = 99999

[[plugins]]
tenant = "acme"
name = "ok"
match = { cmdline = "fine" }

[[plugins]]
tenant = "acme"
name = "broken"
match = { cmdline = "(unclosed" }

[[alerts.rules]]
name = "Bad"
metric = "cpu_percent"
op = "=~"
threshold = 1

[[alerts.webhooks]]
url = "ftp://nope"
secret = "do-not-print-me"
"""
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    err = result.stderr
    assert "sample_interval_seconds: must be > 0" in err
    assert "http_port: must be between 1 and 65535" in err
    assert "plugins[1] (acme/broken).match.cmdline: invalid regex" in err
    assert "alerts.rules[0] (Bad).op" in err
    assert "alerts.webhooks[0].url" in err
    assert "do-not-print-me" not in err + result.stdout


def test_check_config_plugin_problems_alone(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[plugins]]\ntenant = "acme"\nname = "x"\nmatch = {}\n')
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "plugins[0] (acme/x).match" in result.stderr


def test_env_overrides_file_in_check_config(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    result = run_cli(
        "check-config", "--config", str(path), env={"PLUGINMON_SAMPLE_INTERVAL_SECONDS": "0"}
    )
    assert result.returncode == 2
    assert "sample_interval_seconds: must be > 0" in result.stderr


@pytest.mark.parametrize("command", ["run", "migrate", "status", "check-config"])
def test_missing_config_file_exits_2(tmp_path: Path, command: str) -> None:
    result = run_cli(command, "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "--config: no such file" in result.stderr


def test_bad_arguments_exit_2() -> None:
    assert run_cli().returncode == 2
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert run_cli("status", "--bogus").returncode == 2


def test_database_url_password_never_printed(tmp_path: Path) -> None:
    result = run_cli(
        "check-config", env={"PLUGINMON_DATABASE_URL": "mysql://u:hunter2@db.example/x"}
    )
    assert result.returncode == 2
    assert "database_url: must be a postgresql:// URL" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_migrate_unreachable_database_exits_1() -> None:
    # Port 1 on loopback: nothing listens, connection refused at once.
    result = run_cli(
        "migrate",
        env={"PLUGINMON_DATABASE_URL": "postgresql://u:hunter2@127.0.0.1:1/x?connect_timeout=2"},
    )
    assert result.returncode == 1
    assert "pluginmon migrate:" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_migrate_applies_then_finds_nothing(fresh_db: str) -> None:
    first = run_cli("migrate", env={"PLUGINMON_DATABASE_URL": fresh_db})
    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    second = run_cli("migrate", env={"PLUGINMON_DATABASE_URL": fresh_db})
    assert second.returncode == 0, second.stderr
    assert "applied 0 migration(s)" in second.stdout


def test_status_before_any_schema_says_so(fresh_db: str) -> None:
    result = run_cli("status", env={"PLUGINMON_DATABASE_URL": fresh_db})
    assert result.returncode == 1
    assert "no pluginmon schema yet" in result.stderr


def test_status_shows_acknowledged_and_silenced_alerts(migrated_db: str) -> None:
    """Active alerts someone acknowledged or silenced still show, marked; resolved ones do not."""
    with psycopg.connect(migrated_db) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES ('st', 'St')")
        row = conn.execute(
            "INSERT INTO plugins (tenant_id, name, environment) VALUES ('st', 'svc', 'test') "
            "RETURNING id"
        ).fetchone()
        assert row is not None
        plugin_id = row[0]
        for rule, status, inhibited in [
            ("CpuHigh", "firing", False),
            ("MemHigh", "acknowledged", False),
            ("FdsHigh", "silenced", False),
            ("Down", "resolved", False),
            ("Restarts", "pending", False),
            ("Hidden", "firing", True),
        ]:
            conn.execute(
                "INSERT INTO plugin_alerts (tenant_id, plugin_id, environment, rule_name, "
                "fingerprint, severity, status, inhibited, resolved_at) "
                "VALUES ('st', %s, 'test', %s, %s, 'warning', %s, %s, "
                "CASE WHEN %s = 'resolved' THEN now() END)",
                (plugin_id, rule, f"fp-{rule}", status, inhibited, status),
            )
    env = {"PLUGINMON_DATABASE_URL": migrated_db}
    result = run_cli("status", "--json", "--tenant", "st", env=env)
    assert result.returncode == 0, result.stderr
    (status_row,) = json.loads(result.stdout)
    assert status_row["firing_alerts"] == [
        "CpuHigh/warning",
        "FdsHigh/warning (silenced)",
        "MemHigh/warning (acknowledged)",
    ]
    table = run_cli("status", "--tenant", "st", env=env)
    assert table.returncode == 0, table.stderr
    assert "MemHigh/warning (acknowledged)" in table.stdout
    assert "FdsHigh/warning (silenced)" in table.stdout
