"""Backups through /api/v1 on real files: registering, verifying (a corrupted byte, a truncated
file, a missing one, an NFS root that is away, providers pluginmon cannot read), restore points
bound to their backup's plugin by the database, expiry, and the scheduled run with its gauges."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pluginmon.alerts.health import BACKUP_STALE, BACKUP_VERIFICATION_FAILED, HealthSettings
from pluginmon.alerts.rules import builtin_rules
from pluginmon.registry import backup_schedule
from pluginmon.registry.backup_readers import (
    Expected,
    PathReader,
    Readers,
    ReadResult,
    VerifyStatus,
    judge,
)
from pluginmon.registry.backup_schedule import BackupSchedule, LastVerified, is_stale
from pluginmon.registry.tokens import Role
from pluginmon.storage.errors import constraint_name
from tests.api_helpers import ApiHarness, api_server
from tests.dbutil import is_citus

SIZE = 3 * (1 << 20) + 123  # several read chunks and a partial one


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    local = tmp_path / "local"
    local.mkdir()
    return {"local": local, "nfs": tmp_path / "nfs-mount-not-there"}


def _readers(roots: dict[str, Path]) -> Readers:
    return Readers(
        by_provider={name: PathReader(name, (root,)) for name, root in roots.items()},
        timeout_seconds=60,
    )


@pytest.fixture
async def api(migrated_db: str, roots: dict[str, Path]) -> AsyncIterator[ApiHarness]:
    async with api_server(migrated_db, backup_readers=_readers(roots)) as harness:
        await harness.token("ci", tenant="a", role=Role.WRITER)
        await harness.token("viewer", tenant="a", role=Role.READER)
        for name in ("resizer", "mailer"):
            reply = await harness.call("POST", "/api/v1/plugins", token="ci", body={"name": name})
            assert reply.status == 201, reply.body
        yield harness


def _artifact(path: Path, size: int = SIZE) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _escape_link(root: Path, target: Path) -> Path:
    """A symlink inside the root to a file outside it."""
    target.write_bytes(b"outside")
    link = root / "escape.tar"
    link.symlink_to(target)
    return link


async def _register(api: ApiHarness, path: Path, sha: str, **extra: object) -> dict[str, Any]:
    body = {
        "provider": "local",
        "location": str(path),
        "size_bytes": SIZE,
        "checksum_sha256": sha,
        "environment": "production",
        **extra,
    }
    reply = await api.call("POST", "/api/v1/plugins/resizer/backups", token="ci", body=body)
    assert reply.status == 201, reply.body
    assert isinstance(reply.body, dict)
    return reply.body


async def _store(api: ApiHarness, path: Path, sha: str) -> dict[str, Any]:
    """A backup row written straight to the database (as one registered before the API
    checked locations at registration), bypassing the API's checks."""
    async with api.pool.acquire() as conn:
        backup_id = await conn.fetchval(
            """INSERT INTO plugin_backups (tenant_id, plugin_id, environment, provider, location,
                   checksum, size_bytes, status, created_at, completed_at)
               SELECT 'a', id, 'production', 'local', $1, $2, $3, 'completed', now(), now()
                 FROM plugins WHERE tenant_id = 'a' AND name = 'resizer' RETURNING id""",
            str(path),
            "sha256:" + sha,
            SIZE,
        )
    return {"id": backup_id}


async def _verify(api: ApiHarness, backup_id: object) -> dict[str, object]:
    reply = await api.call("POST", f"/api/v1/backups/{backup_id}/verify", token="ci")
    assert reply.status == 200, reply.body
    verification = reply.body["verification"]
    assert isinstance(verification, dict)
    return verification


