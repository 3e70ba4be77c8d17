"""Database URLs and connection errors made safe to print: no password, whatever it holds.

A password in a URL should be percent-encoded, but operators paste raw ones: ``/ @ : # ?
%``, spaces, unicode. Drivers then split the URL in the wrong place and echo pieces of the
password back as a host, a port or a query parameter in their error messages. So:

* :func:`redacted_dsn` parses (never pattern-matches) a URL or a libpq keyword/value string
  and returns it with every password replaced by ``***``. The userinfo ends at the LAST
  ``@`` of the URL: every driver ends it at that ``@`` or earlier, so whatever any of them
  takes for the password lies inside what is hidden. The price: an ``@`` in a query value
  hides the host too. It never raises; what it cannot parse it replaces whole.
* :func:`dsn_secrets` lists the strings of a URL that must never be printed (the password
  raw, percent-decoded and re-encoded, and its pieces between special characters), and
  :class:`SecretScrubber` replaces them in any text (a driver's exception message, a
  traceback) in time linear in the text. A password or a piece shorter than
  ``MIN_PIECE_CHARS`` is not replaced in free text (a password "x" would garble every
  message); in a URL it is hidden like any other.
* :func:`redact_urls` hides userinfo passwords and ``password=`` values in free text (a log
  line), in one pass; :func:`describe_database_error` says why a connection failed in
  fixed words, for places such as ``/readyz`` that show it to anyone.
"""

from __future__ import annotations

import errno
import re
import socket
import string
from collections.abc import Iterable
from urllib.parse import quote, unquote

REDACTED = "***"
UNPARSABLE = "<database URL hidden: not parsable>"
# Below this, a password or a piece of one is not scrubbed from free text.
MIN_PIECE_CHARS = 4
# A longer scheme is not a URL scheme (the text is then secret as a whole).
_MAX_SCHEME_CHARS = 32
_SCHEME_CHARS = frozenset(string.ascii_letters + string.digits + "+.-")
# Characters at which a driver may split a URL or a password (and so echo a piece of it).
_SPECIALS = r"/@:#?%&=,;\s\[\]'\"\\"
_SPLIT_RE = re.compile(f"[{_SPECIALS}]+")
# ... and at non-ASCII characters: what is left of a piece that a driver escaped or re-encoded.
_SPLIT_OR_NON_ASCII_RE = re.compile(f"[{_SPECIALS}\\x80-\\U0010ffff]+")
# Query keys whose values are secrets (libpq: password, sslpassword).
_SECRET_KEY_SUFFIX = "password"  # noqa: S105 - a key name, not a password
# Where a URL in free text ends: whitespace, quotes and angle brackets.
_URL_END_RE = re.compile(r"[\s\"'<>`]")
_PASSWORD_KEY_RE = re.compile(r"password\s*[=:]\s*", re.IGNORECASE)
_USERINFO_SECRET_RE = re.compile(r"[:/?#]")
_QUERY_SECRET_RE = re.compile(r"[?&][^=&@?]*password=", re.IGNORECASE)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def redacted_dsn(url: str) -> str:
    """``url`` with every password replaced by ``***``; never raises.

    ``postgresql://user:secret@host/db`` gives ``postgresql://user:***@host/db``;
    ``?password=`` and ``?sslpassword=`` values and keyword/value DSNs
    (``host=db password='a b'``) are hidden too. Anything that does not parse is replaced
    whole by a fixed placeholder.
    """
    try:
        text = _redact_url(url) if "://" in url else _redact_keywords(url)
        return _escape_controls(text) if text is not None else UNPARSABLE
    except Exception:  # a redactor that raises would print the URL in the traceback
        return UNPARSABLE


def dsn_secrets(url: str) -> tuple[str, ...]:
    """The strings of ``url`` that must never be printed, longest first; never raises."""
    try:
        return _secret_forms(_raw_secrets(url))
    except Exception:  # same reason as in redacted_dsn
        return (url,)


class SecretScrubber:
    """Replaces known secrets in any text; linear in the text for a given set of secrets."""

    __slots__ = ("_secrets",)

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so that a piece never breaks up the whole before it is replaced.
        self._secrets = tuple(sorted({s for s in secrets if s}, key=lambda s: (-len(s), s)))

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


