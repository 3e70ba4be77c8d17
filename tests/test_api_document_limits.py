"""SBOM uploads and scanner report imports have their own body limit ([api] max_document_bytes, 32 MiB by default), over real HTTP on loopback: a document past max_body_bytes is stored, one past its own limit is 413, every other JSON body keeps max_body_bytes."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pluginmon.daemon.api_vulns import DEFAULT_MAX_DOCUMENT_BYTES
from pluginmon.daemon.settings import ConfigError, load_settings
from pluginmon.registry.tokens import Role
from tests.api_helpers import ApiHarness, api_server
from tests.vulns_helpers import load

BODY_LIMIT = 64 * 1024
DOCUMENT_LIMIT = 2 * 1024 * 1024


def _sbom_with(extra: int) -> dict[str, Any]:
    """The fixture SBOM with ``extra`` more npm components (about 170 bytes each)."""
    sbom: dict[str, Any] = copy.deepcopy(load("sbom.cdx.json"))
    sbom["components"] += [
        {
            "type": "library",
            "bom-ref": f"pkg:npm/padding-package-{i}@1.0.{i}",
            "name": f"padding-package-{i}",
            "version": f"1.0.{i}",
            "purl": f"pkg:npm/padding-package-{i}@1.0.{i}",
        }
        for i in range(extra)
    ]
    return sbom


@pytest.fixture
async def api(migrated_db: str) -> AsyncIterator[ApiHarness]:
    async with api_server(
        migrated_db, max_body_bytes=BODY_LIMIT, max_document_bytes=DOCUMENT_LIMIT
    ) as harness:
        await harness.token("writer", tenant="acme", role=Role.WRITER)
        reply = await harness.call(
            "POST", "/api/v1/plugins", token="writer", body={"name": "resizer"}
        )
        assert reply.status == 201, reply.body
        yield harness


async def test_an_sbom_past_max_body_bytes_is_stored(api: ApiHarness) -> None:
    small = await api.call("PUT", "/api/v1/plugins/resizer/sbom", token="writer",
                           body=load("sbom.cdx.json"))  # fmt: skip
    assert small.status == 200, small.body
    large = _sbom_with(6000)
    size = len(json.dumps(large).encode())
    assert BODY_LIMIT * 4 < size < DOCUMENT_LIMIT  # and past the in-thread parsing threshold
    reply = await api.call("PUT", "/api/v1/plugins/resizer/sbom", token="writer", body=large)
    assert reply.status == 200, reply.body
    assert reply.body["component_count"] == small.body["component_count"] + 6000
    stored = await api.fetch("SELECT component_count FROM plugin_sboms")
    assert [r["component_count"] for r in stored] == [reply.body["component_count"]]


async def test_a_report_past_max_body_bytes_is_imported(api: ApiHarness) -> None:
    report: dict[str, Any] = copy.deepcopy(load("grype.json"))
    # Padding the report's own descriptor keeps its findings as they are.
    report["descriptor"] = {**report.get("descriptor", {}), "padding": "x" * (BODY_LIMIT * 4)}
    reply = await api.call("POST", "/api/v1/plugins/resizer/vulnerabilities/import?format=grype",
                           token="writer", body=report)  # fmt: skip
    assert reply.status == 200, reply.body
    assert reply.body["findings"] == 2


async def test_documents_past_their_limit_and_other_bodies_past_theirs_are_413(
    api: ApiHarness,
) -> None:
    too_large = _sbom_with(15000)
    assert len(json.dumps(too_large).encode()) > DOCUMENT_LIMIT
    reply = await api.call("PUT", "/api/v1/plugins/resizer/sbom", token="writer", body=too_large)
    assert reply.status == 413, reply.body
    assert reply.error["code"] == "body_too_large"
    assert await api.fetch("SELECT 1 FROM plugin_sboms") == []
    # The catalogue keeps max_body_bytes: the larger limit is the documents' alone.
    plugin = await api.call("POST", "/api/v1/plugins", token="writer",
                            body={"name": "big", "config_schema": {"description": "x" * BODY_LIMIT}})  # fmt: skip
    assert plugin.status == 413, plugin.body
    assert plugin.error["code"] == "body_too_large"


def test_max_document_bytes_setting(tmp_path: Path) -> None:
    assert load_settings(None).api.max_document_bytes == DEFAULT_MAX_DOCUMENT_BYTES == 32 << 20
    config = tmp_path / "pluginmon.toml"
    config.write_text("[api]\nmax_document_bytes = 67108864\n")
    assert load_settings(config).api.max_document_bytes == 64 << 20
    config.write_text("[api]\nmax_document_bytes = 100\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert "max_document_bytes" in str(info.value)