async def test_a_corrupted_byte_in_a_local_backup_is_caught(
    api: ApiHarness, roots: dict[str, Path]
) -> None:
    path = roots["local"] / "resizer-1.tar"
    sha = _artifact(path)
    backup = await _register(api, path, sha, expires_at="2026-06-01T00:00:00Z")
    assert backup["status"] == "completed"
    assert backup["checksum_sha256"] == sha
    assert backup["size_bytes"] == SIZE
    assert backup["last_verification"] is None

    good = await _verify(api, backup["id"])
    assert (good["status"], good["result"], good["transient"]) == ("verified", "verified", False)
    assert good["observed_checksum_sha256"] == sha

    with path.open("r+b") as handle:  # one byte in the middle of the second chunk
        handle.seek((1 << 20) + 4321)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    bad = await _verify(api, backup["id"])
    assert (bad["status"], bad["result"], bad["transient"]) == (
        "failed",
        "checksum_mismatch",
        False,
    )
    assert bad["observed_size_bytes"] == SIZE
    assert bad["observed_checksum_sha256"] != sha

    read = await api.call("GET", f"/api/v1/backups/{backup['id']}", token="viewer")
    assert read.body["last_verification"]["result"] == "checksum_mismatch"
    assert read.body["verified_at"] == good["started_at"]  # the last success stays
    history = await api.call("GET", f"/api/v1/backups/{backup['id']}/verifications", token="ci")
    assert [v["result"] for v in history.body["items"]] == ["checksum_mismatch", "verified"]

    audit = await api.fetch(
        "SELECT action, outcome FROM audit_log WHERE entity_type = 'backup' ORDER BY id"
    )
    assert [(r["action"], r["outcome"]) for r in audit] == [
        ("backup.register", "success"),
        ("backup.verify", "success"),
        ("backup.verify", "failure"),
    ]
    sample = api.registry.get_sample_value
    assert sample("pluginmon_backup_verifications_total", {"result": "verified"}) == 1.0
    assert sample("pluginmon_backup_verifications_total", {"result": "checksum_mismatch"}) == 1.0


async def test_a_truncated_file_is_a_size_mismatch(api: ApiHarness, roots: dict[str, Path]) -> None:
    path = roots["local"] / "resizer-2.tar"
    sha = _artifact(path)
    backup = await _register(api, path, sha)
    with path.open("r+b") as handle:
        handle.truncate(SIZE - 1000)
    result = await _verify(api, backup["id"])
    assert (result["status"], result["result"]) == ("failed", "size_mismatch")
    assert result["observed_size_bytes"] == SIZE - 1000
    assert "registered 3145851" in str(result["reason"])


async def test_each_failure_is_named_and_transient_told_from_permanent(
    api: ApiHarness, roots: dict[str, Path], tmp_path: Path
) -> None:
    sha = "0" * 64
    missing = await _register(api, roots["local"] / "gone.tar", sha)
    # Outside the roots and ".." are refused when registered (tests/test_backups_allowlist.py);
    # rows stored before the allow-list was checked at registration are judged when verified.
    outside = await _store(api, tmp_path / "elsewhere.tar", sha)
    nfs = await _register(api, roots["nfs"] / "resizer.tar", sha, provider="nfs", size_bytes=10)
    gcs = await _register(api, Path("/bucket/x"), sha, provider="gcs", location="gs://b/x")
    dotdot = await _store(api, roots["local"] / ".." / "elsewhere.tar", sha)
    link = await _register(api, _escape_link(roots["local"], tmp_path / "elsewhere.tar"), sha)
    cases = {"missing": missing, "outside": outside, "nfs": nfs, "gcs": gcs}
    cases |= {"dotdot": dotdot, "symlink": link}
    results = {name: await _verify(api, b["id"]) for name, b in cases.items()}
    got = {n: (r["status"], r["result"], r["transient"]) for n, r in results.items()}
    assert got == {
        "missing": ("failed", "not_found", False),
        "outside": ("unverifiable", "outside_roots", False),
        "nfs": ("unverifiable", "unreachable", True),
        "gcs": ("unverifiable", "unsupported_provider", False),
        "dotdot": ("unverifiable", "bad_location", False),
        "symlink": ("unverifiable", "outside_roots", False),
    }
    assert "gcs" in str(results["gcs"]["reason"])
    # Never "verified" without reading.
    rows = await api.fetch("SELECT count(*) AS n FROM plugin_backups WHERE verified_at IS NOT NULL")
    assert rows[0]["n"] == 0


