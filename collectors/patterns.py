"""The one regex engine for user-written patterns (RE2: linear time) and the cmdline match limits.

Every regex a user writes in the config (today: `match.cmdline`) is compiled here, and only
here, with RE2 (the `google-re2` package). RE2 matches in time linear in the text, whatever the
pattern, so a pattern such as `(a+)+$` cannot stall a sampling cycle on a hostile command
line the way a backtracking engine does. The price is a smaller syntax: no backreferences, no
lookaround, `\\z` instead of Python's `\\Z`; `compile_pattern` refuses those with a message that
says so, at config time.

What a pattern is searched in is bounded too: the first CMDLINE_MATCH_MAX_BYTES bytes of the
space-joined command line (see cmdline_text), and at most MATCH_BUDGET_PER_CYCLE searches
per sampling cycle (enforced by the sampler).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import re2

logger = logging.getLogger(__name__)

ENGINE: Final = "re2"
# Cmdline patterns see this many bytes of the space-joined command line, no more (a command
# line can be megabytes long; what identifies a plugin is at its start).
CMDLINE_MATCH_MAX_BYTES: Final = 4096
# Regex searches (each over at most CMDLINE_MATCH_MAX_BYTES) one sampling cycle may make;
# processes left when it runs out are matched on a later cycle.
MATCH_BUDGET_PER_CYCLE: Final = 50_000


def _options() -> Any:
    options = re2.Options()
    # RE2 would also print every refused pattern to stderr; ours become ValueErrors instead.
    options.log_errors = False
    return options


_OPTIONS: Final = _options()

# What a Python-regex writer most likely tried when RE2 refuses a pattern (looked for in the
# pattern itself: RE2's own messages, kept in front, do not always say).
_HINTS: Final = (
    (re.compile(r"\(\?P="), "named backreferences (?P=name) are not supported"),
    (re.compile(r"\\[1-9]"), "backreferences such as \\1 are not supported"),
    (re.compile(r"\(\?[=!]"), "lookahead (?=...) / (?!...) is not supported"),
    (re.compile(r"\(\?<[=!]"), "lookbehind (?<=...) / (?<!...) is not supported"),
    (re.compile(r"\(\?>"), "atomic groups (?>...) are not supported"),
    (re.compile(r"[*+?}]\+"), "possessive quantifiers are not supported"),
    (re.compile(r"\\Z"), "use \\z for the end of the text"),
)


@dataclass(frozen=True, slots=True)
class Pattern:
    """A compiled RE2 pattern; `search` looks for it in bytes (UTF-8 text)."""

    text: str
    _regexp: Any = field(repr=False, compare=False)

    def search(self, data: bytes) -> bool:
        """Whether the pattern occurs anywhere in ``data``; linear in len(data)."""
        return self._regexp.search(data) is not None


def _message(text: str, exc: Exception) -> str:
    raw = exc.args[0] if exc.args else exc
    message = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else str(raw)
    for construct, hint in _HINTS:
        if construct.search(text):
            return f"{message} ({hint}: pluginmon matches with RE2, in linear time)"
    return message


def compile_pattern(text: str) -> Pattern:
    """``text`` compiled with RE2; ValueError saying why when RE2 refuses it.

    RE2 refuses what cannot be matched in linear time (backreferences, lookaround, atomic
    groups, possessive quantifiers) and repetition counts above 1000.
    """
    try:
        return Pattern(text, re2.compile(text, _OPTIONS))
    except re2.error as exc:
        raise ValueError(f"invalid regex: {_message(text, exc)}") from None
    except UnicodeError:
        raise ValueError("invalid regex: not valid UTF-8") from None


def compile_union(texts: Sequence[str]) -> Pattern | None:
    """One pattern that matches wherever any of ``texts`` does, or None if it does not compile.

    RE2 has no backreferences and scopes inline flags such as ``(?i)`` to their group, so
    every pattern can take part. The union can still be refused for size (RE2's memory
    budget), hence None.
    """
    if not texts:
        return None
    try:
        return compile_pattern("|".join(f"(?:{t})" for t in texts))
    except ValueError as exc:
        logger.debug("no combined cmdline pattern: %s", exc)
        return None


def cmdline_text(args: Sequence[str]) -> bytes:
    """What cmdline patterns search: the arguments joined by single spaces, as UTF-8, cut at
    CMDLINE_MATCH_MAX_BYTES.

    Arguments come from the process, decoded with surrogateescape; each byte that is not
    valid UTF-8 is seen as U+FFFD, so `.` matches it as the Python engine matched the
    escaped byte.
    """
    joined = " ".join(args)[:CMDLINE_MATCH_MAX_BYTES]
    try:
        data = joined.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = joined.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that no decoder produced: not from a process
            raw = joined.encode("utf-8", "replace")
        data = raw.decode("utf-8", "replace").encode("utf-8")
    return data[:CMDLINE_MATCH_MAX_BYTES]
