"""Offline vulnerability matching: 1,000 SBOM components against 10,000 OSV advisories.

Setup, all in this process (no database): ADVISORIES synthetic OSV records over four
ecosystems (npm and Go with SEMVER ranges, PyPI and Maven with ECOSYSTEM ranges; 2-3 ranges
each, introduced/fixed and some last_affected, a CVSS v3.1 vector each), about five per
package, written as OSV publishes them (``<ecosystem>/all.zip``) into a temporary directory;
COMPONENTS packages of a CycloneDX SBOM, about half of them named in some advisory, at
versions inside and outside the ranges.

Measured, best of REPEATS:
  load      registry.osv.load_database: read the zips, parse every record, score every
            CVSS vector, build the per-package index (what the daemon does once per change
            of the database).
  match     registry.sboms.match_findings over the SBOM: the index look-up and the range
            evaluation for the packages found, and the findings built.
Baseline in the same run: the same matching without the index (every component checked
against every advisory's affected packages, with the same range evaluation), so the figure
shows what the per-package index buys; both must return the same findings.

Run: .venv/bin/python bench/vulns.py [--advisories 10000] [--components 1000]
Last line: vuln_match_ms=<ms to match the SBOM against the loaded database>.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from pluginmon.registry import osv
from pluginmon.registry.sboms import match_findings

ECOSYSTEMS = (("npm", "SEMVER"), ("Go", "SEMVER"), ("PyPI", "ECOSYSTEM"), ("Maven", "ECOSYSTEM"))
VECTORS = (
    "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
    "CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H",
    "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N",
    "CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:N/A:N",
)


def _name(ecosystem: str, n: int) -> str:
    if ecosystem == "Maven":
        return f"org.example.g{n % 50}:artifact-{n}"
    if ecosystem == "Go":
        return f"github.com/example/mod{n}"
    return f"package-{n}"


def _version(rng: random.Random) -> str:
    return f"{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 30)}"


def make_advisories(count: int, rng: random.Random) -> list[dict[str, Any]]:
    packages = max(1, count // 5)
    docs = []
    for i in range(count):
        ecosystem, range_type = ECOSYSTEMS[i % len(ECOSYSTEMS)]
        name = _name(ecosystem, rng.randrange(packages))
        ranges = []
        for _ in range(rng.randint(2, 3)):
            low, high = sorted(
                [_version(rng), _version(rng)], key=lambda v: tuple(map(int, v.split(".")))
            )
            closing = {"last_affected": low} if rng.random() < 0.2 else {"fixed": high}
            ranges.append({"type": range_type, "events": [{"introduced": low}, closing]})
        docs.append(
            {
                "schema_version": "1.6.0",
                "id": f"BENCH-{i:06d}",
                "modified": "2026-11-30T00:00:00Z",
                "summary": f"synthetic advisory {i}",
                "severity": [{"type": "CVSS_V3", "score": VECTORS[i % len(VECTORS)]}],
                "affected": [{"package": {"ecosystem": ecosystem, "name": name}, "ranges": ranges}],
            }
        )
    return docs


def make_components(count: int, advisories: int, rng: random.Random) -> list[osv.Component]:
    packages = max(1, advisories // 5)
    out = []
    for _ in range(count):
        ecosystem, _ = ECOSYSTEMS[rng.randrange(len(ECOSYSTEMS))]
        # about half named in the database, half not
        n = rng.randrange(packages * 2)
        out.append(osv.Component(ecosystem, _name(ecosystem, n), _version(rng)))
    return out


def write_database(root: Path, docs: list[dict[str, Any]]) -> None:
    by_ecosystem: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_ecosystem.setdefault(doc["affected"][0]["package"]["ecosystem"], []).append(doc)
    for ecosystem, items in by_ecosystem.items():
        (root / ecosystem).mkdir(parents=True)
        with zipfile.ZipFile(root / ecosystem / "all.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            for doc in items:
                archive.writestr(f"{doc['id']}.json", json.dumps(doc))


def naive_match(index: osv.AdvisoryIndex, components: list[osv.Component]) -> set[tuple[str, str]]:
    """The baseline: no per-package index, every advisory's packages for every component."""
    pairs = [pair for entries in index.by_package.values() for pair in entries]
    found = set()
    for c in components:
        for advisory, affected in pairs:
            if affected.ecosystem != c.ecosystem or osv.normalize_name(
                affected.ecosystem, affected.name
            ) != osv.normalize_name(c.ecosystem, c.name):
                continue
            if any(osv.in_range(c.version, r, ecosystem=c.ecosystem) for r in affected.ranges):
                found.add((advisory.id, c.name))
    return found


def best_ms(work: Any, repeats: int) -> tuple[float, Any]:
    best = float("inf")
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        best = min(best, (time.perf_counter() - started) * 1000)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--advisories", type=int, default=10_000)
    parser.add_argument("--components", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(20261201)
    docs = make_advisories(args.advisories, rng)
    components = make_components(args.components, args.advisories, rng)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "osv"
        write_database(root, docs)
        load_ms, index = best_ms(lambda: osv.load_database(root), max(1, args.repeats // 2))
    match_ms, findings = best_ms(lambda: match_findings(index, components), args.repeats)
    naive_ms, naive = best_ms(lambda: naive_match(index, components), 1)
    indexed = {(f.vulnerability_id, f.package_name) for f in findings}
    assert indexed == naive, "the index and the baseline disagree"
    print(f"advisories={index.advisories} components={len(components)} findings={len(findings)}")
    print(f"load (zips -> index): {load_ms:.0f} ms")
    print(f"match, per-package index: {match_ms:.2f} ms")
    print(f"match, baseline without index: {naive_ms:.0f} ms ({naive_ms / match_ms:.0f}x slower)")
    print(f"vuln_match_ms={match_ms:.2f}")


if __name__ == "__main__":
    main()