async def test_bad_input_is_named(api: ApiHarness) -> None:
    reply = await api.call(
        "POST",
        "/api/v1/plugins/resizer/backups",
        token="ci",
        body={"provider": "ftp", "location": "/x", "size_bytes": 1, "checksum_sha256": "0" * 64},
    )
    assert (reply.status, reply.error["field"]) == (422, "provider")
    reply = await api.call(
        "POST",
        "/api/v1/plugins/resizer/backups",
        token="ci",
        body={"provider": "local", "location": "/x", "size_bytes": 1, "checksum_sha256": "AB"},
    )
    assert (reply.status, reply.error["field"]) == (422, "checksum_sha256")
    reply = await api.call("POST", "/api/v1/backups/1/verify", token="viewer")
    assert reply.status == 403
    reply = await api.call("POST", "/api/v1/backups/999999/verify", token="ci")
    assert reply.status == 404


async def test_restore_points_are_checked_and_bound_to_their_plugin(
    api: ApiHarness, roots: dict[str, Path]
) -> None:
    path = roots["local"] / "resizer-3.tar"
    sha = _artifact(path, 4096)
    backup = await _register(api, path, sha)
    url = f"/api/v1/backups/{backup['id']}/restore-points"
    good = await api.call(
        "POST", url, token="ci", body={"label": "pre-2.0", "checksum_sha256": sha}
    )
    assert good.status == 201, good.body
    assert (good.body["status"], good.body["verified"], good.body["plugin"]) == (
        "restored",
        True,
        "resizer",
    )
    bad = await api.call(
        "POST", url, token="ci", body={"label": "broken", "checksum_sha256": "f" * 64}
    )
    assert (bad.body["status"], bad.body["verified"]) == ("invalid", False)

    # Another plugin's restore point against this backup: the database refuses it.
    other = await api.call(
        "POST",
        url,
        token="ci",
        body={"label": "x", "checksum_sha256": sha, "plugin": "mailer"},
    )
    assert other.status == 409, other.body
    assert other.error["field"] == "plugin_restore_points_backup_plugin_fkey"
    listed = await api.call("GET", url, token="viewer")
    assert [p["label"] for p in listed.body["items"]] == ["broken", "pre-2.0"]

    # Directly, as the owner (no API in the way): still refused.
    rows = await api.fetch("SELECT id FROM plugins WHERE name = 'mailer'")
    async with api.pool.acquire() as conn:
        with pytest.raises(asyncpg.ForeignKeyViolationError) as refused:
            await conn.execute(
                """INSERT INTO plugin_restore_points (tenant_id, plugin_id, backup_id,
                       environment, label, provider, location)
                   VALUES ('a', $1, $2, 'production', 'x', 'local', '/x')""",
                rows[0]["id"],
                backup["id"],
            )
    if is_citus(api.database_url):
        # The coordinator passes a worker's error on without the constraint-name field, and
        # the message names the shard's constraint (docs/scaling.md): the API reads it there.
        assert refused.value.constraint_name is None
        assert constraint_name(refused.value) == "plugin_restore_points_backup_plugin_fkey"
    else:
        assert refused.value.constraint_name == "plugin_restore_points_backup_plugin_fkey"


