"""Configuration reload: what a reload applies, what waits for a restart, the reloader's
bookkeeping and metrics, and the alert engine's state across a change of rules.

Configurations are real TOML files loaded as ``run`` loads them; the engine runs on the real
database with an injected clock. The daemon as a whole, with real signals, is in
test_daemon_signals.py.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.health import HealthConfig
from pluginmon.alerts.rules import WebhookConfig
from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.config import (
    LIVE_SETTINGS,
    DaemonConfig,
    load,
    restart_needed,
    with_live_sections,
)
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.daemon.reload import ConfigChanges, ConfigReloader, config_changes
from pluginmon.daemon.settings import Settings
from pluginmon.storage import alert_state
from tests.alerts_helpers import FakeClock, plugin_ids, plugin_sample, snapshot
from tests.waiting import wait_until

BASE = """
sample_interval_seconds = 5
[[plugins]]
tenant = "acme"
name = "resizer"
match = {{ cmdline = "resizer" }}
{more_plugins}
[[alerts.rules]]
name = "CpuHigh"
metric = "cpu_percent"
op = ">"
threshold = {threshold}
{more_rules}
"""
SECOND_PLUGIN = """
[[plugins]]
tenant = "acme"
name = "thumbnailer"
match = { cmdline = "thumbnailer" }
"""
SECOND_RULE = """
[[alerts.rules]]
name = "Down"
metric = "up"
op = "=="
threshold = 0
"""


def write(
    path: Path,
    *,
    threshold: float = 80,
    more_plugins: str = "",
    more_rules: str = "",
    extra: str = "",
    tables: str = "",
) -> Path:
    """The base configuration; ``extra`` top-level keys, ``tables`` more tables at the end."""
    data_dir = path.parent / "data"
    text = f'data_dir = "{data_dir}"\nproc_root = "/proc"\n{extra}\n'
    text += BASE.format(threshold=threshold, more_plugins=more_plugins, more_rules=more_rules)
    text += tables
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _no_pluginmon_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The test's own PLUGINMON_* variables (a test database URL) are not the daemon's.
    import os

    for name in list(os.environ):
        if name.startswith("PLUGINMON_"):
            monkeypatch.delenv(name)


# -- what changed ---------------------------------------------------------------------------


def test_changes_name_what_a_reload_applies_and_what_needs_a_restart(tmp_path: Path) -> None:
    path = write(tmp_path / "pluginmon.toml", more_rules=SECOND_RULE)
    running = load(path)
    write(
        path,
        threshold=90,
        more_plugins=SECOND_PLUGIN,
        more_rules=SECOND_RULE,
        extra='database_url = "postgresql://u:hunter2@db.example/x"\nhttp_port = 9999\n',
        tables="[retention]\nsamples = '30d'\n",
    )
    loaded = load(path)

    changes = config_changes(running, loaded)
    assert changes.plugins.added == ("acme/thumbnailer/production",)
    assert (changes.plugins.removed, changes.plugins.changed) == ((), ())
    assert changes.removed_plugins == frozenset()
    assert changes.rules.changed == ("CpuHigh",)
    assert (changes.rules.added, changes.rules.removed) == ((), ())
    assert not changes.receivers
    assert not changes.health
    assert not changes.external_url
    assert changes.needs_restart == ("database_url", "retention.samples", "http_port")
    text = changes.describe()
    assert text == (
        "plugins +acme/thumbnailer/production; rules ~CpuHigh; not applied until a restart: "
        "database_url, retention.samples, http_port"
    )
    assert "hunter2" not in text

    # What the daemon runs on: the new live sections, the old value of everything else.
    effective = with_live_sections(running, loaded)
    assert [p.key.plugin for p in effective.plugins] == ["resizer", "thumbnailer"]
    assert next(r for r in effective.rules if r.name == "CpuHigh").threshold == 90
    assert [p.name for p in effective.settings.plugins] == ["resizer", "thumbnailer"]
    assert effective.settings.database_url is None
    assert effective.settings.http_port == running.settings.http_port
    assert effective.retention == running.retention
    assert restart_needed(running.settings, effective.settings) == ()


def test_the_operations_guide_names_every_setting_that_needs_a_restart() -> None:
    """docs/operations.md lists the settings a reload does not apply; a section added to
    Settings (api, approvals, backups, ...) must be named there too, by name, as a [table]
    or by a pattern such as `flush_*`."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    paragraph = text.split("Every other setting needs a restart:", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([^`]+)`", paragraph))
    missing = [
        field
        for field in Settings.model_fields
        if field not in LIVE_SETTINGS
        and f"[{field}]" not in named
        and f"[[{field}.policies]]" not in named
        and not any(fnmatch.fnmatchcase(field, name) for name in named)
    ]
    assert missing == []


