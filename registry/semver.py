"""npm's semver: versions, ranges in node-semver's grammar (caret, tilde, x-ranges, hyphen
ranges, ``||``), its prerelease rule, and whether ranges can be satisfied together.

Written here rather than taken from PyPI: the port there (``node-semver``) is untyped (this
project is ``mypy --strict``) and keeps ranges as strings, while conflict detection needs
the comparator sets. The desugaring follows node-semver 7 exactly (upper bounds end in ``-0``
so that ``<2.0.0-0`` also excludes 2.0.0's prereleases) and is tested against the README's
table of ranges (tests/test_semver.py). Not supported, as in node-semver without
``loose``: the ``includePrerelease`` option, and loose forms such as ``1.2.3beta``.

Prerelease rule (node-semver's ``testSet``): a version with a prerelease tag satisfies a
comparator set only if some comparator of the set names a prerelease of the same
``[major, minor, patch]`` tuple; ``1.2.3-beta`` satisfies ``>=1.2.3-alpha`` but
``1.2.4-beta`` does not (the user opted into 1.2.3's prereleases, not every one).
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pluginmon.registry.errors import InvalidError

MAX_RANGE_CHARS: Final = 256

_NUM = r"0|[1-9]\d*"
_IDENT = r"(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)"
_PRE = rf"(?:-(?P<pre>{_IDENT}(?:\.{_IDENT})*))?"
_BUILD = r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
_VERSION_RE: Final = re.compile(
    rf"^[=v]*(?P<major>{_NUM})\.(?P<minor>{_NUM})\.(?P<patch>{_NUM}){_PRE}{_BUILD}$"
)
_XR = rf"(?:{_NUM}|[xX*])"
# A partial version: 1, 1.2, 1.2.x, 1.2.3-beta+build, *, v1.2 ...
_PARTIAL_RE: Final = re.compile(
    rf"^v?(?P<major>{_XR})(?:\.(?P<minor>{_XR})(?:\.(?P<patch>{_XR}){_PRE}{_BUILD})?)?$"
)
_COMPARATOR_RE: Final = re.compile(r"^(?P<op><=|>=|<|>|=|~>|~|\^)?\s*(?P<rest>.*)$")
_HYPHEN_RE: Final = re.compile(r"^\s*(?P<low>\S+)\s+-\s+(?P<high>\S+)\s*$")
# ">= 1.2.3" is one comparator: glue operators to their version before splitting on spaces.
_OP_SPACE_RE: Final = re.compile(r"(<=|>=|<|>|=|~>|~|\^)\s+")

Identifier = int | str


@functools.total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    """A semver 2.0 version; build metadata is dropped (it never affects precedence)."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[Identifier, ...] = ()
    # Precedence as a plain tuple, computed once: comparisons are the hot path of a recompute.
    sort_key: tuple[object, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sort_key", _key(self))

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            return base + "-" + ".".join(str(p) for p in self.prerelease)
        return base

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.sort_key < other.sort_key


def _key(v: Version) -> tuple[object, ...]:
    # A release sorts after all its prereleases; numeric identifiers before alphanumeric ones.
    if not v.prerelease:
        return (v.major, v.minor, v.patch, 1, ())
    ids = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in v.prerelease)
    return (v.major, v.minor, v.patch, 0, ids)


def _identifiers(text: str | None) -> tuple[Identifier, ...]:
    if not text:
        return ()
    return tuple(int(p) if p.isdigit() else p for p in text.split("."))


def parse_version(text: str) -> Version:
    """``text`` as a Version (a leading ``v`` or ``=`` allowed); InvalidError otherwise."""
    match = _VERSION_RE.match(text.strip())
    if match is None:
        raise InvalidError(
            f"version {text[:64]!r} is not a semantic version (MAJOR.MINOR.PATCH[-pre][+build])",
            field="version",
        )
    return Version(
        int(match["major"]), int(match["minor"]), int(match["patch"]), _identifiers(match["pre"])
    )


def try_version(text: str | None) -> Version | None:
    if text is None:
        return None
    try:
        return parse_version(text)
    except InvalidError:
        return None


@dataclass(frozen=True, slots=True)
class Comparator:
    op: str  # "<", "<=", ">", ">=", "="
    version: Version

    def test(self, v: Version) -> bool:
        return _OPS[self.op](v.sort_key, self.version.sort_key)

    def __str__(self) -> str:
        return f"{'' if self.op == '=' else self.op}{self.version}"


_OPS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "=": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}

# A comparator set: every comparator must hold. () is "any version" (node-semver's ``*``).
ComparatorSet = tuple[Comparator, ...]
# Never satisfied (node-semver's "<0.0.0-0", from ">*" or "<*").
_NOTHING: Final[ComparatorSet] = (Comparator("<", Version(0, 0, 0, (0,))),)