def redact_urls(text: str) -> str:
    """``text`` with URL passwords and ``password=`` values replaced by ``***``.

    One forward pass: each ``://`` is found with ``str.find``, the URL runs from it to the
    next whitespace or quote, and the scan resumes after that, so every character is looked
    at a bounded number of times.
    """
    if "://" in text:
        text = _redact_urls_in_text(text)
    if _PASSWORD_KEY_RE.search(text):
        text = _redact_password_values(text)
    return text


def describe_database_error(exc: BaseException) -> str:
    """Why a connection or query failed, in fixed words that hold no host, user or secret."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return _describe_sqlstate(sqlstate)
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "host name not resolved"
    if isinstance(exc, OSError):
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "host unreachable"
        code = errno.errorcode.get(exc.errno) if exc.errno else None
        return f"network error ({code})" if code else "cannot connect"
    name = type(exc).__name__
    # psycopg's OperationalError carries the libpq text only, which names host and user;
    # the SQLSTATE (above) is on ``exc.sqlstate`` when the server answered.
    if "OperationalError" in name or "ConnectionError" in name or "ConnectionDoesNotExist" in name:
        return "connection failed"
    if isinstance(exc, ValueError) or "ConfigurationError" in name:
        return "invalid database URL"
    return f"error ({name})"


# -- internals ------------------------------------------------------------------------------

_SQLSTATE_CLASSES = {
    "28": "authentication failed",
    "08": "connection failure",
    "3D": "database does not exist",
    "53": "server out of resources (too many connections?)",
    "57": "server shutting down or starting up",
    "25": "read-only (a standby?)",
    "42": "schema or privileges missing",
}


def _describe_sqlstate(sqlstate: str) -> str:
    words = _SQLSTATE_CLASSES.get(sqlstate[:2].upper(), "database error")
    return f"{words} (SQLSTATE {sqlstate})" if sqlstate.isalnum() else words


def _escape_controls(text: str) -> str:
    """A URL goes into one log line: control characters must not start another."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _redact_url(url: str) -> str | None:
    scheme, sep, rest = url.partition("://")
    if not sep or not _is_scheme(scheme):
        return None
    return f"{scheme}://{_redact_rest(rest)}"


def _is_scheme(text: str) -> bool:
    return (
        0 < len(text) <= _MAX_SCHEME_CHARS
        and text[0].isascii()
        and text[0].isalpha()
        and not set(text) - _SCHEME_CHARS
    )


def _redact_rest(rest: str) -> str:
    """What follows ``scheme://``: the userinfo up to the LAST ``@`` loses its password."""
    at = rest.rfind("@")
    if at < 0:
        return _redact_query(rest)
    userinfo = rest[:at]
    cut = _secret_start(userinfo)
    if cut < 0:
        return f"{userinfo}@{_redact_query(rest[at + 1 :])}"
    if _QUERY_SECRET_RE.search(userinfo):
        # "?password=a@b": the '@' may be inside the value; what follows it may be too.
        return f"{userinfo[:cut]}{REDACTED}"
    return f"{userinfo[:cut]}{REDACTED}@{_redact_query(rest[at + 1 :])}"


def _secret_start(userinfo: str) -> int:
    """Where the secret part of a userinfo starts, or -1 when it is a user name alone.

    After the first ``:`` (the password), or after the first ``/ ? #``: a user name has
    those percent-encoded, so the ``@`` is in a password or a query value (``?password=``).
    """
    cut = _USERINFO_SECRET_RE.search(userinfo)
    return -1 if cut is None else cut.end()


def _redact_query(rest: str) -> str:
    """``host/db?query#fragment`` with secret query values hidden."""
    before, q, query_and_fragment = rest.partition("?")
    if not q:
        before, hash_, fragment = rest.partition("#")
        return f"{before}{hash_}{REDACTED if fragment else ''}"
    query, hash_, fragment = query_and_fragment.partition("#")
    params = []
    for param in query.split("&"):
        key, eq, _value = param.partition("=")
        if eq and unquote(key).strip().lower().endswith(_SECRET_KEY_SUFFIX):
            params.append(f"{key}={REDACTED}")
        else:
            params.append(param)
    # A database URL has no use for a fragment; a raw '#' in a query password starts one.
    return f"{before}?{'&'.join(params)}{hash_}{REDACTED if fragment else ''}"