async def test_expired_backups_are_removed_unless_a_restore_point_references_them(
    api: ApiHarness, roots: dict[str, Path]
) -> None:
    now = api.clock()
    soon = (now + timedelta(hours=1)).isoformat()
    later = (now + timedelta(days=30)).isoformat()
    sha = "1" * 64
    plain = await _register(api, roots["local"] / "a", sha, size_bytes=1, expires_at=soon)
    kept = await _register(api, roots["local"] / "b", sha, size_bytes=1, expires_at=soon)
    fresh = await _register(api, roots["local"] / "c", sha, size_bytes=1, expires_at=later)
    forever = await _register(api, roots["local"] / "d", sha, size_bytes=1)
    reply = await api.call(
        "POST",
        f"/api/v1/backups/{kept['id']}/restore-points",
        token="ci",
        body={"label": "keep", "checksum_sha256": sha},
    )
    assert reply.status == 201
    reply = await api.call(
        "POST",
        "/api/v1/plugins/resizer/backups",
        token="ci",
        body={
            "provider": "local",
            "location": "/x",
            "size_bytes": 1,
            "checksum_sha256": sha,
            "expires_at": (now - timedelta(seconds=1)).isoformat(),
        },
    )
    assert (reply.status, reply.error["field"]) == (422, "expires_at")

    async with api.pool.acquire() as conn:
        early = await backup_schedule.expire_due(conn, now=now + timedelta(minutes=59))
        deleted, kept_ids = await backup_schedule.expire_due(conn, now=now + timedelta(hours=2))
    assert early == ([], [])
    assert (deleted, kept_ids) == ([plain["id"]], [kept["id"]])
    remaining = await api.fetch("SELECT id, status FROM plugin_backups ORDER BY id")
    assert [(r["id"], r["status"]) for r in remaining] == [
        (kept["id"], "expired"),
        (fresh["id"], "completed"),
        (forever["id"], "completed"),
    ]
    audit = await api.fetch(
        "SELECT action, actor, entity_id FROM audit_log WHERE action IN "
        "('backup.delete', 'backup.expire') ORDER BY id"
    )
    assert [(r["action"], r["actor"], r["entity_id"]) for r in audit] == [
        ("backup.delete", "daemon", str(plain["id"])),
        ("backup.expire", "daemon", str(kept["id"])),
    ]