def test_removed_plugin_rule_and_receiver_and_reordering(tmp_path: Path) -> None:
    path = tmp_path / "pluginmon.toml"
    hook = '[[alerts.webhooks]]\nname = "{}"\nurl = "http://127.0.0.1:1/hook"\n'
    running = load(
        write(path, more_plugins=SECOND_PLUGIN, more_rules=SECOND_RULE, tables=hook.format("ops"))
    )
    loaded = load(
        write(
            path,
            more_plugins=SECOND_PLUGIN,
            more_rules=SECOND_RULE.replace('"Down"', '"Gone"')
            + "[health]\ncpu_warn_percent = 50\n",
            tables=hook.format("pager"),
        )
    )
    changes = config_changes(running, loaded)
    assert (changes.rules.added, changes.rules.removed) == (("Gone",), ("Down",))
    assert (changes.receivers.added, changes.receivers.removed) == (("pager",), ("ops",))
    assert changes.health
    assert changes.alerting
    assert not changes.plugins

    # The first matching [[plugins]] entry wins: a change of order is a change.
    resizer = '[[plugins]]\ntenant = "acme"\nname = "resizer"\nmatch = { cmdline = "resizer" }\n'
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n{SECOND_PLUGIN}{resizer}')
    reordered = config_changes(running, load(path))
    assert reordered.plugins.reordered
    assert (reordered.plugins.added, reordered.plugins.removed) == ((), ())
    assert reordered.plugins.describe("plugins") == "plugins reordered"

    dropped = config_changes(running, load(write(path)))
    assert dropped.removed_plugins == frozenset({OTHER})
    assert dropped.plugins.describe("plugins") == "plugins -acme/thumbnailer/production"


def test_unchanged_file_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "pluginmon.toml")
    changes = config_changes(load(path), load(path))
    assert changes.describe() == "no changes applied"
    assert not changes.alerting
    assert not changes.plugins
    assert changes.needs_restart == ()


# -- the reloader -------------------------------------------------------------------------------


def _metrics(reloader: ConfigReloader) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(reloader)
    return {
        name: registry.get_sample_value(name) or 0.0
        for name in (
            "pluginmon_config_last_reload_successful",
            "pluginmon_config_last_reload_success_timestamp_seconds",
        )
    }


