"""The PLUGINMON_* labels a process declares: checked at the edge, with a reason when refused.

A process's environment is written by whoever started it, so its labels are untrusted input:
they become Prometheus label values, spool records, COPY rows, alert labels and log lines.
Each one is checked here, before anything else reads it, and the process is skipped unless
all of them pass. The checks run cheapest first, so a 100 KB value costs one len():

1. empty (or, for the tenant, missing)   -> "empty"
2. longer than its limit                 -> "too_long"
3. not valid UTF-8                       -> "not_utf8"
4. outside its character class           -> "bad_characters"

The tenant must be a tenant slug, the rule of the tenants.id CHECK in sql/001_core.sql; the
plugin and environment names follow NAME_RULE. Both rules are ASCII, so characters and bytes
count the same.

A plugin may also declare where it serves its own metrics: PLUGINMON_METRICS_PORT (a TCP
port, digits only, 1-65535) and PLUGINMON_METRICS_PATH (default /metrics; PATH_RULE). They
are checked the same way, but a refused one only leaves the plugin unscraped: its processes
are still sampled. The address is always the loopback interface: a process cannot send
pluginmon's requests anywhere else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from pluginmon.collectors.models import PluginKey

LABEL_TENANT: Final = "PLUGINMON_TENANT"
LABEL_PLUGIN: Final = "PLUGINMON_PLUGIN"
LABEL_ENVIRONMENT: Final = "PLUGINMON_ENVIRONMENT"
LABEL_METRICS_PORT: Final = "PLUGINMON_METRICS_PORT"
LABEL_METRICS_PATH: Final = "PLUGINMON_METRICS_PATH"

# tenants.id CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,62}$') in sql/001_core.sql.
TENANT_RULE: Final = "[a-z0-9][a-z0-9_-]{0,62}"
TENANT_MAX_CHARS: Final = 63
# Plugin and environment names: what fits a label value, a file name and a URL path segment
# without escaping.
NAME_RULE: Final = "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME_MAX_CHARS: Final = 128
# The metrics endpoint: a port, and a URL path of plain segments (no query, no "..", nothing
# to escape), so that the URL built from it is exactly what the process declared.
PORT_RULE: Final = "[1-9][0-9]{0,4}"
PORT_MAX_CHARS: Final = 5
PATH_RULE: Final = "(/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)+/?|/"
PATH_MAX_CHARS: Final = 256
DEFAULT_METRICS_PATH: Final = "/metrics"
LOOPBACK_HOST: Final = "127.0.0.1"

REASON_EMPTY: Final = "empty"
REASON_TOO_LONG: Final = "too_long"
REASON_NOT_UTF8: Final = "not_utf8"
REASON_BAD_CHARACTERS: Final = "bad_characters"
REJECT_REASONS: Final = (REASON_BAD_CHARACTERS, REASON_EMPTY, REASON_NOT_UTF8, REASON_TOO_LONG)

# How much of a refused value a log line shows.
PREVIEW_MAX_CHARS: Final = 64

_TENANT_RE: Final = re.compile(TENANT_RULE)
_NAME_RE: Final = re.compile(NAME_RULE)
_PORT_RE: Final = re.compile(PORT_RULE)
_PATH_RE: Final = re.compile(PATH_RULE)
_RULES: Final = {
    LABEL_TENANT: TENANT_RULE,
    LABEL_METRICS_PORT: f"{PORT_RULE} (1-65535)",
    LABEL_METRICS_PATH: PATH_RULE,
}


@dataclass(frozen=True, slots=True)
class LabelRejection:
    """Why a process's labels were refused; `preview` is safe to log (escaped, truncated)."""

    variable: str  # the environment variable at fault, e.g. "PLUGINMON_PLUGIN"
    reason: str  # one of REJECT_REASONS
    preview: str

    def describe(self) -> str:
        what = {
            REASON_EMPTY: "is missing or empty",
            REASON_TOO_LONG: "is too long",
            REASON_NOT_UTF8: "is not valid UTF-8",
            REASON_BAD_CHARACTERS: "has characters outside the allowed set",
        }[self.reason]
        rule = _RULES.get(self.variable, NAME_RULE)
        return f"{self.variable} {what} ({self.reason}, must match {rule}): {self.preview}"


def escaped_preview(value: str, *, max_chars: int = PREVIEW_MAX_CHARS) -> str:
    """``value`` as a log line may show it: its first ``max_chars`` characters as escaped
    bytes (b'bad\\xff', b'a\\nb': no raw control character, no forged line), plus its length
    when it was cut."""
    head = value[:max_chars]
    try:
        shown = repr(head.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a surrogate no decoder produced: not from a process
        shown = ascii(head)
    if len(value) > max_chars:
        shown += f"... ({len(value)} characters)"
    return shown


def check_label(value: str, *, max_chars: int, rule: re.Pattern[str]) -> str | None:
    """The reason ``value`` is refused, or None when it is a valid label value."""
    if not value:
        return REASON_EMPTY
    if len(value) > max_chars:
        return REASON_TOO_LONG
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept as lone surrogates by surrogateescape
        return REASON_NOT_UTF8
    if rule.fullmatch(value) is None:
        return REASON_BAD_CHARACTERS
    return None


def parse_labels(
    environ: Mapping[str, str], *, default_environment: str
) -> PluginKey | LabelRejection | None:
    """The plugin a process declares with PLUGINMON_* labels; None when it declares none
    (no PLUGINMON_PLUGIN); a LabelRejection naming the first label at fault.

    An empty or missing PLUGINMON_ENVIRONMENT means ``default_environment``.
    """
    plugin = environ.get(LABEL_PLUGIN)
    if plugin is None:
        return None
    tenant = environ.get(LABEL_TENANT, "")
    environment = environ.get(LABEL_ENVIRONMENT) or default_environment
    for variable, value, max_chars, rule in (
        (LABEL_TENANT, tenant, TENANT_MAX_CHARS, _TENANT_RE),
        (LABEL_PLUGIN, plugin, NAME_MAX_CHARS, _NAME_RE),
        (LABEL_ENVIRONMENT, environment, NAME_MAX_CHARS, _NAME_RE),
    ):
        reason = check_label(value, max_chars=max_chars, rule=rule)
        if reason is not None:
            return LabelRejection(variable, reason, escaped_preview(value))
    return PluginKey(tenant=tenant, plugin=plugin, environment=environment)


def parse_metrics_url(environ: Mapping[str, str]) -> str | LabelRejection | None:
    """The loopback URL of the metrics endpoint a process declares with
    PLUGINMON_METRICS_PORT (and PLUGINMON_METRICS_PATH); None when it declares no port; a
    LabelRejection naming the label at fault."""
    port = environ.get(LABEL_METRICS_PORT)
    if port is None:
        return None
    path = environ.get(LABEL_METRICS_PATH) or DEFAULT_METRICS_PATH
    for variable, value, max_chars, rule in (
        (LABEL_METRICS_PORT, port, PORT_MAX_CHARS, _PORT_RE),
        (LABEL_METRICS_PATH, path, PATH_MAX_CHARS, _PATH_RE),
    ):
        reason = check_label(value, max_chars=max_chars, rule=rule)
        if reason is None and variable == LABEL_METRICS_PORT and int(value) > 65535:
            reason = REASON_BAD_CHARACTERS
        if reason is not None:
            return LabelRejection(variable, reason, escaped_preview(value))
    return f"http://{LOOPBACK_HOST}:{int(port)}{path}"