async def test_scheduled_verification_writes_gauges_and_retries_transient_sooner(
    api: ApiHarness, roots: dict[str, Path]
) -> None:
    path = roots["local"] / "resizer-4.tar"
    sha = _artifact(path, 10_000)
    good = await _register(api, path, sha, size_bytes=10_000)
    broken = await _register(api, roots["local"] / "missing.tar", sha, size_bytes=10_000)
    away = await _register(
        api, roots["nfs"] / "x.tar", sha, provider="nfs", size_bytes=10_000, environment="staging"
    )
    clock = api.clock
    schedule = BackupSchedule(
        interval_seconds={"local": 3600.0}, default_interval_seconds=7200.0, retry_seconds=300.0
    )
    seen: list[str] = []
    first = await backup_schedule.run(
        api.pool,
        readers=_readers(roots),
        schedule=schedule,
        clock=clock,
        on_verified=lambda v: seen.append(v.result),
    )
    assert first.ran
    by_backup = {v.backup_id: (v.status, v.result, v.transient) for v in first.verified}
    assert by_backup == {
        good["id"]: (VerifyStatus.VERIFIED, "verified", False),
        broken["id"]: (VerifyStatus.FAILED, "not_found", False),
        away["id"]: (VerifyStatus.UNVERIFIABLE, "unreachable", True),
    }
    assert sorted(seen) == ["not_found", "unreachable", "verified"]
    gauges = await api.fetch(
        """SELECT environment, metric_name, value FROM plugin_metrics
            WHERE metric_name LIKE 'backup_%' ORDER BY environment, metric_name"""
    )
    assert [(r["environment"], r["metric_name"], r["value"]) for r in gauges] == [
        ("production", BACKUP_STALE, 0.0),
        ("production", BACKUP_VERIFICATION_FAILED, 1.0),
        ("production", "backup_verified_age_seconds", 0.0),
        ("staging", BACKUP_STALE, 1.0),
        ("staging", BACKUP_VERIFICATION_FAILED, 0.0),
    ]

    # Nothing is due a minute later; the transient one is after the retry delay, the local
    # ones after their provider's interval.
    clock.advance(60)
    second = await backup_schedule.run(
        api.pool, readers=_readers(roots), schedule=schedule, clock=clock
    )
    assert second.verified == ()
    clock.advance(300)
    third = await backup_schedule.run(
        api.pool, readers=_readers(roots), schedule=schedule, clock=clock
    )
    assert [v.backup_id for v in third.verified] == [away["id"]]
    clock.advance(3600)
    fourth = await backup_schedule.run(
        api.pool, readers=_readers(roots), schedule=schedule, clock=clock
    )
    # (the transient one again too: its retry delay has passed as well)
    assert sorted(v.backup_id for v in fourth.verified) == sorted(
        [good["id"], broken["id"], away["id"]]
    )

    # A provider the schedule is told to leave alone is not read, however due.
    clock.advance(7200)
    quiet = await backup_schedule.run(
        api.pool,
        readers=_readers(roots),
        schedule=BackupSchedule(disabled=frozenset({"local", "nfs"})),
        clock=clock,
    )
    assert (quiet.ran, quiet.verified) == (True, ())

    # Another process holding the lock: this one skips and still reports last_verified.
    async with api.pool.acquire() as holder:
        assert await holder.fetchval(
            "SELECT pg_try_advisory_lock($1)", backup_schedule.BACKUP_LOCK_KEY
        )
        try:
            skipped = await backup_schedule.run(
                api.pool, readers=_readers(roots), schedule=schedule, clock=clock
            )
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", backup_schedule.BACKUP_LOCK_KEY)
    assert not skipped.ran
    assert {(lv.environment, lv.verified_at is not None) for lv in skipped.last_verified} == {
        ("production", True),
        ("staging", False),
    }


def test_judge_and_staleness_are_pure() -> None:
    expected = Expected(size_bytes=3, sha256_hex=hashlib.sha256(b"abc").hexdigest())
    assert judge(expected, size_bytes=3, sha256_hex=expected.sha256_hex).result is (
        ReadResult.VERIFIED
    )
    assert judge(expected, size_bytes=2, sha256_hex=None).result is ReadResult.SIZE_MISMATCH
    mismatch = judge(expected, size_bytes=3, sha256_hex="0" * 64)
    assert (mismatch.result, mismatch.status) == (ReadResult.CHECKSUM_MISMATCH, VerifyStatus.FAILED)
    assert ReadResult.UNREACHABLE.status is VerifyStatus.UNVERIFIABLE

    now = datetime(2026, 3, 1, tzinfo=UTC)
    schedule = BackupSchedule(
        stale_after_seconds=3600.0, plugin_stale_after_seconds={"a/resizer": 60.0}
    )
    recent = now - timedelta(seconds=120)
    assert is_stale(LastVerified("a", "mailer", "p", recent, 0), now=now, schedule=schedule) == (
        False,
        120.0,
    )
    assert is_stale(LastVerified("a", "resizer", "p", recent, 0), now=now, schedule=schedule) == (
        True,
        120.0,
    )
    assert is_stale(LastVerified("a", "x", "p", None, 0), now=now, schedule=schedule) == (
        True,
        None,
    )


def test_rules_and_health_read_the_backup_gauges() -> None:
    rules = {r.name: r for r in builtin_rules()}
    assert rules["PluginBackupStale"].metric == BACKUP_STALE
    assert rules["PluginBackupVerificationFailed"].metric == BACKUP_VERIFICATION_FAILED
    assert rules["PluginBackupVerificationFailed"].severity == "critical"
    names = [m.name for m in HealthSettings().metrics]
    assert BACKUP_STALE in names
    assert BACKUP_VERIFICATION_FAILED in names
