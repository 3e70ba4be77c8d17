"""Fixtures of the vulnerability tests: OSV advisories, scanner reports and CycloneDX documents
in tests/fixtures/vulns, and an advisory database laid out as osv.dev publishes it."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "vulns"


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def advisories() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((FIXTURES / "advisories").glob("*.json"))]


def write_osv_database(root: Path) -> Path:
    """The layout osv.dev publishes: one all.zip per ecosystem."""
    by_ecosystem: dict[str, list[dict[str, Any]]] = {}
    for doc in advisories():
        by_ecosystem.setdefault(doc["affected"][0]["package"]["ecosystem"], []).append(doc)
    for ecosystem, docs in by_ecosystem.items():
        (root / ecosystem).mkdir(parents=True)
        with zipfile.ZipFile(root / ecosystem / "all.zip", "w") as archive:
            for doc in docs:
                archive.writestr(f"{doc['id']}.json", json.dumps(doc))
    return root
