"""The backup providers' allow-lists: a writer token cannot point the daemon at another host,
port, bucket or tenant's artifacts. A location outside the allow-list is refused when it is
registered (422 on ``location``, nothing stored) and, for a row already stored, is the
permanent ``outside_roots`` before any connection or file access."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pluginmon.daemon.config_backups import BackupSettings, ProviderSettings
from pluginmon.registry.backup_readers import (
    Expected,
    PathReader,
    Readers,
    ReadResult,
    S3Reader,
    SftpReader,
)
from pluginmon.registry.tokens import Role
from tests.api_helpers import ApiHarness, api_server

SHA = "0" * 64
EXPECTED = Expected(size_bytes=1, sha256_hex=SHA)


@dataclass(slots=True)
class Listener:
    """A loopback TCP port the test owns, recording every connection made to it."""

    port: int
    connections: list[str] = field(default_factory=list)


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    found = Listener(port=0)

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        found.connections.append(str(writer.get_extra_info("peername")))
        writer.close()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    try:
        yield found
    finally:
        server.close()
        await server.wait_closed()


def _sftp(tmp_path: Path, *, hosts: tuple[str, ...]) -> SftpReader:
    known = tmp_path / "known_hosts"
    known.write_text("")
    return SftpReader(
        username="backup",
        private_key_file=None,
        known_hosts_file=known,
        connect_timeout_seconds=5.0,
        allowed_hosts=hosts,
        path_prefixes=("/srv/backups/{tenant}",),
    )


async def _plugin(api: ApiHarness, token: str, name: str = "resizer") -> None:
    reply = await api.call("POST", "/api/v1/plugins", token=token, body={"name": name})
    assert reply.status == 201, reply.body


async def _register(api: ApiHarness, token: str, provider: str, location: str) -> Any:
    return await api.call(
        "POST",
        "/api/v1/plugins/resizer/backups",
        token=token,
        body={"provider": provider, "location": location, "size_bytes": 1, "checksum_sha256": SHA},
    )


async def _store(api: ApiHarness, tenant: str, provider: str, location: str) -> int:
    """A row already in the database (stored before locations were checked at registration)."""
    async with api.pool.acquire() as conn:
        backup_id = await conn.fetchval(
            """INSERT INTO plugin_backups (tenant_id, plugin_id, environment, provider, location,
                   checksum, size_bytes, status, created_at, completed_at)
               SELECT $1, id, 'production', $2, $3, 'sha256:' || $4, 1, 'completed', now(), now()
                 FROM plugins WHERE tenant_id = $1 AND name = 'resizer' RETURNING id""",
            tenant,
            provider,
            location,
            SHA,
        )
    assert isinstance(backup_id, int)
    return backup_id


async def _verify(api: ApiHarness, token: str, backup_id: int) -> dict[str, Any]:
    reply = await api.call("POST", f"/api/v1/backups/{backup_id}/verify", token=token)
    assert reply.status == 200, reply.body
    verification = reply.body["verification"]
    assert isinstance(verification, dict)
    return verification


async def _count(api: ApiHarness) -> int:
    rows = await api.fetch("SELECT count(*) AS n FROM plugin_backups")
    return int(rows[0]["n"])


async def test_an_sftp_host_not_allowed_is_refused_without_a_connection(
    migrated_db: str, listener: Listener, tmp_path: Path
) -> None:
    target = f"sftp://127.0.0.1:{listener.port}/srv/backups/a/resizer.tar"
    refusing = Readers(by_provider={"sftp": _sftp(tmp_path, hosts=("127.0.0.1:22",))})
    async with api_server(migrated_db, backup_readers=refusing) as api:
        await api.token("ci", tenant="a", role=Role.WRITER)
        await _plugin(api, "ci")
        reply = await _register(api, "ci", "sftp", target)
        assert (reply.status, reply.error["field"]) == (422, "location"), reply.body
        assert "outside_roots" in reply.error["message"]
        # Another user on an allowed host (the daemon's key in someone else's account) too.
        other_user = "sftp://root@127.0.0.1:22/srv/backups/a/resizer.tar"
        assert (await _register(api, "ci", "sftp", other_user)).status == 422
        assert await _count(api) == 0

        stored = await _store(api, "a", "sftp", target)
        verification = await _verify(api, "ci", stored)
        assert (verification["status"], verification["result"], verification["transient"]) == (
            "unverifiable",
            "outside_roots",
            False,
        )
        assert listener.connections == []

    # The control: with the port allowed the same location is registered and connected to
    # (the listener is no SSH server, so the read fails), so "no connection" above is the
    # allow-list's doing.
    allowing = Readers(by_provider={"sftp": _sftp(tmp_path, hosts=(f"127.0.0.1:{listener.port}",))})
    async with api_server(migrated_db, backup_readers=allowing) as api:
        await api.token("ci2", tenant="c", role=Role.WRITER)
        await _plugin(api, "ci2")
        location = f"sftp://127.0.0.1:{listener.port}/srv/backups/c/resizer.tar"
        reply = await _register(api, "ci2", "sftp", location)
        assert reply.status == 201, reply.body
        verification = await _verify(api, "ci2", reply.body["id"])
        assert verification["result"] in {"connection_lost", "unreachable", "timeout"}
        assert len(listener.connections) >= 1


async def test_tenant_b_cannot_register_or_verify_under_tenant_a_root(
    migrated_db: str, tmp_path: Path
) -> None:
    for tenant in ("a", "b"):
        (tmp_path / tenant).mkdir()
    data = b"tenant a's backup"
    artifact = tmp_path / "a" / "resizer.tar"
    artifact.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "b" / "sneaky.tar").symlink_to(artifact)
    readers = Readers(by_provider={"local": PathReader("local", (tmp_path / "{tenant}",))})
    async with api_server(migrated_db, backup_readers=readers) as api:
        await api.token("ci-a", tenant="a", role=Role.WRITER)
        await api.token("ci-b", tenant="b", role=Role.WRITER)
        await _plugin(api, "ci-a")
        await _plugin(api, "ci-b")
        body = {"provider": "local", "location": str(artifact), "size_bytes": len(data)}
        body["checksum_sha256"] = sha
        own = await api.call("POST", "/api/v1/plugins/resizer/backups", token="ci-a", body=body)
        assert own.status == 201, own.body
        assert (await _verify(api, "ci-a", own.body["id"]))["result"] == "verified"

        theirs = await api.call("POST", "/api/v1/plugins/resizer/backups", token="ci-b", body=body)
        assert (theirs.status, theirs.error["field"]) == (422, "location"), theirs.body
        rows = await api.fetch("SELECT count(*) AS n FROM plugin_backups WHERE tenant_id = 'b'")
        assert rows[0]["n"] == 0

        stored = await _store(api, "b", "local", str(artifact))
        verification = await _verify(api, "ci-b", stored)
        assert (verification["result"], verification["observed_checksum_sha256"]) == (
            "outside_roots",
            None,
        )
        # A symlink in b's root to a's file passes the (lexical) registration check but is
        # judged on where it resolves: nothing of a's file comes back.
        body["location"] = str(tmp_path / "b" / "sneaky.tar")
        link = await api.call("POST", "/api/v1/plugins/resizer/backups", token="ci-b", body=body)
        assert link.status == 201, link.body
        verification = await _verify(api, "ci-b", link.body["id"])
        assert (verification["result"], verification["observed_size_bytes"]) == (
            "outside_roots",
            None,
        )


async def test_an_s3_bucket_not_allowed_is_refused_without_a_connection(
    migrated_db: str, listener: Listener
) -> None:
    s3 = S3Reader(
        endpoint_url=f"http://127.0.0.1:{listener.port}",
        region="us-east-1",
        access_key_id="x",
        secret_access_key=lambda: "y",
        buckets=("backups/tenants/{tenant}",),
    )
    async with api_server(migrated_db, backup_readers=Readers(by_provider={"s3": s3})) as api:
        await api.token("ci", tenant="a", role=Role.WRITER)
        await _plugin(api, "ci")
        for location in (
            "s3://other-bucket/tenants/a/resizer.tar",  # bucket not allowed
            "s3://backups/tenants/b/resizer.tar",  # another tenant's prefix
            "s3://backups/tenants/ab/resizer.tar",  # a prefix only as text, not as a folder
            "s3://backups/tenants/a/../b/resizer.tar",
        ):
            reply = await _register(api, "ci", "s3", location)
            assert (reply.status, reply.error["field"]) == (422, "location"), location
        assert await _count(api) == 0
        assert (await _register(api, "ci", "s3", "s3://backups/tenants/a/r.tar")).status == 201

        stored = await _store(api, "a", "s3", "s3://other-bucket/tenants/a/resizer.tar")
        verification = await _verify(api, "ci", stored)
        assert (verification["result"], verification["transient"]) == ("outside_roots", False)
    assert listener.connections == []


def test_nothing_is_allowed_unless_configured(tmp_path: Path) -> None:
    readers = BackupSettings().readers()
    for provider, location in (
        ("local", "/var/backups/x.tar"),
        ("nfs", "/mnt/backups/x.tar"),
        ("sftp", "sftp://backup.example:22/srv/x.tar"),
        ("s3", "s3://bucket/x.tar"),
    ):
        refused = readers.refusal(provider, location, tenant="a")
        assert refused is not None, provider
        assert refused.result is ReadResult.NOT_CONFIGURED, provider
    assert readers.refusal("gcs", "gs://b/x", tenant="a") is None  # never read: unverifiable

    settings = BackupSettings.model_validate(
        {
            "providers": {
                "sftp": {
                    "allowed_hosts": ["backup.example", "[::1]:2222"],
                    "path_prefixes": ["/srv/backups/{tenant}"],
                    "username": "pluginmon",
                },
                "s3": {"buckets": ["shared", "per-tenant/t/{tenant}"]},
                "local": {"roots": [str(tmp_path / "{tenant}")]},
            }
        }
    )
    readers = settings.readers()
    allowed = {
        ("sftp", "sftp://backup.example/srv/backups/a/x.tar"),
        ("sftp", "sftp://pluginmon@[::1]:2222/srv/backups/a/x.tar"),
        ("s3", "s3://shared/anything/x.tar"),
        ("s3", "s3://per-tenant/t/a/x.tar"),
        ("local", str(tmp_path / "a" / "x.tar")),
    }
    outside = {
        ("sftp", "sftp://backup.example:2222/srv/backups/a/x.tar"),  # port not allowed
        ("sftp", "sftp://[::1]/srv/backups/a/x.tar"),  # port 22 not allowed there
        ("sftp", "sftp://backup.example/srv/backups/b/x.tar"),  # tenant b's
        ("sftp", "sftp://backup.example/etc/shadow"),
        ("s3", "s3://per-tenant/t/b/x.tar"),
        ("local", str(tmp_path / "b" / "x.tar")),
    }
    got = {case: readers.refusal(*case, tenant="a") for case in allowed | outside}
    assert {case for case, outcome in got.items() if outcome is None} == allowed
    assert {
        case: outcome.result for case, outcome in got.items() if outcome is not None
    } == dict.fromkeys(outside, ReadResult.OUTSIDE_ROOTS)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"allowed_hosts": ["user@host"]}, "allowed_hosts"),
        ({"allowed_hosts": ["host:99999"]}, "allowed_hosts"),
        ({"path_prefixes": ["relative/path"]}, "path_prefixes"),
        ({"path_prefixes": ["/srv/../etc"]}, "path_prefixes"),
        ({"buckets": ["/no-bucket"]}, "buckets"),
    ],
)
def test_bad_allow_list_entries_are_refused(values: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ProviderSettings.model_validate(values)


async def test_a_reader_alone_checks_its_allow_list(listener: Listener, tmp_path: Path) -> None:
    """Defence in depth: the reader itself refuses, whoever calls it (the schedule too)."""
    reader = _sftp(tmp_path, hosts=("127.0.0.1:22",))
    outcome = await reader.verify(
        f"sftp://127.0.0.1:{listener.port}/srv/backups/a/x.tar", EXPECTED, tenant="a"
    )
    assert (outcome.result, outcome.transient) == (ReadResult.OUTSIDE_ROOTS, False)
    # Without a tenant a "{tenant}" prefix allows nothing.
    outcome = await _sftp(tmp_path, hosts=(f"127.0.0.1:{listener.port}",)).verify(
        f"sftp://127.0.0.1:{listener.port}/srv/backups/a/x.tar", EXPECTED
    )
    assert outcome.result is ReadResult.OUTSIDE_ROOTS
    assert listener.connections == []


def test_an_sftp_location_holding_a_password_is_refused_without_echoing_it() -> None:
    # Stored as given, a location is shown back by the API and the audit log: a password in
    # it would be a secret in a response (sftp authenticates with private_key_file only).
    settings = BackupSettings.model_validate(
        {
            "providers": {
                "sftp": {
                    "allowed_hosts": ["backup.example"],
                    "path_prefixes": ["/srv/backups/{tenant}"],
                    "username": "pluginmon",
                }
            }
        }
    )
    readers = settings.readers()
    for location in (
        "sftp://pluginmon:hunter2@backup.example/srv/backups/a/x.tar",
        "sftp://pluginmon:@backup.example/srv/backups/a/x.tar",  # an empty one is one too
    ):
        refused = readers.refusal("sftp", location, tenant="a")
        assert refused is not None, location
        assert refused.result is ReadResult.BAD_LOCATION
        assert "password" in refused.reason
        assert "hunter2" not in refused.reason
    # The positive control: the same location without the password is allowed.
    allowed = "sftp://pluginmon@backup.example/srv/backups/a/x.tar"
    assert readers.refusal("sftp", allowed, tenant="a") is None
