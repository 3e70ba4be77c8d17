"""Settings: precedence (env > TOML > defaults), validation naming every field, secrets hidden."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel, ValidationError

from pluginmon.daemon.settings import ConfigError, Settings, load_settings, parse_duration


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PLUGINMON_") and name != "PLUGINMON_TEST_DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", "/tmp/xdg-state-test")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pluginmon.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    settings = load_settings(None)
    assert settings.database_url is None
    assert settings.embedded
    assert settings.sample_interval_seconds == 10
    assert settings.http_port == 9464
    assert settings.http_host == "0.0.0.0"  # noqa: S104
    assert settings.data_dir == Path("/tmp/xdg-state-test/pluginmon")
    assert settings.retention.samples == timedelta(days=90)
    assert settings.retention.metrics == timedelta(days=90)
    assert settings.retention.rollup_1m == timedelta(days=30)
    assert settings.retention.rollup_1h == timedelta(days=365)
    assert settings.retention.operations == timedelta(days=30)
    assert settings.retention.audit == timedelta(days=730)
    assert settings.log_format == "text"
    assert settings.backend == "auto"


def test_data_dir_without_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME")
    assert load_settings(None).data_dir == Path.home() / ".local" / "state" / "pluginmon"


def test_env_overrides_toml_overrides_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        """
sample_interval_seconds = 3
http_port = 9500
log_format = "json"
[retention]
samples = "7d"
audit = "2w"
[alerts]
external_url = "http://from-file"
[[alerts.rules]]
name = "PluginCpuHigh"
metric = "cpu_percent"
op = ">"
threshold = 80
""",
    )
    monkeypatch.setenv("PLUGINMON_SAMPLE_INTERVAL_SECONDS", "0.5")
    monkeypatch.setenv("PLUGINMON_RETENTION__SAMPLES", "36h")
    monkeypatch.setenv("PLUGINMON_ALERTS__EXTERNAL_URL", "http://from-env")
    settings = load_settings(path)
    assert settings.sample_interval_seconds == 0.5  # env
    assert settings.http_port == 9500  # file
    assert settings.log_format == "json"  # file
    assert settings.retention.samples == timedelta(hours=36)  # env, nested
    assert settings.retention.audit == timedelta(weeks=2)  # file, same section kept
    assert settings.retention.operations == timedelta(days=30)  # default
    assert settings.alerts.external_url == "http://from-env"
    assert settings.alerts.rules[0].name == "PluginCpuHigh"  # file, same section kept
    assert settings.http_host == "0.0.0.0"  # noqa: S104 (the default)


def test_every_problem_listed_by_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
sample_interval_seconds = 0
http_port = 70000
log_format = "xml"
smaple_interval = 3
collect_fields = ["uss", "bogus"]
[retention]
audit = "forever"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    problems = info.value.problems
    assert "sample_interval_seconds: must be > 0" in problems
    assert "http_port: must be between 1 and 65535" in problems
    assert any(p.startswith("log_format: ") for p in problems)
    assert "smaple_interval: unknown setting" in problems
    assert any(p.startswith("collect_fields: unknown field(s) bogus") for p in problems)
    assert any(p.startswith("retention.audit: must be a duration") for p in problems)
    assert len(problems) == 6


def test_database_url_and_webhook_secret_never_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path,
        """
[[alerts.webhooks]]
url = "http://hooks.example/a"
secret = "hook-secret-value"
""",
    )
    monkeypatch.setenv("PLUGINMON_DATABASE_URL", "postgresql://u:db-password-value@db/pm")
    settings = load_settings(path)
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert "db-password-value" not in shown
    assert "hook-secret-value" not in shown
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value().endswith("@db/pm")
    assert not settings.embedded


def test_bad_database_url_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGINMON_DATABASE_URL", "mysql://u:leaky@db/x")
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert info.value.problems == ("database_url: must be a postgresql:// URL",)
    assert "leaky" not in str(info.value)


def test_password_only_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'http_auth_username = "prom"\nhttp_auth_password = "p"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.problems[0].startswith("http_auth_password: must not be set in the config")

    path = write(tmp_path, 'http_auth_username = "prom"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.problems[0].startswith("http_auth_username: needs")

    monkeypatch.setenv("PLUGINMON_HTTP_AUTH_PASSWORD", "from-env")
    settings = load_settings(path)
    assert settings.http_auth_password is not None
    assert settings.http_auth_password.get_secret_value() == "from-env"


def test_tls_needs_both_files(tmp_path: Path) -> None:
    path = write(tmp_path, f'http_tls_cert_file = "{tmp_path}/missing.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert any(p.startswith("http_tls_cert_file: set both") for p in info.value.problems)


def test_env_json_error_names_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGINMON_PLUGINS", "[not json")
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert info.value.problems[0].startswith("plugins: cannot parse PLUGINMON_PLUGINS")


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.toml")
    assert info.value.problems[0].startswith("--config: no such file")
    path = write(tmp_path, "sample_interval_seconds = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert "invalid TOML" in info.value.problems[0]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90d", 90 * 86400), ("12h", 43200), ("30m", 1800), ("45s", 45), ("2w", 1209600), (60, 60)],
)
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_settings_is_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.http_port = 1


def _numbers(model: type[BaseModel]) -> list[tuple[str, type]]:
    """The model's int and float fields (optional ones too)."""
    out: list[tuple[str, type]] = []
    for name, field in model.model_fields.items():
        types = get_args(field.annotation) or (field.annotation,)
        for kind in (int, float):
            if kind in types:
                out.append((name, kind))
                break
    return out


