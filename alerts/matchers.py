"""Glob matchers over a plugin's identity (tenant, plugin, environment)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from pluginmon.collectors.models import PluginKey

MATCHER_FIELDS = ("tenant", "plugin", "environment")


@dataclass(frozen=True, slots=True)
class PluginMatcher:
    """Shell-style globs (``fnmatch``, case-sensitive); ``"*"`` matches everything."""

    tenant: str = "*"
    plugin: str = "*"
    environment: str = "*"

    def matches(self, key: PluginKey) -> bool:
        return (
            _glob(self.tenant, key.tenant)
            and _glob(self.plugin, key.plugin)
            and _glob(self.environment, key.environment)
        )

    @property
    def is_catch_all(self) -> bool:
        return self.tenant == self.plugin == self.environment == "*"


def _glob(pattern: str, value: str) -> bool:
    return pattern == "*" or pattern == value or fnmatch.fnmatchcase(value, pattern)


def parse_matcher(raw: object, where: str, problems: list[tuple[str, str]]) -> PluginMatcher:
    """A matcher from ``{tenant=..., plugin=..., environment=...}``; problems are appended."""
    if not isinstance(raw, Mapping):
        problems.append((where, "must be a table with tenant, plugin and/or environment globs"))
        return PluginMatcher()
    values: dict[str, str] = {}
    for name, value in raw.items():
        if name not in MATCHER_FIELDS:
            problems.append((f"{where}.{name}", "unknown field (tenant, plugin, environment)"))
        elif not isinstance(value, str) or not value:
            problems.append((f"{where}.{name}", "must be a non-empty glob string"))
        else:
            values[str(name)] = value
    return PluginMatcher(**values)
