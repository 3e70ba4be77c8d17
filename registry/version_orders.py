"""Each OSV ecosystem's own version order, for ECOSYSTEM range events (as OSV-Scanner compares
them): dpkg (Debian, Ubuntu), apk-tools (Alpine, Wolfi, Chainguard), Maven's
ComparableVersion, RubyGems' Gem::Version, NuGet's SemVer 2.0 with four release parts, and
PHP's version_compare after Composer's normalisation (Packagist).

Pure: :func:`order_key` turns a version into a comparable key, or None when the text is not a
version of that ecosystem (the caller then falls back to a generic order). Keys of one
ecosystem compare only with each other. Where the reference is a pairwise comparison whose
order is not a plain tuple order (apk, Maven, RubyGems, PHP) the key wraps the parsed
version with :func:`functools.cmp_to_key` and the ported comparison; dpkg and NuGet are
plain tuples. Each section names the source it was ported from. The six ports sit side by
side (about 500 lines) so that the dispatch table and the sources stay in one place.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable
from typing import Any, Final

# --- Debian / Ubuntu: dpkg ------------------------------------------------------------------
# Debian Policy 5.6.12 ("Version") and dpkg's lib/dpkg/version.c (order(), verrevcmp(),
# dpkg_version_compare()): [epoch:]upstream[-revision]; the epoch is compared as a number; the
# upstream version and the revision alternate non-digit and digit runs; in a non-digit run '~'
# sorts before everything, even the end of the run, then the end, then letters, then every
# other character (by code + 256); digit runs compare as numbers (empty = 0). A missing
# revision compares like "0" (dpkg: "1.0" == "1.0-0").

_DPKG_EPOCH_RE: Final = re.compile(r"^(\d+):(.*)$", re.ASCII | re.DOTALL)


def _dpkg_weight(c: str) -> int:
    if c == "~":
        return -1
    if c.isascii() and c.isalpha():
        return ord(c)
    return ord(c) + 256


def _dpkg_part(text: str) -> tuple[int, ...]:
    """A flat key of one upstream/revision: per non-digit run its weights and an end marker (0,
    which only '~' sorts before), then the digit run's value. Every key starts with a run
    (possibly empty) so that the runs line up when two keys are compared."""
    key: list[int] = []
    i, n = 0, len(text)
    while True:
        start = i
        while i < n and not ("0" <= text[i] <= "9"):
            i += 1
        key.extend(_dpkg_weight(c) for c in text[start:i])
        key.append(0)
        start = i
        while i < n and "0" <= text[i] <= "9":
            i += 1
        key.append(int(text[start:i] or "0"))
        if i >= n:
            # The end of the text is an empty non-digit run: its marker sorts it after a
            # '~' that the other version goes on with, and before anything else.
            key.append(0)
            return tuple(key)


def _dpkg_key(version: str) -> tuple[Any, ...] | None:
    text = version.strip()
    epoch = 0
    if ":" in text:
        m = _DPKG_EPOCH_RE.match(text)
        if m is None:
            return None  # dpkg: "epoch in version is not number"
        epoch, text = int(m.group(1)), m.group(2)
    upstream, dash, revision = text.rpartition("-")
    if not dash:
        upstream, revision = text, ""
    return (epoch, _dpkg_part(upstream), _dpkg_part(revision))


# --- Alpine / Wolfi / Chainguard: apk-tools -------------------------------------------------
# apk-tools src/version.c as of v2.14.9 (next_token(), get_token(),
# apk_version_compare_blob_fuzzy()),
# "Gentoo version: {digit}{.digit}...{letter}{_suf{#}}...{-r#}", ported state for state so that
# invalid versions compare as apk compares them. A part after '.' with leading zeros is
# compared as the count of zeros before its last leading one, negated, then as a number.

_T_INVALID, _T_DIGIT_OR_ZERO, _T_DIGIT, _T_LETTER, _T_SUFFIX, _T_SUFFIX_NO = -1, 0, 1, 2, 3, 4
_T_REVISION_NO, _T_END = 5, 6
_APK_PRE: Final = ("alpha", "beta", "pre", "rc")
_APK_POST: Final = ("cvs", "svn", "git", "hg", "p")


class _ApkTokens:
    """A cursor over one version string, as apk's apk_blob_t with its token type."""

    __slots__ = ("pos", "text", "type")

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.type = text, 0, _T_DIGIT

    def _next_type(self) -> None:
        t, s, p = self.type, self.text, self.pos
        n = _T_INVALID
        if p >= len(s):
            n = _T_END
        elif t in (_T_DIGIT, _T_DIGIT_OR_ZERO) and "a" <= s[p] <= "z":
            n = _T_LETTER
        elif t == _T_LETTER and s[p].isascii() and s[p].isdigit():
            n = _T_DIGIT
        elif t == _T_SUFFIX and s[p].isascii() and s[p].isdigit():
            n = _T_SUFFIX_NO
        else:
            if s[p] == ".":
                n = _T_DIGIT_OR_ZERO
            elif s[p] == "_":
                n = _T_SUFFIX
            elif s[p] == "-" and p + 1 < len(s) and s[p + 1] == "r":
                n = _T_REVISION_NO
                p += 1
            p += 1
        if n < t and not (
            (n == _T_DIGIT_OR_ZERO and t == _T_DIGIT)
            or (n == _T_SUFFIX and t == _T_SUFFIX_NO)
            or (n == _T_DIGIT and t == _T_LETTER)
        ):
            n = _T_INVALID
        self.type, self.pos = n, p

    def get(self) -> int:
        s, p, t = self.text, self.pos, self.type
        if p >= len(s):
            self.type = _T_END
            return 0
        v, i, nt = 0, 0, _T_INVALID
        if t == _T_DIGIT_OR_ZERO and s[p] == "0":
            # The zeros before the last leading one, negated; the digits from it on are the
            # next (DIGIT) token.
            while p + i + 1 < len(s) and s[p + i + 1] == "0":
                i += 1
            nt, v = _T_DIGIT, -i
        elif t in (_T_DIGIT_OR_ZERO, _T_DIGIT, _T_SUFFIX_NO, _T_REVISION_NO):
            while p + i < len(s) and s[p + i].isascii() and s[p + i].isdigit():
                i += 1
            if i >= 18:  # apk: more digits than an int64 holds is invalid
                self.type = _T_INVALID
                return -1
            v = int(s[p : p + i] or "0")
        elif t == _T_LETTER:
            v, i = ord(s[p]), 1
        elif t == _T_SUFFIX:
            rest = s[p:]
            pre = next((k for k, w in enumerate(_APK_PRE) if rest.startswith(w)), None)
            post = next((k for k, w in enumerate(_APK_POST) if rest.startswith(w)), None)
            if pre is not None:
                v, i = pre - len(_APK_PRE), len(_APK_PRE[pre])
            elif post is not None:
                v, i = post, len(_APK_POST[post])
            else:
                self.type = _T_INVALID
                return -1
        else:
            self.type = _T_INVALID
            return -1
        self.pos = p + i
        if self.pos >= len(s):
            self.type = _T_END
        elif nt != _T_INVALID:
            self.type = nt
        else:
            self._next_type()
        return v