# Thresholds are only compared with measurements: finite is their limit, any size is a wish.
_COMPARED_ONLY = {"threshold", "clear_threshold", "warn", "critical"}


def test_every_numeric_setting_has_an_upper_bound() -> None:
    """1e308 (or the largest TOML integer) is refused for every number, naming the field."""
    from pluginmon.daemon.config_backups import BackupSettings, ProviderSettings
    from pluginmon.daemon.config_health import HealthChanges, MetricThresholdTable, WeightsTable
    from pluginmon.daemon.config_plugin_metrics import PluginMetricsTable
    from pluginmon.daemon.config_schema import format_errors
    from pluginmon.daemon.config_sections import AlertmanagerTable, RuleTable, WebhookTable
    from pluginmon.daemon.settings import ApiSettings

    rule = {"name": "R", "metric": "cpu_percent", "op": ">", "threshold": 1}
    metric = {"name": "q", "warn": 1, "critical": 2}
    sections: list[tuple[type[BaseModel], Callable[[dict[str, object]], dict[str, object]], str]]
    sections = [
        (Settings, lambda v: v, ""),
        (WebhookTable, lambda v: {"alerts": {"webhooks": [{"url": "http://x/", **v}]}}, "alerts.webhooks[0]."),
        (AlertmanagerTable, lambda v: {"alerts": {"alertmanager": {"url": "http://x/", **v}}}, "alerts.alertmanager."),
        (RuleTable, lambda v: {"alerts": {"rules": [{**rule, **v}]}}, "alerts.rules[0] (R)."),
        (HealthChanges, lambda v: {"health": v}, "health."),
        (WeightsTable, lambda v: {"health": {"weights": v}}, "health.weights."),
        (MetricThresholdTable, lambda v: {"health": {"metrics": [{**metric, **v}]}}, "health.metrics[0]."),
        # The sections added since (issue 15 asked for a bound on every number).
        (ApiSettings, lambda v: {"api": v}, "api."),
        (BackupSettings, lambda v: {"backups": v}, "backups."),
        (ProviderSettings, lambda v: {"backups": {"providers": {"sftp": v}}}, "backups.providers.sftp."),
        (PluginMetricsTable, lambda v: {"plugin_metrics": v}, "plugin_metrics."),
    ]  # fmt: skip
    checked = []
    for model, values, prefix in sections:
        for name, kind in _numbers(model):
            if name in _COMPARED_ONLY:
                continue
            huge: float = 1e308 if kind is float else 2**63 - 1
            with pytest.raises(ValidationError) as info:
                Settings.model_validate(values({name: huge}))
            located = dict(format_errors(info.value))
            assert f"{prefix}{name}" in located, (name, located)
            assert "must be" in located[f"{prefix}{name}"]
            checked.append(f"{prefix}{name}")
    assert {"sample_interval_seconds", "database_pool_max_size", "spool_max_bytes"} <= set(checked)
    assert "alerts.webhooks[0].timeout_seconds" in checked
    assert "health.memory_limit_bytes" in checked
    assert {"api.max_body_bytes", "backups.verify_batch", "plugin_metrics.max_series"} <= set(
        checked
    )
    assert len(checked) >= 55


def test_file_types_are_strict_and_the_environment_is_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(
        tmp_path, 'http_port = true\nlabel_discovery = 1\n[alerts]\nbuiltin_rules = "no"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert dict(info.value.located) == {
        "http_port": "must be an integer",
        "label_discovery": "must be true or false",
        "alerts.builtin_rules": "must be true or false",
    }
    monkeypatch.setenv("PLUGINMON_HTTP_PORT", "9500")
    monkeypatch.setenv("PLUGINMON_ALERTS__BUILTIN_RULES", "false")
    monkeypatch.setenv("PLUGINMON_HEALTH__CPU_WARN_PERCENT", "50")
    settings = load_settings(None)
    assert (settings.http_port, settings.alerts.builtin_rules) == (9500, False)
    assert settings.health.cpu_warn_percent == 50.0