async def test_reloader_applies_refuses_and_exports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "pluginmon.toml")
    now = [1000.0]
    reloader = ConfigReloader(config_path=path, running=load(path), wall_clock=lambda: now[0])
    applied: list[tuple[DaemonConfig, ConfigChanges]] = []

    async def apply(config: DaemonConfig, changes: ConfigChanges) -> None:
        applied.append((config, changes))

    assert _metrics(reloader) == {
        "pluginmon_config_last_reload_successful": 1.0,
        "pluginmon_config_last_reload_success_timestamp_seconds": 1000.0,
    }
    # Asked before the daemon can apply anything: done once it can.
    write(path, more_plugins=SECOND_PLUGIN)
    reloader.request()
    assert applied == []
    now[0] = 1010.0
    reloader.attach(apply)
    await wait_until(lambda: applied, timeout_seconds=30, what="the deferred reload")
    assert [p.key.plugin for p in applied[0][0].plugins] == ["resizer", "thumbnailer"]
    assert [p.key.plugin for p in reloader.running.plugins] == ["resizer", "thumbnailer"]
    assert _metrics(reloader)["pluginmon_config_last_reload_success_timestamp_seconds"] == 1010.0

    # An invalid file: every problem logged as check-config words it, nothing applied.
    write(
        path,
        more_plugins=SECOND_PLUGIN.replace('cmdline = "thumbnailer"', 'cmdline = "(a"'),
        more_rules='[[alerts.rules]]\nname = "Bad"\nmetric = "up"\nop = "=~"\nthreshold = 1\n',
        extra="http_port = true",
    )
    now[0] = 1020.0
    with caplog.at_level(logging.INFO, logger="pluginmon.daemon.reload"):
        assert await reloader.reload() is False
    problems = [
        r.getMessage().removeprefix("invalid configuration: ")
        for r in caplog.records
        if r.getMessage().startswith("invalid configuration: ")
    ]
    assert len(problems) == 3, problems
    assert any(p.startswith("http_port: must be an integer") for p in problems), problems
    assert any(p.startswith("plugins[1] (acme/thumbnailer).match.cmdline:") for p in problems)
    assert any(p.startswith("alerts.rules[1] (Bad).op: must be one of") for p in problems)
    assert len(applied) == 1
    assert [p.key.plugin for p in reloader.running.plugins] == ["resizer", "thumbnailer"]
    assert _metrics(reloader) == {
        "pluginmon_config_last_reload_successful": 0.0,
        "pluginmon_config_last_reload_success_timestamp_seconds": 1010.0,
    }
    assert not reloader.last_reload_successful

    # Fixed again: success, and the metric says so.
    write(path)
    now[0] = 1030.0
    assert await reloader.reload() is True
    assert applied[-1][1].plugins.removed == ("acme/thumbnailer/production",)
    assert _metrics(reloader) == {
        "pluginmon_config_last_reload_successful": 1.0,
        "pluginmon_config_last_reload_success_timestamp_seconds": 1030.0,
    }
    await reloader.aclose()


async def test_requests_during_a_reload_make_one_more(tmp_path: Path) -> None:
    path = write(tmp_path / "pluginmon.toml")
    reloader = ConfigReloader(config_path=path, running=load(path))
    release = asyncio.Event()
    seen: list[int] = []

    async def slow_apply(config: DaemonConfig, changes: ConfigChanges) -> None:
        seen.append(len(config.plugins))
        await release.wait()

    reloader.attach(slow_apply)
    reloader.request()
    await wait_until(lambda: seen, timeout_seconds=30, what="the first reload to apply")
    write(path, more_plugins=SECOND_PLUGIN)
    for _ in range(3):
        reloader.request()  # three while the first runs: one more, with the latest file
    release.set()
    await wait_until(lambda: len(seen) == 2, timeout_seconds=30, what="the second reload")
    await wait_until(
        lambda: not [t for t in asyncio.all_tasks() if t.get_name() == "config-reload"],
        timeout_seconds=30,
        what="the reload task to finish",
    )
    assert seen == [1, 2]
    await reloader.aclose()


# -- the alert engine across a reload ----------------------------------------------------------

KEY = PluginKey("acme", "resizer", "production")
OTHER = PluginKey("acme", "thumbnailer", "production")


def _rules(cpu_threshold: float, *, down: bool = True, cpu_severity: str = "warning") -> list:  # type: ignore[type-arg]
    rules = [
        {
            "name": "CpuHigh",
            "metric": "cpu_percent",
            "op": ">",
            "threshold": cpu_threshold,
            "severity": cpu_severity,
        },
        {"name": "Busy", "metric": "cpu_percent", "op": ">", "threshold": 1, "for_seconds": 60},
    ]
    if down:
        rules.append({"name": "Running", "metric": "up", "op": "==", "threshold": 1})
    return list(parse_rules(rules, include_builtins=False))


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(migrated_db, min_size=1, max_size=4) as p:
        yield p