def _apk_compare(a: str, b: str) -> int:
    ta, tb = _ApkTokens(a), _ApkTokens(b)
    av = bv = 0
    while ta.type == tb.type and ta.type not in (_T_END, _T_INVALID) and av == bv:
        av, bv = ta.get(), tb.get()
    if av != bv:
        return -1 if av < bv else 1
    at, bt = ta.type, tb.type
    if at == bt:
        return 0
    # Equal so far: the one that goes on is greater unless it goes on with a pre-release
    # suffix; otherwise the token type it stopped at decides (END is the highest type, so the
    # version that ended is the lower one; INVALID the lowest).
    if at == _T_SUFFIX and ta.get() < 0:
        return -1
    if bt == _T_SUFFIX and tb.get() < 0:
        return 1
    return -1 if at > bt else 1


# --- Maven: ComparableVersion ---------------------------------------------------------------
# apache/maven maven-artifact ComparableVersion (3.6-3.8: IntItem, StringItem, ListItem and
# parseVersion(); 3.9's reading of ".qualifier" as "-qualifier" and "X-1" as "X1" is not
# ported) and the POM reference's "Version Order Specification": items split on '.',
# '-' (which opens a sub-list) and digit/letter transitions (which open a sub-list too);
# qualifiers alpha < beta < milestone < rc = cr < snapshot < "" = ga = final = release < sp,
# unknown ones after them in lexical order; a1/b1/m1 = alpha-1/beta-1/milestone-1; trailing
# null items (0, "", an empty list) are trimmed from every list. Items are modelled as int,
# str (a qualifier) and list (a sub-list). "release" as an alias is Maven 3.9's (MNG-7559).

