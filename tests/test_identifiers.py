"""Identifiers from requests, the command line and the config file match their rule as a whole:
``re.match`` with a ``$``-anchored pattern also accepts a trailing newline ("resizer\\n"),
which then reached the database, the audit log and log lines (issue 15's "a newline in a
label forges a log line", for the names the registry and the config take)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pluginmon.daemon.config_schema import ConfigError
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.daemon.settings import check_host
from pluginmon.registry import alert_actions, backups, config_values, plugin_metrics, plugins
from pluginmon.registry.errors import InvalidError
from pluginmon.registry.tokens import check_tenant_slug

CHECKS: dict[str, tuple[Callable[[str], object], str]] = {
    "plugin name": (plugins.check_name, "resizer"),
    "environment": (plugins.check_environment, "production"),
    "pushed metrics' environment": (plugin_metrics.check_environment, "production"),
    "config key": (config_values.check_key, "timeout"),
    "tenant": (check_tenant_slug, "acme"),
    "silence matcher label": (lambda name: alert_actions.check_matchers({name: "*"}), "alertname"),
    "backup checksum": (backups.check_sha256, "0" * 64),
}


@pytest.mark.parametrize("case", list(CHECKS))
def test_a_trailing_newline_is_refused(case: str) -> None:
    check, valid = CHECKS[case]
    check(valid)  # the positive control
    for forged in (valid + "\n", valid + "\nforged"):
        with pytest.raises(InvalidError):
            check(forged)


RULE = {"name": "CpuHigh", "metric": "cpu_percent", "op": ">", "threshold": 80.0}


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"name": "CpuHigh\n"}, "alerts.rules[0] (CpuHigh\n).name"),
        ({"metric": "cpu_percent\n"}, "alerts.rules[0] (CpuHigh).metric"),
        ({"labels": {"team\n": "core"}}, "alerts.rules[0] (CpuHigh).labels.team\n"),
    ],
)
def test_config_names_with_a_trailing_newline_are_refused(
    override: dict[str, object], field: str
) -> None:
    assert [r.name for r in parse_rules([RULE], include_builtins=False)] == ["CpuHigh"]
    with pytest.raises(ConfigError) as raised:
        parse_rules([{**RULE, **override}], include_builtins=False)
    assert [where for where, _ in raised.value.located] == [field]


def test_http_host_with_a_trailing_newline_is_refused() -> None:
    assert check_host("localhost") == "localhost"
    with pytest.raises(ValueError, match="is not an IP address or a host name"):
        check_host("localhost\n")