@dataclass(frozen=True, slots=True)
class Range:
    """A parsed range: satisfied when any of its comparator sets is."""

    text: str
    sets: tuple[ComparatorSet, ...]

    def satisfied_by(self, version: Version) -> bool:
        return any(_test_set(s, version) for s in self.sets)

    @property
    def desugared(self) -> str:
        """node-semver's ``new Range(text).range``: ``>=1.2.3 <2.0.0-0`` for ``^1.2.3``."""
        return "||".join(" ".join(str(c) for c in s) or "*" for s in self.sets)

    def __str__(self) -> str:
        return self.text


def _test_set(comparators: ComparatorSet, version: Version) -> bool:
    for c in comparators:
        if not c.test(version):
            return False
    if version.prerelease:
        # node-semver's testSet: a prerelease only where the set opted into its tuple.
        release = version.release
        return any(c.version.prerelease and c.version.release == release for c in comparators)
    return True


def satisfies(version: str | Version, range_: str | Range) -> bool:
    v = parse_version(version) if isinstance(version, str) else version
    r = parse_range(range_) if isinstance(range_, str) else range_
    return r.satisfied_by(v)


@dataclass(frozen=True, slots=True)
class _Partial:
    major: int | None
    minor: int | None
    patch: int | None
    prerelease: tuple[Identifier, ...]


def _x(part: str | None) -> int | None:
    return None if part is None or part in ("x", "X", "*") else int(part)


def _partial(text: str, whole: str) -> _Partial:
    match = _PARTIAL_RE.match(text)
    if match is None:
        raise InvalidError(
            f"version_range {whole[:64]!r}: {text[:32]!r} is not a version or an x-range",
            field="version_range",
        )
    major, minor, patch = _x(match["major"]), _x(match["minor"]), _x(match["patch"])
    # 1.x.3 means 1.x.x: anything after a wildcard is a wildcard.
    if major is None:
        minor = patch = None
    elif minor is None:
        patch = None
    return _Partial(major, minor, patch, _identifiers(match["pre"]) if patch is not None else ())


def _v(major: int, minor: int, patch: int, pre: tuple[Identifier, ...] = ()) -> Version:
    return Version(major, minor, patch, pre)


_ZERO_PRE: Final = (0,)


def _tilde(p: _Partial) -> ComparatorSet:
    if p.major is None:
        return ()
    if p.minor is None:
        return (
            Comparator(">=", _v(p.major, 0, 0)),
            Comparator("<", _v(p.major + 1, 0, 0, _ZERO_PRE)),
        )
    lower = _v(p.major, p.minor, p.patch or 0, p.prerelease)
    return (Comparator(">=", lower), Comparator("<", _v(p.major, p.minor + 1, 0, _ZERO_PRE)))


def _caret(p: _Partial) -> ComparatorSet:
    if p.major is None:
        return ()
    m = p.major
    if p.minor is None:
        return (Comparator(">=", _v(m, 0, 0)), Comparator("<", _v(m + 1, 0, 0, _ZERO_PRE)))
    n = p.minor
    if p.patch is None:
        upper = _v(m + 1, 0, 0, _ZERO_PRE) if m else _v(0, n + 1, 0, _ZERO_PRE)
        return (Comparator(">=", _v(m, n, 0)), Comparator("<", upper))
    lower = _v(m, n, p.patch, p.prerelease)
    if m:
        upper = _v(m + 1, 0, 0, _ZERO_PRE)
    elif n:
        upper = _v(0, n + 1, 0, _ZERO_PRE)
    else:
        upper = _v(0, 0, p.patch + 1, _ZERO_PRE)
    return (Comparator(">=", lower), Comparator("<", upper))


def _primitive(op: str, p: _Partial) -> ComparatorSet:
    """``op`` (<, <=, >, >=, = or none) applied to a possibly partial version, as node-semver's
    replaceXRange does it."""
    if p.major is None:
        return _NOTHING if op in ("<", ">") else ()
    if p.minor is not None and p.patch is not None:
        return (Comparator(op or "=", _v(p.major, p.minor, p.patch, p.prerelease)),)
    # A partial: 1 means [1.0.0, 2.0.0-0), 1.2 means [1.2.0, 1.3.0-0).
    low = _v(p.major, p.minor or 0, 0)
    high = (
        _v(p.major + 1, 0, 0, _ZERO_PRE)
        if p.minor is None
        else _v(p.major, p.minor + 1, 0, _ZERO_PRE)
    )
    if op in ("", "="):
        return (Comparator(">=", low), Comparator("<", high))
    if op == ">=":
        return (Comparator(">=", low),)
    if op == ">":
        return (Comparator(">=", _v(high.major, high.minor, 0)),)
    if op == "<":
        return (Comparator("<", _v(low.major, low.minor, 0, _ZERO_PRE)),)
    return (Comparator("<", high),)  # <=