_MAVEN_QUALIFIERS: Final = ("alpha", "beta", "milestone", "rc", "snapshot", "", "sp")
_MAVEN_ALIASES: Final = {"ga": "", "final": "", "release": "", "cr": "rc"}
_MAVEN_RELEASE: Final = str(_MAVEN_QUALIFIERS.index(""))
_MAVEN_SHORT: Final = {"a": "alpha", "b": "beta", "m": "milestone"}

MavenItem = int | str | list[Any]


def _maven_qualifier(value: str) -> str:
    # ComparableVersion.comparableQualifier: the known ones by index, then "7-<text>".
    if value in _MAVEN_QUALIFIERS:
        return str(_MAVEN_QUALIFIERS.index(value))
    return f"{len(_MAVEN_QUALIFIERS)}-{value}"


def _maven_string(value: str, *, followed_by_digit: bool) -> str:
    if followed_by_digit and value in _MAVEN_SHORT:
        value = _MAVEN_SHORT[value]
    return _MAVEN_ALIASES.get(value, value)


def _maven_is_null(item: MavenItem) -> bool:
    if isinstance(item, int):
        return item == 0
    if isinstance(item, str):
        return _maven_qualifier(item) == _MAVEN_RELEASE
    return not item


def _cmp(a: Any, b: Any) -> int:
    return int(a > b) - int(a < b)


def _maven_item_compare(a: MavenItem, b: MavenItem | None) -> int:
    if isinstance(a, int):
        if b is None:
            return 0 if a == 0 else 1  # 1.0 == 1, 1.1 > 1
        return _cmp(a, b) if isinstance(b, int) else 1  # 1.1 > 1-sp, 1.1 > 1-1
    if isinstance(a, str):
        if b is None:
            return _cmp(_maven_qualifier(a), _MAVEN_RELEASE)  # 1-rc < 1, 1-sp > 1
        if isinstance(b, str):
            return _cmp(_maven_qualifier(a), _maven_qualifier(b))
        return -1  # 1.any < 1.1, 1.any < 1-1
    if b is None:
        return _maven_item_compare(a[0], None) if a else 0
    if isinstance(b, int):
        return -1  # 1-1 < 1.0.x
    if isinstance(b, str):
        return 1  # 1-1 > 1-sp
    for left, right in itertools.zip_longest(a, b):
        if left is None:
            result = -_maven_item_compare(right, None)
        else:
            result = _maven_item_compare(left, right)
        if result:
            return result
    return 0


def _maven_items(version: str) -> list[MavenItem]:
    text = version.lower()
    items: list[MavenItem] = []
    current = items
    stack = [items]
    is_digit = False
    start = 0

    def item(buf: str, digit: bool) -> MavenItem:
        return int(buf) if digit else _maven_string(buf, followed_by_digit=False)

    def open_list() -> None:
        nonlocal current
        sub: list[MavenItem] = []
        current.append(sub)
        current = sub
        stack.append(sub)

    for i, c in enumerate(text):
        if c in ".-":
            current.append(0 if i == start else item(text[start:i], is_digit))
            start = i + 1
            if c == "-":
                open_list()
        elif c.isdecimal():
            if not is_digit and i > start:
                current.append(_maven_string(text[start:i], followed_by_digit=True))
                start = i
                open_list()
            is_digit = True
        else:
            if is_digit and i > start:
                current.append(int(text[start:i]))
                start = i
                open_list()
            is_digit = False
    if len(text) > start:
        current.append(item(text[start:], is_digit))
    for lst in reversed(stack):  # ListItem.normalize(), innermost first
        for k in range(len(lst) - 1, -1, -1):
            if _maven_is_null(lst[k]):
                del lst[k]
            elif not isinstance(lst[k], list):
                break
    return items