def _keyword_pairs(text: str) -> list[tuple[str, str, str]] | None:
    """libpq ``key = value`` pairs as (key, raw value, unquoted value); None if malformed."""
    pairs: list[tuple[str, str, str]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return pairs
        start = i
        while i < n and not text[i].isspace() and text[i] != "=":
            i += 1
        key = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if not key or i >= n or text[i] != "=":
            return None
        i += 1
        while i < n and text[i].isspace():
            i += 1
        start = i
        if i < n and text[i] == "'":
            chars: list[str] = []
            i += 1
            while i < n and text[i] != "'":
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            if i >= n:
                return None  # unterminated quote: the rest may all be the password
            i += 1
            pairs.append((key, text[start:i], "".join(chars)))
        else:
            while i < n and not text[i].isspace():
                i += 1
            pairs.append((key, text[start:i], text[start:i]))


def _redact_keywords(text: str) -> str | None:
    pairs = _keyword_pairs(text)
    if not pairs:
        return None
    return " ".join(
        f"{key}={REDACTED if key.lower().endswith(_SECRET_KEY_SUFFIX) else raw}"
        for key, raw, _ in pairs
    )


def _raw_secrets(url: str) -> list[str]:
    if "://" not in url:
        pairs = _keyword_pairs(url)
        if pairs is None:
            return [url]  # not parsable: all of it is secret
        return [v for k, _, v in pairs if k.lower().endswith(_SECRET_KEY_SUFFIX)]
    scheme, _, rest = url.partition("://")
    if not _is_scheme(scheme):
        return [url]
    secrets = []
    at = rest.rfind("@")
    if at >= 0:
        cut = _secret_start(rest[:at])
        if cut >= 0 and _QUERY_SECRET_RE.search(rest[:at]):
            return [rest[cut:]]  # as redacted: everything from the cut on
        if cut >= 0:
            secrets.append(rest[cut:at])
        rest = rest[at + 1 :]
    _, q, query = rest.partition("?")
    if q:
        for param in query.partition("#")[0].split("&"):
            key, eq, value = param.partition("=")
            if eq and unquote(key).strip().lower().endswith(_SECRET_KEY_SUFFIX):
                secrets.append(value)
    return secrets


def _secret_forms(raw: list[str]) -> tuple[str, ...]:
    found: set[str] = set()
    for secret in raw:
        if not secret:
            continue
        decoded = unquote(secret, errors="replace")
        encoded = (quote(decoded, safe="", errors="replace"), quote(decoded, errors="replace"))
        for form in (secret, decoded, *encoded):
            # Pieces between special characters, with and without their non-ASCII ones.
            pieces = (form, *_SPLIT_RE.split(form), *_SPLIT_OR_NON_ASCII_RE.split(form))
            found.update(piece for piece in pieces if len(piece) >= MIN_PIECE_CHARS)
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


def _redact_urls_in_text(text: str) -> str:
    out: list[str] = []
    emitted = 0  # text[:emitted] is in ``out`` already
    while True:
        sep = text.find("://", emitted)
        if sep < 0:
            break
        # No scheme check: whatever the scheme, a userinfo after "://" is hidden.
        end_match = _URL_END_RE.search(text, sep + 3)
        end = end_match.start() if end_match else len(text)
        out.append(text[emitted : sep + 3])
        out.append(_redact_rest(text[sep + 3 : end]))
        emitted = end
    out.append(text[emitted:])
    return "".join(out)


def _redact_password_values(text: str) -> str:
    out: list[str] = []
    emitted = 0
    for match in _PASSWORD_KEY_RE.finditer(text):
        if match.start() < emitted:
            continue  # inside a value already hidden
        i = match.end()
        n = len(text)
        if i < n and text[i] in "'\"":
            quote_char = text[i]
            close = text.find(quote_char, i + 1)
            end = n if close < 0 else close + 1
        else:
            while i < n and not text[i].isspace() and text[i] not in "&,;\"'":
                i += 1
            end = i
        if end == match.end():
            continue
        out.append(text[emitted : match.end()])
        out.append(REDACTED)
        emitted = end
    out.append(text[emitted:])
    return "".join(out)
