"""What a plugin spec is made of: tenant slugs, the default environment, match keys, cmdline regexes.

The `[[plugins]]` tables themselves are validated by the daemon's config schema
(pluginmon.daemon.config_sections), which turns them into PluginSpecs.
"""

from __future__ import annotations

import re
from dataclasses import fields

from pluginmon.collectors.models import Match
from pluginmon.collectors.patterns import compile_pattern

TENANT_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
DEFAULT_ENVIRONMENT = "production"
MATCH_KEYS = tuple(f.name for f in fields(Match))


def cmdline_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a cmdline matcher, or None.

    The one place the configuration compiles a cmdline regex, with the engine discovery
    matches with, so that check-config refuses exactly what the sampler could not use.
    """
    try:
        compile_pattern(pattern)
    except ValueError as exc:  # RE2 refuses it; the message starts "invalid regex: "
        return str(exc)
    return None