def _hyphen(low_text: str, high_text: str, whole: str) -> ComparatorSet:
    low, high = _partial(low_text, whole), _partial(high_text, whole)
    lower: ComparatorSet = ()
    if low.major is not None:
        lower = (Comparator(">=", _v(low.major, low.minor or 0, low.patch or 0, low.prerelease)),)
    upper: ComparatorSet = ()
    if high.major is not None:
        if high.minor is None:
            upper = (Comparator("<", _v(high.major + 1, 0, 0, _ZERO_PRE)),)
        elif high.patch is None:
            upper = (Comparator("<", _v(high.major, high.minor + 1, 0, _ZERO_PRE)),)
        else:
            upper = (Comparator("<=", _v(high.major, high.minor, high.patch, high.prerelease)),)
    return lower + upper


def _comparator_set(text: str, whole: str) -> ComparatorSet:
    hyphen = _HYPHEN_RE.match(text)
    if hyphen is not None:
        return _hyphen(hyphen["low"], hyphen["high"], whole)
    out: list[Comparator] = []
    for token in _OP_SPACE_RE.sub(r"\1", text).split():
        match = _COMPARATOR_RE.match(token)
        assert match is not None  # the pattern accepts any text
        op = match["op"] or ""
        partial = _partial(match["rest"], whole)
        if op in ("~", "~>"):
            out.extend(_tilde(partial))
        elif op == "^":
            out.extend(_caret(partial))
        else:
            out.extend(_primitive(op, partial))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def parse_range(text: str) -> Range:
    """``text`` in node-semver's range grammar; InvalidError naming the bad part otherwise."""
    if len(text) > MAX_RANGE_CHARS:
        raise InvalidError(
            f"version_range is longer than {MAX_RANGE_CHARS} characters", field="version_range"
        )
    sets = tuple(_comparator_set(part.strip(), text) for part in text.split("||"))
    return Range(text=text.strip() or "*", sets=sets)


def check_range(text: str) -> str:
    """``text`` if it parses (the stored form keeps the user's spelling)."""
    parse_range(text)
    return text.strip() or "*"


def _candidates(ranges: Iterable[Range]) -> set[Version]:
    """Versions among which, if any version satisfies every range, one does: the smallest
    version at or above each lower bound (a bound itself, the next patch, the release of a
    prerelease bound, a bound's first prerelease successor), and 0.0.0."""
    out = {Version(0, 0, 0)}
    for r in ranges:
        for s in r.sets:
            for c in s:
                v = c.version
                out.add(v)
                out.add(_v(v.major, v.minor, v.patch))
                out.add(_v(v.major, v.minor, v.patch + 1))
                if v.prerelease:
                    out.add(_v(v.major, v.minor, v.patch, (*v.prerelease, 0)))
                    out.add(_v(v.major, v.minor, v.patch, _ZERO_PRE))
    return out


def _release_witness(sets: Sequence[ComparatorSet]) -> Version | None:
    """The smallest release (no prerelease) that every comparator of ``sets`` admits, when
    one exists: the bounds of an intersection of intervals, in O(comparators). None means
    "look further" (only prereleases may be left), not "none"."""
    lowest: Version | None = None
    for s in sets:
        for c in s:
            if c.op in (">", ">=", "="):
                v = c.version
                if v.prerelease:
                    candidate = _v(v.major, v.minor, v.patch)
                elif c.op == ">":
                    candidate = _v(v.major, v.minor, v.patch + 1)
                else:
                    candidate = v
                if lowest is None or candidate.sort_key > lowest.sort_key:
                    lowest = candidate
    witness = lowest or Version(0, 0, 0)
    return witness if all(_test_set(s, witness) for s in sets) else None


def _admits_prereleases(r: Range) -> bool:
    """Whether any prerelease can satisfy ``r``: only through a comparator naming one, and an
    upper bound ``<X.Y.Z-0`` (what ^, ~ and x-ranges end with) admits none."""
    return any(
        c.version.prerelease and not (c.op == "<" and c.version.prerelease == _ZERO_PRE)
        for s in r.sets
        for c in s
    )


# Past this many combinations of ||-alternatives, the candidate search alone decides.
_MAX_COMBINATIONS = 256


def common_version(ranges: Sequence[Range]) -> Version | None:
    """A version that satisfies every range in ``ranges`` (the smallest release when there is
    one, else the smallest prerelease), or None when no version does (the ranges conflict)."""
    combinations = 1
    for r in ranges:
        combinations *= len(r.sets)
    if combinations <= _MAX_COMBINATIONS:
        # One interval per alternative: a release in an intersection is found directly.
        best: Version | None = None
        for chosen in itertools.product(*(r.sets for r in ranges)):
            found = _release_witness(chosen)
            if found is not None and (best is None or found.sort_key < best.sort_key):
                best = found
        if best is not None:
            return best
        if not any(_admits_prereleases(r) for r in ranges):
            return None
    for candidate in sorted(_candidates(ranges), key=_key):
        if all(r.satisfied_by(candidate) for r in ranges):
            return candidate
    return None


@functools.lru_cache(maxsize=65536)
def have_common_version(texts: tuple[str, ...]) -> bool:
    """Whether some version satisfies every range in ``texts`` (valid ranges, by text; a
    recompute asks the same few questions of thousands of dependents)."""
    return common_version([parse_range(t) for t in texts]) is not None
