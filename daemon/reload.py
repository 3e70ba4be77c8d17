"""Configuration reload (SIGHUP): the file checked as check-config checks it, its live sections
applied, one log line saying what changed (and which settings wait for a restart), and the
outcome exported as Prometheus exports its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric

from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.config import DaemonConfig, load, restart_needed, with_live_sections
from pluginmon.daemon.config_schema import ConfigError

logger = logging.getLogger(__name__)

# A long list of names in one log line says nothing more than its first few and a count.
_NAMES_SHOWN = 5


@dataclass(frozen=True, slots=True)
class NamedChanges:
    """What changed in one list of named things (plugins, rules, receivers)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    reordered: bool = False  # plugins: the first matching entry wins, so order matters

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.reordered)

    def describe(self, what: str) -> str | None:
        parts = [
            f"{sign}{_names(names)}"
            for sign, names in (("+", self.added), ("-", self.removed), ("~", self.changed))
            if names
        ]
        if self.reordered:
            parts.append("reordered")
        return f"{what} {' '.join(parts)}" if parts else None


def _names(names: tuple[str, ...]) -> str:
    shown = ",".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} (+{more} more)" if more > 0 else shown


def named_changes(old: Mapping[str, object], new: Mapping[str, object]) -> NamedChanges:
    """Compare two name -> definition maps (in their configured order)."""
    kept_old = [name for name in old if name in new]
    kept_new = [name for name in new if name in old]
    return NamedChanges(
        added=tuple(name for name in new if name not in old),
        removed=tuple(name for name in old if name not in new),
        changed=tuple(name for name in kept_new if old[name] != new[name]),
        reordered=kept_old != kept_new,
    )


@dataclass(frozen=True, slots=True)
class ConfigChanges:
    """The difference between the running configuration and a freshly loaded one."""

    plugins: NamedChanges
    removed_plugins: frozenset[PluginKey]
    rules: NamedChanges
    receivers: NamedChanges  # webhooks and the Alertmanager push, by receiver name
    health: bool  # thresholds, weights, per-plugin overrides
    external_url: bool
    needs_restart: tuple[str, ...]  # changed, not applied: see config.restart_needed
    # Scrape targets (by plugin) or push limits/TTLs of plugins' own metrics.
    scrape_targets: NamedChanges = NamedChanges()
    push: bool = False

    @property
    def alerting(self) -> bool:
        """Anything the alert engine holds changed."""
        return bool(self.rules or self.receivers or self.health or self.external_url)

    def describe(self) -> str:
        """What the reload applied, for its one log line ("no changes" when nothing)."""
        parts = [
            self.plugins.describe("plugins"),
            self.rules.describe("rules"),
            self.receivers.describe("receivers"),
            "health thresholds changed" if self.health else None,
            "alerts.external_url changed" if self.external_url else None,
            self.scrape_targets.describe("scrape targets"),
            "push limits changed" if self.push else None,
        ]
        applied = "; ".join(p for p in parts if p is not None) or "no changes applied"
        if self.needs_restart:
            applied += f"; not applied until a restart: {', '.join(self.needs_restart)}"
        return applied


def _plugin_name(key: PluginKey) -> str:
    return f"{key.tenant}/{key.plugin}/{key.environment}"


def _receivers(config: DaemonConfig) -> dict[str, object]:
    out: dict[str, object] = {w.name: w for w in config.webhooks}
    if config.alertmanager is not None:
        out[f"{config.alertmanager.name} (alertmanager)"] = config.alertmanager
    return out


def _targets(config: DaemonConfig) -> dict[str, object]:
    # Discovered endpoints follow the processes; the settings they are scraped with count.
    out: dict[str, object] = {_plugin_name(t.key): t for t in config.scrape.targets}
    scrape = config.scrape
    out["(discovered endpoints)"] = (
        scrape.discovered,
        scrape.interval_seconds,
        scrape.timeout_seconds,
        scrape.limits,
    )
    return out


def config_changes(running: DaemonConfig, loaded: DaemonConfig) -> ConfigChanges:
    """How ``loaded`` differs from ``running`` (pure: two configurations in, names out)."""
    old_plugins = {_plugin_name(p.key): p for p in running.plugins}
    new_plugins = {_plugin_name(p.key): p for p in loaded.plugins}
    new_keys = {p.key for p in loaded.plugins}
    effective = with_live_sections(running, loaded)
    return ConfigChanges(
        plugins=named_changes(old_plugins, new_plugins),
        removed_plugins=frozenset(p.key for p in running.plugins if p.key not in new_keys),
        rules=named_changes({r.name: r for r in running.rules}, {r.name: r for r in loaded.rules}),
        receivers=named_changes(_receivers(running), _receivers(loaded)),
        health=running.health != loaded.health,
        external_url=running.settings.alerts.external_url != loaded.settings.alerts.external_url,
        needs_restart=restart_needed(running.settings, loaded.settings),
        # As they would run: the reload keeps the running sample interval (their default).
        scrape_targets=named_changes(_targets(running), _targets(effective)),
        push=running.push != effective.push,
    )


