"""``POST /backups/{id}/verify`` reads the artifact with no transaction open: the row is read
in the request's transaction, the artifact afterwards holding no connection, and the result
written in a second short transaction (api_http.Deferred)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from pluginmon.registry.backup_readers import Expected, Outcome, PathReader, Readers
from pluginmon.registry.tokens import Role
from tests.api_helpers import api_server

IN_TRANSACTION = """
SELECT count(*) AS n FROM pg_stat_activity
 WHERE datname = current_database() AND pid <> pg_backend_pid()
   AND (state LIKE 'idle in transaction%' OR xact_start IS NOT NULL)
"""


@dataclass
class SlowReader:
    """A real PathReader whose read does not start until the test lets it (as a slow SFTP
    read or a multi-gigabyte file would keep it going)."""

    inner: PathReader
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def refusal(self, location: str, *, tenant: str | None) -> Outcome | None:
        return self.inner.refusal(location, tenant=tenant)

    async def verify(
        self, location: str, expected: Expected, *, tenant: str | None = None
    ) -> Outcome:
        self.started.set()
        await self.release.wait()
        return await self.inner.verify(location, expected, tenant=tenant)


async def test_no_transaction_is_open_while_the_artifact_is_read(
    migrated_db: str, tmp_path: Path
) -> None:
    data = b"x" * 100_000
    artifact = tmp_path / "resizer.tar"
    artifact.write_bytes(data)
    slow = SlowReader(PathReader("local", (tmp_path,)))
    async with api_server(migrated_db, backup_readers=Readers(by_provider={"local": slow})) as api:
        await api.token("ci", tenant="a", role=Role.WRITER)
        assert (
            await api.call("POST", "/api/v1/plugins", token="ci", body={"name": "resizer"})
        ).status == 201
        reply = await api.call(
            "POST",
            "/api/v1/plugins/resizer/backups",
            token="ci",
            body={
                "provider": "local",
                "location": str(artifact),
                "size_bytes": len(data),
                "checksum_sha256": hashlib.sha256(data).hexdigest(),
            },
        )
        assert reply.status == 201, reply.body
        url = f"/api/v1/backups/{reply.body['id']}/verify"
        request = asyncio.create_task(api.call("POST", url, token="ci"))
        try:
            await asyncio.wait_for(slow.started.wait(), timeout=30)
            during = await api.fetch(IN_TRANSACTION)
            assert during[0]["n"] == 0
        finally:
            slow.release.set()
        done = await asyncio.wait_for(request, timeout=30)
        assert done.status == 200, done.body
        assert done.body["verification"]["result"] == "verified"
        assert done.body["backup"]["verified_at"] == done.body["verification"]["started_at"]
        history = await api.fetch("SELECT count(*) AS n FROM plugin_backup_verifications")
        assert history[0]["n"] == 1