# --- RubyGems: Gem::Version -----------------------------------------------------------------
# rubygems lib/rubygems/version.rb: "-" is read as ".pre."; segments are the runs of digits
# (numbers) and of letters (strings); canonical segments drop the trailing zeros of the
# numeric part and of the part from the first string on; <=> pads the shorter with 0, a string
# sorts before a number (so 1.0.a < 1.0), strings compare bytewise.

_GEM_SEGMENT_RE: Final = re.compile(r"[0-9]+|[a-z]+", re.IGNORECASE)


def _gem_segments(version: str) -> tuple[int | str, ...] | None:
    # Gem::Version.correct? rejects e.g. "1beta"; its segments still order it (as OSV-Scanner
    # does), which keeps a range in RubyGems order instead of dropping it to the generic one.
    text = version.strip().replace("-", ".pre.") or "0"
    if _GEM_SEGMENT_RE.search(text) is None:
        return None
    segments: list[int | str] = [
        int(s) if s.isdigit() else s for s in _GEM_SEGMENT_RE.findall(text)
    ]
    first_string = next((i for i, s in enumerate(segments) if isinstance(s, str)), len(segments))
    canonical: list[int | str] = []
    for part in (segments[:first_string], segments[first_string:]):
        while part and part[-1] == 0:
            part.pop()
        canonical.extend(part)
    return tuple(canonical)


def _gem_compare(a: tuple[int | str, ...], b: tuple[int | str, ...]) -> int:
    for left, right in itertools.zip_longest(a, b, fillvalue=0):
        if left == right:
            continue
        if isinstance(left, str) and isinstance(right, int):
            return -1
        if isinstance(left, int) and isinstance(right, str):
            return 1
        return _cmp(left, right)
    return 0


# --- NuGet: NuGetVersion --------------------------------------------------------------------
# NuGet.Versioning (NuGetVersion, VersionComparer.Default) and the "Package versioning" docs:
# Major.Minor.Patch[.Revision] (missing parts are 0, so 1.0 == 1.0.0 == 1.0.0.0), then SemVer
# 2.0 pre-release precedence with labels compared case-insensitively (numeric labels as
# numbers, before alphanumeric ones); build metadata ignored.

_NUGET_RE: Final = re.compile(
    r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:\.(\d+))?"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?\s*$",
    re.ASCII,
)


def _nuget_key(version: str) -> tuple[Any, ...] | None:
    m = _NUGET_RE.match(version)
    if m is None:
        return None
    release = tuple(int(p or 0) for p in m.groups()[:4])
    pre = m.group(5)
    if pre is None:
        return (release, 1, ())
    labels = tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in pre.split("."))
    return (release, 0, labels)


# --- Packagist: Composer + PHP version_compare ----------------------------------------------
# composer/semver VersionParser::normalize() (leading v dropped, build metadata dropped,
# classical versions padded to four numbers, stability spelled alpha/beta/RC/patch/dev), then
# php-src ext/standard/versioning.c: php_canonicalize_version() ('-', '_', '+' and other
# non-alphanumerics become '.', a '.' between digit and non-digit runs) and
# php_version_compare() with its special forms dev < alpha = a < beta = b < RC = rc < # (a
# number) < pl = p, matched by prefix (so "patch" is "p"); an unknown word sorts before "dev".

_COMPOSER_RE: Final = re.compile(
    r"^v?(\d{1,5})(\.\d+)?(\.\d+)?(\.\d+)?[._-]?"
    r"(?:(stable|beta|b|RC|alpha|a|patch|pl|p)((?:[.-]?\d+)*)?)?([.-]?dev)?$",
    re.IGNORECASE | re.ASCII,
)
_COMPOSER_STABILITY: Final = {"a": "alpha", "b": "beta", "p": "patch", "pl": "patch", "rc": "RC"}
_PHP_FORMS: Final = (
    ("dev", 0), ("alpha", 1), ("a", 1), ("beta", 2), ("b", 2), ("RC", 3), ("rc", 3), ("#", 4),
    ("pl", 5), ("p", 5),
)  # fmt: skip