Apply = Callable[[DaemonConfig, ConfigChanges], Awaitable[None]]


class ConfigReloader:
    """Reloads the configuration on request (SIGHUP), one reload at a time.

    A reload loads the file (and the environment) exactly as ``run`` and ``check-config``
    do, in a worker thread (the machine checks resolve and bind). An invalid file changes
    nothing: every problem is logged, located as check-config prints it, and
    ``pluginmon_config_last_reload_successful`` goes to 0. A valid one is applied (its live
    sections, config.LIVE_SETTINGS) through ``apply``, given by the daemon once it can apply
    one (``attach``): a request before that waits for it. A request while a reload runs
    makes one more after it: the file may have changed again in between.

    Also a prometheus-client Collector: the reload metrics, read at scrape time.
    """

    def __init__(
        self,
        *,
        config_path: Path | None,
        running: DaemonConfig,
        load_config: Callable[[Path | None], DaemonConfig] = load,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.running = running
        self._path = config_path
        self._load = load_config
        self._wall_clock = wall_clock
        # The configuration loaded at start counts as the first successful load.
        self._successful = True
        self._success_at = wall_clock()
        self._apply: Apply | None = None
        self._requested = False
        self._task: asyncio.Task[None] | None = None

    @property
    def last_reload_successful(self) -> bool:
        """False after a refused reload, until one succeeds."""
        return self._successful

    def attach(self, apply: Apply) -> None:
        """From now on reloads are applied through ``apply``; runs one requested before."""
        self._apply = apply
        if self._requested:
            self._requested = False
            self.request()

    def request(self) -> None:
        """Reload soon (from a signal handler on the event loop: never blocks)."""
        if self._apply is None:
            if not self._requested:
                logger.info("configuration reload requested during start-up: it runs once started")
            self._requested = True
            return
        if self._task is not None and not self._task.done():
            self._requested = True
            return
        self._task = asyncio.get_running_loop().create_task(
            self._reload_while_requested(), name="config-reload"
        )

    async def _reload_while_requested(self) -> None:
        while True:
            self._requested = False
            await self.reload()
            if not self._requested:
                return

    async def reload(self) -> bool:
        """Reload now; True when the configuration was valid and is applied."""
        apply = self._apply
        if apply is None:
            raise RuntimeError("reload() before attach()")
        source = str(self._path) if self._path is not None else "the environment (no --config)"
        logger.info("reloading the configuration from %s", source)
        try:
            loaded = await asyncio.to_thread(self._load, self._path)
        except ConfigError as exc:
            self._successful = False
            logger.error(
                "configuration reload refused, %d problem(s); still running on the previous "
                "configuration",
                len(exc.problems),
            )
            for problem in exc.problems:
                logger.error("invalid configuration: %s", problem)
            return False
        except Exception:
            self._successful = False
            logger.exception(
                "configuration reload failed; still running on the previous configuration"
            )
            return False
        changes = config_changes(self.running, loaded)
        effective = with_live_sections(self.running, loaded)
        try:
            # The parts of apply (specs handed to the sampler, the engine's rules, the
            # deliverer's receivers) cannot fail on a configuration that validated; if one
            # did, the log and the metric say so.
            await apply(effective, changes)
        except Exception:
            self._successful = False
            logger.exception("configuration reload could not be applied completely")
            return False
        self.running = effective
        self._successful = True
        self._success_at = self._wall_clock()
        logger.info("configuration reloaded: %s", changes.describe())
        if changes.needs_restart:
            logger.warning(
                "changed settings that need a restart, still running with their previous value: %s",
                ", ".join(changes.needs_restart),
            )
        return True

    async def aclose(self) -> None:
        """Cancel a reload still running (the daemon is stopping)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector: the last reload's outcome and the last success."""
        yield GaugeMetricFamily(
            "pluginmon_config_last_reload_successful",
            "1 when the last configuration reload (SIGHUP) succeeded or none was asked yet, "
            "0 when it was refused",
            value=int(self._successful),
        )
        yield GaugeMetricFamily(
            "pluginmon_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load (start-up or reload)",
            value=self._success_at,
        )
