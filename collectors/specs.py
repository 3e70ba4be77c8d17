"""Validating the `[[plugins]]` config tables into PluginSpecs, with errors that name the field."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields

from pluginmon.collectors.models import Match, PluginKey, PluginSpec
from pluginmon.collectors.patterns import compile_pattern

TENANT_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_ENVIRONMENT = "production"
MATCH_KEYS = tuple(f.name for f in fields(Match))
PLUGIN_KEYS = ("tenant", "name", "environment", "match")


class SpecError(ValueError):
    """Invalid plugin specs; `.problems` lists every (location, message), not just the first."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = [f"{len(self.problems)} invalid plugin spec field(s):"]
        lines += [f"  {location}: {message}" for location, message in self.problems]
        return "\n".join(lines)


def _location(index: int, entry: Mapping[str, object]) -> str:
    tenant, name = entry.get("tenant"), entry.get("name")
    if isinstance(tenant, str) and isinstance(name, str):
        return f"plugins[{index}] ({tenant}/{name})"
    return f"plugins[{index}]"


def _check_match_value(key: str, value: str) -> str | None:
    """The problem with one match criterion, or None."""
    if not value.strip():
        return "must not be empty"
    if key == "cmdline":
        try:
            compile_pattern(value)
        except ValueError as exc:
            return str(exc)
    elif key == "env":
        env_key, sep, _ = value.partition("=")
        if not sep or not env_key:
            return 'must be "KEY=VALUE"'
    elif key == "pidfile":
        if not os.path.isabs(value):
            return "must be an absolute path"
    elif key == "exe":
        if not os.path.isabs(value):
            return "must be an absolute path (the process's /proc/PID/exe target)"
    elif key == "systemd_unit" and "/" in value:
        return 'must be a unit name such as "resizer.service", not a path'
    return None


def parse_plugin_specs(raw: Sequence[Mapping[str, object]]) -> tuple[PluginSpec, ...]:
    """Turn the `[[plugins]]` tables (already parsed from TOML) into specs, in config order.

    Order matters: a process matched by several specs belongs to the first. Raises SpecError
    listing every problem found.
    """
    problems: list[tuple[str, str]] = []
    specs: list[PluginSpec] = []
    first_index: dict[PluginKey, int] = {}
    for index, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            problems.append((f"plugins[{index}]", "must be a table"))
            continue
        where = _location(index, entry)
        before = len(problems)
        for entry_key in entry:
            if entry_key not in PLUGIN_KEYS:
                problems.append(
                    (
                        f"{where}.{entry_key}",
                        f"unknown key; expected one of {', '.join(PLUGIN_KEYS)}",
                    )
                )

        tenant = entry.get("tenant")
        if not isinstance(tenant, str):
            problems.append((f"{where}.tenant", "required, a string"))
        elif not TENANT_SLUG.match(tenant):
            problems.append(
                (f"{where}.tenant", f"{tenant!r} is not a tenant slug ({TENANT_SLUG.pattern})")
            )
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append((f"{where}.name", "required, a non-empty string"))
        environment = entry.get("environment", DEFAULT_ENVIRONMENT)
        if not isinstance(environment, str) or not environment.strip():
            problems.append((f"{where}.environment", "must be a non-empty string"))

        match_raw = entry.get("match")
        criteria: dict[str, str] = {}
        if match_raw is None:
            problems.append((f"{where}.match", f"required, with any of: {', '.join(MATCH_KEYS)}"))
        elif not isinstance(match_raw, Mapping):
            problems.append((f"{where}.match", "must be a table"))
        elif not match_raw:
            problems.append(
                (f"{where}.match", f"empty: give at least one of {', '.join(MATCH_KEYS)}")
            )
        else:
            for match_key, value in match_raw.items():
                field_where = f"{where}.match.{match_key}"
                if match_key not in MATCH_KEYS:
                    problems.append(
                        (field_where, f"unknown match key; expected one of {', '.join(MATCH_KEYS)}")
                    )
                elif not isinstance(value, str):
                    problems.append((field_where, "must be a string"))
                elif (problem := _check_match_value(match_key, value)) is not None:
                    problems.append((field_where, problem))
                else:
                    criteria[match_key] = value

        if len(problems) > before:
            continue
        assert isinstance(tenant, str)
        assert isinstance(name, str)
        assert isinstance(environment, str)
        key = PluginKey(tenant=tenant, plugin=name, environment=environment)
        if key in first_index:
            problems.append(
                (
                    where,
                    f"duplicate of plugins[{first_index[key]}]: tenant/name/environment "
                    f"{tenant}/{name}/{environment} must be unique",
                )
            )
            continue
        first_index[key] = index
        specs.append(PluginSpec(key=key, match=Match(**criteria), origin="config"))
    if problems:
        raise SpecError(problems)
    return tuple(specs)