def _composer_normalize(version: str) -> str:
    text = version.strip()
    text = re.sub(r"^([^,\s+]+)\+\S+$", r"\1", text)  # build metadata
    m = _COMPOSER_RE.match(text)
    if m is None:
        return text[1:] if text[:1] in ("v", "V") else text
    major, *rest = m.groups()[:4]
    normalized = major + "".join(p or ".0" for p in rest)
    stability, number, dev = m.group(5), m.group(6), m.group(7)
    if stability and stability.lower() != "stable":
        word = _COMPOSER_STABILITY.get(stability.lower(), stability.lower())
        normalized += f"-{word}{(number or '').lstrip('.-')}"
    if dev:
        normalized += "-dev"
    return normalized


def _php_canonical(version: str) -> list[str]:
    if not version:
        return []
    out = [version[0]]
    last = version[0]

    def is_digit(c: str) -> bool:
        return "0" <= c <= "9"

    for c in version[1:]:
        dot_needed = out[-1] != "."
        if c in "-_+":
            if dot_needed:
                out.append(".")
        elif (not is_digit(last) and last != "." and is_digit(c)) or (
            is_digit(last) and not is_digit(c) and c != "."
        ):
            if dot_needed:
                out.append(".")
            out.append(c)
        elif not (c.isascii() and c.isalnum()):
            if dot_needed:
                out.append(".")
        else:
            out.append(c)
        last = c
    return "".join(out).split(".")


def _php_form(part: str) -> int:
    return next((order for name, order in _PHP_FORMS if part.startswith(name)), -1)


def _php_digit(part: str) -> bool:
    # C's isdigit: ASCII only ("²".isdigit() is True in Python).
    return "0" <= part[:1] <= "9"


def _php_compare_parts(a: list[str], b: list[str]) -> int:
    for left, right in zip(a, b, strict=False):
        ld, rd = _php_digit(left), _php_digit(right)
        if ld and rd:
            # A canonical part that starts with a digit is all digits (strtol in PHP).
            result = _cmp(int(left), int(right))
        elif not ld and not rd:
            result = _cmp(_php_form(left), _php_form(right))
        else:
            result = _cmp(_php_form("#N#" if ld else left), _php_form("#N#" if rd else right))
        if result:
            return result
    if len(a) > len(b):
        rest = a[len(b) :]
        return 1 if _php_digit(rest[0]) else _php_compare_parts(rest, ["#N#"])
    if len(b) > len(a):
        rest = b[len(a) :]
        return -1 if _php_digit(rest[0]) else _php_compare_parts(["#N#"], rest)
    return 0


# --- dispatch -------------------------------------------------------------------------------


def _wrapped(
    parse: Callable[[str], Any], compare: Callable[[Any, Any], int]
) -> Callable[[str], tuple[Any, ...] | None]:
    key_class = functools.cmp_to_key(compare)

    def key(version: str) -> tuple[Any, ...] | None:
        parsed = parse(version)
        return None if parsed is None else (key_class(parsed),)

    return key


ORDERS: Final[dict[str, Callable[[str], tuple[Any, ...] | None]]] = {
    "Debian": _dpkg_key,
    "Ubuntu": _dpkg_key,
    "Alpine": _wrapped(str.strip, _apk_compare),
    "Wolfi": _wrapped(str.strip, _apk_compare),
    "Chainguard": _wrapped(str.strip, _apk_compare),
    "Maven": _wrapped(_maven_items, _maven_item_compare),
    "RubyGems": _wrapped(_gem_segments, _gem_compare),
    "NuGet": _nuget_key,
    "Packagist": _wrapped(lambda v: _php_canonical(_composer_normalize(v)), _php_compare_parts),
}


def order_key(ecosystem: str, version: str) -> tuple[Any, ...] | None:
    """The ecosystem's own sort key of ``version``; None for an ecosystem without an order
    here or a text that is not one of its versions."""
    order = ORDERS.get(ecosystem)
    return None if order is None else order(version)


def compare(ecosystem: str, a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` sorts before, with or after ``b`` in ``ecosystem``'s order; raises
    ValueError naming the version that is not one of the ecosystem's."""
    ka, kb = order_key(ecosystem, a), order_key(ecosystem, b)
    for text, key in ((a, ka), (b, kb)):
        if key is None:
            raise ValueError(f"version {text!r} is not a {ecosystem} version")
    return _cmp(ka, kb)
