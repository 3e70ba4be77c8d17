"""Glob matchers over a plugin's identity (tenant, plugin, environment)."""

from __future__ import annotations

import fnmatch
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
