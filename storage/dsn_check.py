"""Which mistakes in a ``postgresql://`` URL no retry can fix: ports out of range or not numbers,
option values libpq and asyncpg refuse. Found here, at configuration time, so that
check-config and run refuse them (exit 2) instead of the daemon retrying them forever.

What is told is parsed, never guessed from a driver's message, and never holds the password:
each problem names a port or a parameter and its value, and any of them that is (a piece of)
the password is replaced (storage.dsn's scrubber). A URL the check cannot read with certainty
(a raw ``@`` in a password or in a query value) is read both ways a driver may read it (the
userinfo ends at the last ``@``, or at the first), and a problem is reported only when both
readings have one. Parameters the check does not know are left to the server (asyncpg sends
them as run-time settings, and libpq has options of its own such as ``connect_timeout``).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import parse_qsl, unquote

from pluginmon.storage.dsn import SecretScrubber, dsn_secrets

# libpq's values (asyncpg accepts the same words).
SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
TARGET_SESSION_ATTRS: Final = (
    "any",
    "read-write",
    "read-only",
    "primary",
    "standby",
    "prefer-standby",
)
_CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "sslmode": SSLMODES,
    "target_session_attrs": TARGET_SESSION_ATTRS,
    "sslnegotiation": ("postgres", "direct"),
    "gsslib": ("gssapi", "sspi"),
    "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "ssl_max_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
}
_MAX_SHOWN_CHARS: Final = 40


def _port_problem(text: str, where: str) -> str | None:
    if text.isascii() and text.isdigit() and 1 <= int(text) <= 65535:
        return None
    shown = text if len(text) <= _MAX_SHOWN_CHARS else text[:_MAX_SHOWN_CHARS] + "..."
    return f"{where}: port {shown!r} is not a number from 1 to 65535"


def _host_ports(hostlist: str) -> list[tuple[str, str]]:
    """(host, port text) per host of ``h1:5432,[::1]:5433,h3``; the port is '' when absent."""
    found: list[tuple[str, str]] = []
    for spec in hostlist.split(","):
        if spec.startswith("["):
            end = spec.find("]")
            host, rest = (spec[: end + 1], spec[end + 1 :]) if end >= 0 else (spec, "")
            found.append((host, rest[1:] if rest.startswith(":") else rest))
        elif spec.startswith("/"):
            found.append((spec, ""))  # a Unix socket directory
        else:
            host, _, port = spec.partition(":")
            found.append((host, port))
    return found


def _problems_of(hostlist: str, query: str) -> list[str]:
    problems: list[str] = []
    hosts = _host_ports(hostlist) if hostlist else []
    for i, (_host, port) in enumerate(hosts):
        where = f"host {i + 1}" if len(hosts) > 1 else "the host"
        if port:
            problem = _port_problem(unquote(port), where)
            if problem:
                problems.append(problem)
    try:
        params = parse_qsl(query, keep_blank_values=True)
    except ValueError:
        return [*problems, "the query string cannot be parsed"]
    for key, value in params:
        name = key.strip().lower()
        if name == "port":
            ports = value.split(",")
            for port in ports:
                problem = _port_problem(port, "query parameter 'port'")
                if problem:
                    problems.append(problem)
            if len(ports) > 1 and hosts and len(ports) != len(hosts):
                problems.append(
                    f"query parameter 'port' gives {len(ports)} ports for {len(hosts)} hosts"
                )
        elif name in _CHOICES and value not in _CHOICES[name]:
            shown = value if len(value) <= _MAX_SHOWN_CHARS else value[:_MAX_SHOWN_CHARS] + "..."
            problems.append(
                f"query parameter {key!r} is {shown!r}; it must be one of "
                f"{', '.join(_CHOICES[name])}"
            )
    return problems


def _reading(after_userinfo: str) -> tuple[str, str]:
    """(host list, query) of what follows the userinfo's ``@`` (or ``scheme://``)."""
    cut = len(after_userinfo)
    for mark in "/?#":
        at = after_userinfo.find(mark)
        if 0 <= at < cut:
            cut = at
    hostlist = after_userinfo[:cut]
    rest = after_userinfo[cut:].partition("#")[0]
    _, _, query = rest.partition("?")
    return hostlist, query


def database_url_problems(url: str) -> list[str]:
    """What in ``url`` no connection attempt can get past (empty when nothing is found);
    never raises, never holds the password. Keyword/value DSNs are left to the driver."""
    _scheme, sep, rest = url.partition("://")
    if not sep:
        return []
    try:
        last = rest.rfind("@")
        readings = [rest[last + 1 :] if last >= 0 else rest]
        # The first '@' before the host list's end: what urllib (asyncpg) takes.
        netloc_end = min((i for i in (rest.find(m) for m in "/?#") if i >= 0), default=len(rest))
        first = rest.find("@", 0, netloc_end)
        if first != last:
            readings.append(rest[first + 1 :] if first >= 0 else rest)
        found = [_problems_of(*_reading(text)) for text in readings]
    except Exception:  # the check must not be what crashes on a strange URL
        return []
    if not all(found):
        return []
    scrubber = SecretScrubber(dsn_secrets(url))
    return [scrubber.scrub(problem) for problem in found[0]]