async def test_engine_reconfigure_keeps_state_of_kept_rules_and_closes_the_others(
    pool: asyncpg.Pool,
) -> None:
    clock = FakeClock()
    hook = WebhookConfig(name="ops", url="http://127.0.0.1:1/hook")
    engine = AlertEngine(pool, _rules(50), clock=clock, webhooks=[hook])
    await engine.start()
    ids = await plugin_ids(pool, [KEY, OTHER])

    async def cycle(cpu: float) -> list[str]:
        samples = [plugin_sample(KEY, clock(), cpu=cpu), plugin_sample(OTHER, clock(), cpu=2)]
        report = await engine.process(snapshot(clock(), samples), ids)
        return sorted(f"{rule}:{key.plugin}:{kind}" for rule, key, kind in report.transitions)

    assert await cycle(70) == [
        "Busy:resizer:pending",
        "Busy:thumbnailer:pending",
        "CpuHigh:resizer:firing",
        "Running:resizer:firing",
        "Running:thumbnailer:firing",
    ]
    before = {(a.alertname, a.key.plugin): a for a in engine.alerts()}
    clock.advance(30)

    # Busy unchanged, CpuHigh's threshold raised above the value, Running removed.
    closed = engine.reconfigure(
        _rules(90, down=False),
        health_config=HealthConfig(),
        webhooks=[hook],
        alertmanager=None,
        external_url="",
    )
    assert closed == 2  # both Running alerts, resolved
    after = {(a.alertname, a.key.plugin): a for a in engine.alerts()}
    assert set(after) == {("CpuHigh", "resizer"), ("Busy", "resizer"), ("Busy", "thumbnailer")}
    for name in after:  # the same alerts, not new ones
        assert after[name].fingerprint == before[name].fingerprint
        assert after[name].started_at == before[name].started_at
    assert after[("CpuHigh", "resizer")].status == "firing"
    assert after[("Busy", "resizer")].status == "pending"

    # The next cycle: CpuHigh resolves under its new threshold; Busy, pending for 30 s
    # before the reload, fires 60 s after it started, not 60 s after the reload.
    clock.advance(30)
    assert await cycle(70) == [
        "Busy:resizer:firing",
        "Busy:thumbnailer:firing",
        "CpuHigh:resizer:resolved",
    ]
    async with pool.acquire() as conn:
        rows = {(r.rule_name, r.labels["plugin"]): r for r in await alert_state.load_alerts(conn)}
        outbox = await conn.fetch("SELECT body FROM notification_outbox ORDER BY id")
    assert rows[("Running", "resizer")].status == "resolved"
    assert rows[("Running", "thumbnailer")].status == "resolved"
    assert rows[("CpuHigh", "resizer")].status == "resolved"
    assert rows[("Busy", "resizer")].status == "firing"
    # The resolution of a rule removed by the reload went out like any other.
    bodies = [json.loads(o["body"]) for o in outbox]
    resolved = [
        a["labels"]["alertname"] for b in bodies for a in b["alerts"] if a["status"] == "resolved"
    ]
    assert "Running" in resolved, bodies


async def test_engine_reconfigure_with_new_severity_is_a_new_alert(pool: asyncpg.Pool) -> None:
    clock = FakeClock()
    engine = AlertEngine(pool, _rules(50, down=False), clock=clock)
    await engine.start()
    ids = await plugin_ids(pool, [KEY])
    await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=70)]), ids)
    (old,) = [a for a in engine.alerts() if a.alertname == "CpuHigh"]
    assert old.severity == "warning"

    closed = engine.reconfigure(
        _rules(50, down=False, cpu_severity="critical"),
        health_config=HealthConfig(),
        webhooks=(),
        alertmanager=None,
        external_url="",
    )
    assert closed == 1  # its identity (labels, severity) changed: the old one resolves
    assert [a.alertname for a in engine.alerts()] == ["Busy"]
    clock.advance(10)
    await engine.process(snapshot(clock(), [plugin_sample(KEY, clock(), cpu=70)]), ids)
    (new,) = [a for a in engine.alerts() if a.alertname == "CpuHigh"]
    assert (new.severity, new.status) == ("critical", "firing")
    assert new.fingerprint != old.fingerprint
