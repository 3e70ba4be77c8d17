"""Offline matching against OSV advisories: loading a local advisory database (a directory of
per-ecosystem zips or JSON files, as osv.dev publishes them), comparing versions, and matching
SBOM components by package and ``affected[].ranges`` (SEMVER and ECOSYSTEM events).
ECOSYSTEM events compare in the ecosystem's own order: SemVer (npm, Go, crates.io, Hex, Pub),
PEP 440 (PyPI) here, and those of registry/version_orders.py; any other ecosystem in an
approximate generic order (:func:`_generic_key`).

Pure apart from :func:`load_database` / :func:`database_digest`, which read files (call them
through ``asyncio.to_thread``). Range evaluation follows the OSV schema's algorithm: events
sorted by version, ``introduced`` opens, ``fixed`` (exclusive) and ``last_affected``
(inclusive) close; ``limit`` only bounds GIT ranges and GIT ranges are not evaluated (an SBOM
carries versions, not commits). An explicit ``versions`` list matches too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

from packaging.version import InvalidVersion, Version

from pluginmon.registry.cvss import CvssError, Severity, base_score, severity_of_label
from pluginmon.registry.version_orders import order_key

logger = logging.getLogger(__name__)

# purl type -> OSV ecosystem name.
PURL_ECOSYSTEMS: Final = {
    "npm": "npm",
    "pypi": "PyPI",
    "golang": "Go",
    "maven": "Maven",
    "cargo": "crates.io",
    "gem": "RubyGems",
    "nuget": "NuGet",
    "composer": "Packagist",
    "hex": "Hex",
    "pub": "Pub",
    "deb": "Debian",
    "apk": "Alpine",
}
_SEMVER_RE = re.compile(
    r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)
_TOKEN_RE = re.compile(r"\d+|[A-Za-z]+")
# Suffixes that sort after the bare release in the generic ordering (1.0.post1 > 1.0).
_POST_WORDS: Final = frozenset({"post", "p", "pl", "patch", "sp", "final", "ga", "release", "r"})


# --- versions ---------------------------------------------------------------------------------


def _semver_key(text: str) -> tuple[Any, ...] | None:
    m = _SEMVER_RE.match(text.strip())
    if m is None:
        return None
    major, minor, patch, pre = m.groups()
    release = (int(major), int(minor or 0), int(patch or 0))
    if pre is None:
        return (release, 1, ())
    # SemVer 2.0 precedence: numeric identifiers sort before alphanumeric ones.
    ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (release, 0, ids)


def _generic_key(text: str) -> tuple[Any, ...]:
    """An approximate total order for ecosystems without an exact one here (and for versions
    an ecosystem's parser rejects): the leading dotted numbers, then a suffix that is a
    pre-release (before the bare release) unless it names a post-release."""
    tokens = _TOKEN_RE.findall(text)
    numbers: list[int] = []
    rest: list[str] = []
    for t in tokens:
        if t.isdigit() and not rest:
            numbers.append(int(t))
        else:
            rest.append(t)
    while numbers and numbers[-1] == 0:
        numbers.pop()
    if not rest:
        tail: tuple[Any, ...] = (1,)
    elif rest[0].lower() in _POST_WORDS:
        tail = (2, tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in rest))
    else:
        tail = (0, tuple((0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in rest))
    return (tuple(numbers), tail)


@dataclass(frozen=True, slots=True)
class VersionKey:
    """A comparable version. Keys of different kinds never meet: a range is compared in the
    kind of the version being checked, and a bound that does not parse in it falls back."""

    kind: str
    key: tuple[Any, ...]


def version_key(version: str, *, ecosystem: str, range_type: str = "ECOSYSTEM") -> VersionKey:
    base = ecosystem.split(":", 1)[0]
    if range_type == "SEMVER" or base in ("npm", "Go", "crates.io", "Hex", "Pub"):
        key = _semver_key(version)
        if key is not None:
            return VersionKey("semver", key)
    elif base == "PyPI":
        try:
            return VersionKey("pep440", (Version(version),))
        except InvalidVersion:
            pass
    else:
        # Debian/Ubuntu, Alpine/Wolfi/Chainguard, Maven, RubyGems, NuGet, Packagist: the
        # ecosystem's own order (registry/version_orders.py).
        exact = order_key(base, version)
        if exact is not None:
            return VersionKey(base, exact)
    return VersionKey("generic", _generic_key(version))


# --- advisories ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # introduced | fixed | last_affected
    version: str


@dataclass(frozen=True, slots=True)
class VersionRange:
    type: str  # SEMVER | ECOSYSTEM
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class Affected:
    ecosystem: str
    name: str
    ranges: tuple[VersionRange, ...]
    versions: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Advisory:
    id: str
    aliases: tuple[str, ...]
    summary: str | None
    details: str | None
    severity: Severity
    cvss_score: float | None
    cvss_vector: str | None
    affected: tuple[Affected, ...]
    withdrawn: bool = False


def normalize_name(ecosystem: str, name: str) -> str:
    base = ecosystem.split(":", 1)[0]
    if base == "PyPI":
        return re.sub(r"[-_.]+", "-", name).lower()
    return name


def _score_of(severity: Any) -> tuple[Severity, float | None, str | None]:
    """The highest CVSS v3 base score among OSV ``severity`` entries."""
    best: tuple[Severity, float | None, str | None] = (Severity.UNKNOWN, None, None)
    for entry in severity if isinstance(severity, list) else []:
        if not isinstance(entry, Mapping) or entry.get("type") not in ("CVSS_V3", "CVSS_V31"):
            continue
        try:
            s = base_score(str(entry.get("score", "")))
        except CvssError:
            continue
        if best[1] is None or s.base_score > best[1]:
            best = (s.severity, s.base_score, s.vector)
    return best


def parse_advisory(doc: Mapping[str, Any]) -> Advisory:
    """One OSV record (schema 1.x). Raises ValueError naming the field that is wrong."""
    advisory_id = doc.get("id")
    if not isinstance(advisory_id, str) or not advisory_id:
        raise ValueError("id: an OSV record needs a non-empty id")
    severity, score, vector = _score_of(doc.get("severity"))
    affected: list[Affected] = []
    for item in doc.get("affected") or []:
        if not isinstance(item, Mapping):
            continue
        package = item.get("package") or {}
        ecosystem, name = package.get("ecosystem"), package.get("name")
        if not isinstance(ecosystem, str) or not isinstance(name, str):
            continue
        if score is None:
            severity, score, vector = _score_of(item.get("severity"))
        ranges = []
        for r in item.get("ranges") or []:
            if not isinstance(r, Mapping) or r.get("type") not in ("SEMVER", "ECOSYSTEM"):
                continue
            events = tuple(
                Event(kind, str(e[kind]))
                for e in r.get("events") or []
                if isinstance(e, Mapping)
                for kind in ("introduced", "fixed", "last_affected")
                if kind in e
            )
            ranges.append(VersionRange(str(r["type"]), events))
        versions = frozenset(str(v) for v in item.get("versions") or [])
        affected.append(Affected(ecosystem, name, tuple(ranges), versions))
    if severity is Severity.UNKNOWN:
        specific = doc.get("database_specific")
        if isinstance(specific, Mapping):
            severity = severity_of_label(specific.get("severity"))
    aliases = doc.get("aliases") or []
    return Advisory(
        id=advisory_id,
        aliases=tuple(str(a) for a in aliases if isinstance(a, str)),
        summary=doc.get("summary") if isinstance(doc.get("summary"), str) else None,
        details=doc.get("details") if isinstance(doc.get("details"), str) else None,
        severity=severity,
        cvss_score=score,
        cvss_vector=vector,
        affected=tuple(affected),
        withdrawn=bool(doc.get("withdrawn")),
    )


def in_range(version: str, vrange: VersionRange, *, ecosystem: str) -> bool:
    """The OSV schema's evaluation of one SEMVER/ECOSYSTEM range for ``version``."""
    checked = version_key(version, ecosystem=ecosystem, range_type=vrange.type)
    bounds = [
        None
        if e.kind == "introduced" and e.version == "0"
        else version_key(e.version, ecosystem=ecosystem, range_type=vrange.type)
        for e in vrange.events
    ]
    if any(b is not None and b.kind != checked.kind for b in bounds):
        # A bound this ecosystem's parser does not read: compare everything generically.
        checked = VersionKey("generic", _generic_key(version))
        bounds = [
            None if b is None else VersionKey("generic", _generic_key(e.version))
            for e, b in zip(vrange.events, bounds, strict=True)
        ]
    # "introduced: 0" is below every version; the others sort by version.
    ordered = sorted(
        zip(vrange.events, bounds, strict=True),
        key=lambda pair: (0, ()) if pair[1] is None else (1, pair[1].key),
    )
    affected = False
    for e, b in ordered:
        if e.kind == "introduced":
            if b is None or checked.key >= b.key:
                affected = True
        elif b is None:
            continue
        elif e.kind == "fixed":
            if checked.key >= b.key:
                affected = False
        elif e.kind == "last_affected" and checked.key > b.key:
            affected = False
    return affected


def fixed_versions(affected: Affected) -> tuple[str, ...]:
    return tuple(e.version for r in affected.ranges for e in r.events if e.kind == "fixed")


def affected_text(affected: Affected) -> str:
    """A human-readable summary of the ranges (">=1.0.0 <1.2.3; <=0.9.1")."""
    parts = []
    for r in affected.ranges:
        words = []
        for e in r.events:
            if e.kind == "introduced":
                words.append(f">={e.version}" if e.version != "0" else ">=0")
            elif e.kind == "fixed":
                words.append(f"<{e.version}")
            else:
                words.append(f"<={e.version}")
        parts.append(" ".join(words))
    return "; ".join(parts)


# --- the database ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Component:
    """A package from an SBOM: ecosystem (OSV name), name and version."""

    ecosystem: str
    name: str
    version: str
    purl: str | None = None


@dataclass(frozen=True, slots=True)
class Match:
    component: Component
    advisory: Advisory
    affected: Affected


@dataclass(slots=True)
class AdvisoryIndex:
    """Advisories by (ecosystem, normalized package name): matching is one dict look-up per
    component, then the ranges of that package only."""

    by_package: dict[tuple[str, str], list[tuple[Advisory, Affected]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    advisories: int = 0

    def add(self, advisory: Advisory) -> None:
        if advisory.withdrawn:
            return
        self.advisories += 1
        for affected in advisory.affected:
            eco = affected.ecosystem.split(":", 1)[0]
            self.by_package[(eco, normalize_name(eco, affected.name))].append((advisory, affected))

    def match(self, components: Iterable[Component]) -> list[Match]:
        found: list[Match] = []
        for c in components:
            eco = c.ecosystem.split(":", 1)[0]
            for advisory, affected in self.by_package.get((eco, normalize_name(eco, c.name)), ()):
                if c.version in affected.versions or any(
                    in_range(c.version, r, ecosystem=eco) for r in affected.ranges
                ):
                    found.append(Match(c, advisory, affected))
        return found


def _advisory_files(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in (".json", ".zip"):
            yield path


def database_digest(root: Path) -> str:
    """A digest of the database's files (path, size, mtime): it changes when the database is
    replaced or updated, which is when the maintenance job re-scans every SBOM."""
    if not root.exists():
        raise FileNotFoundError(f"vulnerability_db {root} does not exist")
    h = hashlib.sha256()
    for path in _advisory_files(root):
        st = path.stat()
        h.update(
            f"{path.relative_to(root) if root.is_dir() else path.name}\0{st.st_size}\0"
            f"{st.st_mtime_ns}\n".encode()
        )
    return h.hexdigest()


def _load_json(raw: bytes, origin: str, index: AdvisoryIndex) -> None:
    try:
        doc = json.loads(raw)
        index.add(parse_advisory(doc))
    except (ValueError, TypeError, AttributeError) as exc:
        # One bad record must not hide the others; say which.
        logger.warning("vulnerability_db: skipped %s: %s", origin, exc)


def load_database(root: Path) -> AdvisoryIndex:
    """Every advisory under ``root``: a zip (OSV's ``<ecosystem>/all.zip``), a directory of
    zips and/or ``*.json`` records, at any depth."""
    if not root.exists():
        raise FileNotFoundError(f"vulnerability_db {root} does not exist")
    index = AdvisoryIndex()
    for path in _advisory_files(root):
        if path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.lower().endswith(".json"):
                        _load_json(archive.read(member), f"{path.name}:{member}", index)
        else:
            _load_json(path.read_bytes(), str(path), index)
    return index


def index_of(advisories: Sequence[Mapping[str, Any]]) -> AdvisoryIndex:
    index = AdvisoryIndex()
    for doc in advisories:
        index.add(parse_advisory(doc))
    return index


# --- package URLs ---------------------------------------------------------------------------------


def component_of_purl(purl: str, *, version: str | None = None) -> Component | None:
    """``pkg:npm/%40scope/name@1.2.3`` -> Component("npm", "@scope/name", "1.2.3"); None for a
    type with no OSV ecosystem or without a version."""
    if not purl.startswith("pkg:"):
        return None
    body = purl[4:].split("#", 1)[0].split("?", 1)[0]
    ptype, _, rest = body.partition("/")
    ecosystem = PURL_ECOSYSTEMS.get(ptype.lower())
    if ecosystem is None or not rest:
        return None
    path, _, purl_version = rest.rpartition("@") if "@" in rest else (rest, "", "")
    segments = [unquote(s) for s in path.split("/") if s]
    if not segments:
        return None
    if ecosystem == "Maven" and len(segments) >= 2:
        name = f"{segments[-2]}:{segments[-1]}"
    elif ecosystem in ("Debian", "Alpine"):
        name = segments[-1]
    else:
        name = "/".join(segments)
    found = version or unquote(purl_version)
    if not found:
        return None
    return Component(ecosystem=ecosystem, name=name, version=found, purl=purl)
