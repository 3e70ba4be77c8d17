"""The alert journal: alert state and notifications made during an outage survive a kill."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine, EvaluationReport
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.rules import WebhookConfig
from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.storage import alert_journal, alert_state
from pluginmon.storage.errors import TRANSIENT_ERRORS
from tests.alerts_helpers import FakeClock, Receiver, TcpProxy, plugin_ids, plugin_sample, snapshot

ROOT = Path(__file__).resolve().parent.parent
KEY = PluginKey("acme", "resizer", "production")
RULES = parse_rules(
    [
        {
            "name": "CpuHigh",
            "metric": "cpu_percent",
            "op": ">",
            "threshold": 50,
            "clear_threshold": 30,
            "for_seconds": 10,
            "severity": "critical",
            "annotations": {"summary": "{plugin} cpu {value:.0f}%"},
        },
    ],
    include_builtins=False,
)


@pytest.fixture
async def pool(migrated_db: str) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(migrated_db, min_size=1, max_size=4) as p:
        yield p


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(secret="s3cret")
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def proxy(migrated_db: str) -> AsyncIterator[TcpProxy]:
    parts = urlsplit(migrated_db)
    p = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await p.up()
    try:
        yield p
    finally:
        await p.down()


def proxied_url(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def hook_for(receiver: Receiver) -> WebhookConfig:
    return WebhookConfig(name="ops", url=receiver.url, secret=receiver.secret)


def engine_for(
    pool: asyncpg.Pool,
    clock: FakeClock,
    receiver: Receiver,
    spool_dir: Path,
    instance: str | None = None,
) -> AlertEngine:
    return AlertEngine(
        pool,
        RULES,
        clock=clock,
        webhooks=[hook_for(receiver)],
        database_timeout_seconds=3,
        spool_dir=spool_dir,
        instance=instance,
    )


async def run_cycles(
    engine: AlertEngine, clock: FakeClock, ids: dict[PluginKey, int], cpus: Sequence[float]
) -> tuple[list[str], EvaluationReport]:
    kinds: list[str] = []
    report: EvaluationReport | None = None
    for cpu in cpus:
        report = await engine.process(
            snapshot(clock(), [plugin_sample(KEY, clock(), cpu=cpu)]), ids
        )
        kinds += [kind for _, _, kind in report.transitions]
        clock.advance(10)
    assert report is not None
    return kinds, report


async def outage_run(
    migrated_db: str,
    proxy: TcpProxy,
    clock: FakeClock,
    receiver: Receiver,
    spool_dir: Path,
    ids: dict[PluginKey, int],
    cpus: Sequence[float],
    instance: str | None = None,
) -> list[str]:
    """An engine that starts with the database up, loses it, evaluates ``cpus`` and dies
    (its journal lock released, nothing else written) before the database is back."""
    async with asyncpg.create_pool(
        proxied_url(migrated_db, proxy), min_size=1, max_size=2
    ) as flaky:
        engine = engine_for(flaky, clock, receiver, spool_dir, instance)
        await engine.start()
        await proxy.down()
        kinds, report = await run_cycles(engine, clock, ids, cpus)
        assert not report.persisted
        assert report.database_error is not None
        assert report.journal_batches >= 1
        await engine.aclose()
    return kinds


async def stored(pool: asyncpg.Pool) -> tuple[list[alert_state.StoredAlert], list[str]]:
    async with pool.acquire() as conn:
        alerts = await alert_state.load_alerts(conn)
        bodies = await conn.fetch("SELECT body FROM notification_outbox ORDER BY id")
    return alerts, [json.loads(b["body"])["status"] for b in bodies]


def segments(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("*.seg"))


async def test_alert_fired_during_outage_survives_a_kill(
    pool: asyncpg.Pool,
    migrated_db: str,
    proxy: TcpProxy,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    spool_dir = tmp_path / "alert-spool"
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    kinds = await outage_run(migrated_db, proxy, clock, receiver, spool_dir, ids, [90, 90])
    assert kinds == ["pending", "firing"]
    assert await stored(pool) == ([], [])  # the database never saw any of it
    assert segments(spool_dir)

    # A new process, database up: the journal is replayed before the open alerts are loaded.
    engine = engine_for(pool, clock, receiver, spool_dir)
    await engine.start()
    alerts, outbox = await stored(pool)
    assert [(a.rule_name, a.status, a.value) for a in alerts] == [("CpuHigh", "firing", 90.0)]
    assert alerts[0].notified_at is not None
    assert outbox == ["firing"]
    assert [(a.alertname, a.status) for a in engine.alerts()] == [("CpuHigh", "firing")]
    assert segments(spool_dir) == []  # acked

    # Still hot: the restored alert is already notified, so nothing new is queued.
    _, report = await run_cycles(engine, clock, ids, [90])
    assert report.persisted
    assert report.notifications_queued == 0
    async with OutboxDeliverer(pool, [hook_for(receiver)], clock=clock) as deliverer:
        for _ in range(3):
            await deliverer.deliver_due()
    assert [r.json["status"] for r in receiver.received] == ["firing"]
    assert receiver.received[0].signature_ok is True
    (sent,) = receiver.received[0].json["alerts"]
    assert sent["fingerprint"] == alerts[0].fingerprint
    assert sent["labels"]["alertname"] == "CpuHigh"
    await engine.aclose()


async def test_journal_replay_keeps_the_owner_instance(
    pool: asyncpg.Pool,
    migrated_db: str,
    proxy: TcpProxy,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    spool_dir = tmp_path / "alert-spool"
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    kinds = await outage_run(
        migrated_db, proxy, clock, receiver, spool_dir, ids, [90, 90], instance="host-a"
    )
    assert kinds == ["pending", "firing"]
    # Replayed by the same daemon (same host setting) after a restart.
    engine = engine_for(pool, clock, receiver, spool_dir, "host-a")
    await engine.start()
    async with pool.acquire() as conn:
        alert_owners = await conn.fetch("SELECT instance, status FROM plugin_alerts")
        outbox_owners = await conn.fetch("SELECT instance FROM notification_outbox")
    assert [(r["instance"], r["status"]) for r in alert_owners] == [("host-a", "firing")]
    assert [r["instance"] for r in outbox_owners] == ["host-a"]
    assert [a.status for a in engine.alerts()] == ["firing"]
    await engine.aclose()
    # Only host-a's deliverer sends it, to its receiver.
    async with (
        OutboxDeliverer(pool, [hook_for(receiver)], clock=clock, instance="host-b") as other,
        OutboxDeliverer(pool, [hook_for(receiver)], clock=clock, instance="host-a") as owner,
    ):
        assert (await other.deliver_due()).claimed == 0
        assert (await owner.deliver_due()).delivered == 1
    assert [r.json["status"] for r in receiver.received] == ["firing"]


def _alert_write(
    tenant: str,
    plugin: str,
    fingerprint: str,
    at: datetime,
    *,
    plugin_id: int | None = None,
    severity: str = "critical",
) -> alert_state.AlertWrite:
    """A firing alert's journaled write; without ``plugin_id`` as one journaled before its
    plugin had an id (named in its labels only)."""
    return alert_state.AlertWrite(
        id=None,
        tenant_id=tenant,
        plugin_id=plugin_id,
        environment="production",
        rule_name="CpuHigh",
        fingerprint=fingerprint,
        severity=severity,
        status="firing",
        inhibited=False,
        value=90.0,
        labels={"alertname": "CpuHigh", "plugin": plugin},
        annotations={},
        started_at=at,
        fired_at=at,
        resolved_at=None,
        silenced_until=None,
        last_active_at=at,
        last_evaluated_at=at,
        notified_at=None,
    )


async def test_journal_entries_without_an_owner_get_the_replaying_instance(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Entries journaled before owners were recorded carry no "instance": the replaying
    engine's instance is used (the journal lives in that daemon's data directory)."""
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    write = _alert_write(KEY.tenant, KEY.plugin, "0123456789abcdef", clock(), plugin_id=ids[KEY])
    assert write.environment == KEY.environment
    old_format = json.loads(alert_journal.encode_alert_write(write))
    assert old_format.pop("instance") == ""
    decoded = alert_journal.decode_alert_write(json.dumps(old_format))
    assert decoded.instance == ""
    journal = alert_journal.AlertJournal(tmp_path / "j")
    try:
        journal.append([decoded], [])
        async with pool.acquire() as conn:
            result = await alert_journal.replay_journal(conn, journal.read(), instance="host-a")
            owner = await conn.fetchval("SELECT instance FROM plugin_alerts")
    finally:
        journal.close()
    assert result.alerts == 1
    assert owner == "host-a"


async def test_journal_entries_without_a_plugin_id_create_their_plugins_first(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A journal written before the database knew the plugins: the replay creates them (and
    their tenants) by name before its own transaction, audited as the daemon's, and drops an
    entry whose tenant the schema refuses, or whose plugin the database refuses (a NUL in its
    name), naming it, without losing the others. An entry
    the database refuses (a severity its CHECK does not know) does not take its plugin with
    it: the plugin was created first, so the plugin's next entry is written (it was refused
    too when the plugin was created inside the refused entry's savepoint)."""
    clock = FakeClock()
    writes = [
        _alert_write("newco", "resizer", "0000000000000000", clock(), severity="bogus"),
        _alert_write("newco", "resizer", "1111111111111111", clock()),
        _alert_write("Bad Tenant", "resizer", "2222222222222222", clock()),
        _alert_write("newco", "nul\x00name", "4444444444444444", clock()),  # the database refuses
        _alert_write("otherco", "indexer", "3333333333333333", clock()),
    ]
    journal = alert_journal.AlertJournal(tmp_path / "j")
    try:
        journal.append(writes, [])
        async with pool.acquire() as conn:
            result = await alert_journal.replay_journal(conn, journal.read(), instance="host-a")
            alerts = await conn.fetch(
                "SELECT a.tenant_id, p.name, a.fingerprint FROM plugin_alerts a"
                " JOIN plugins p ON p.id = a.plugin_id ORDER BY a.fingerprint"
            )
            audited = await conn.fetch(
                "SELECT tenant_id, actor, action, entity_id FROM audit_log ORDER BY id"
            )
            again = await alert_journal.replay_journal(conn, journal.read(), instance="host-a")
            audited_again = await conn.fetchval("SELECT count(*) FROM audit_log")
    finally:
        journal.close()
    assert (result.alerts, result.refused) == (2, 3)
    assert [tuple(r) for r in alerts] == [
        ("newco", "resizer", "1111111111111111"),
        ("otherco", "indexer", "3333333333333333"),
    ]
    assert sorted(tuple(r) for r in audited) == [
        ("newco", "daemon", "plugin.create", "resizer"),
        ("newco", "daemon", "tenant.create", "newco"),
        ("otherco", "daemon", "plugin.create", "indexer"),
        ("otherco", "daemon", "tenant.create", "otherco"),
    ]
    # Replayed again (a crash before the ack): nothing created, nothing audited twice.
    assert again.refused == 3
    assert audited_again == len(audited)


async def test_replaying_a_journal_twice_does_not_duplicate(
    pool: asyncpg.Pool,
    migrated_db: str,
    proxy: TcpProxy,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    spool_dir = tmp_path / "alert-spool"
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    # pending, firing, resolved, pending, firing: two instances of one fingerprint
    kinds = await outage_run(
        migrated_db, proxy, clock, receiver, spool_dir, ids, [90, 90, 10, 90, 90]
    )
    assert kinds == ["pending", "firing", "resolved", "pending", "firing"]
    # A copy of the journal as it is before the replay: a crash after the replay's commit
    # and before its ack leaves exactly this on disk.
    backup = tmp_path / "backup"
    shutil.copytree(spool_dir, backup, ignore=shutil.ignore_patterns("lock"))

    first = engine_for(pool, clock, receiver, spool_dir)
    await first.start()
    await first.aclose()
    after_first = await stored(pool)
    assert [a.status for a in after_first[0]] == ["resolved", "firing"]
    assert after_first[1] == ["firing", "resolved", "firing"]

    shutil.rmtree(spool_dir)
    shutil.copytree(backup, spool_dir)
    second = engine_for(pool, clock, receiver, spool_dir)
    await second.start()
    after_second = await stored(pool)
    assert [(a.id, a.status, a.started_at, a.resolved_at) for a in after_second[0]] == [
        (a.id, a.status, a.started_at, a.resolved_at) for a in after_first[0]
    ]
    assert after_second[1] == after_first[1]
    assert [a.status for a in second.alerts()] == ["firing"]
    assert segments(spool_dir) == []
    await second.aclose()

    async with OutboxDeliverer(pool, [hook_for(receiver)], clock=clock) as deliverer:
        for _ in range(4):
            await deliverer.deliver_due()
    assert [r.json["status"] for r in receiver.received] == ["firing", "resolved", "firing"]
    assert len({r.idempotency_key for r in receiver.received}) == 3


async def test_stale_journal_does_not_undo_newer_state(
    pool: asyncpg.Pool,
    migrated_db: str,
    proxy: TcpProxy,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """The database came back, the engine wrote newer state, and the process died before
    acking the journal: replaying it must not bring the alert back to firing."""
    spool_dir = tmp_path / "alert-spool"
    backup = tmp_path / "backup"
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    async with asyncpg.create_pool(
        proxied_url(migrated_db, proxy), min_size=1, max_size=2
    ) as flaky:
        engine = engine_for(flaky, clock, receiver, spool_dir)
        await engine.start()
        await proxy.down()
        await run_cycles(engine, clock, ids, [90, 90])
        shutil.copytree(spool_dir, backup, ignore=shutil.ignore_patterns("lock"))
        await proxy.up()
        kinds, report = await run_cycles(engine, clock, ids, [90, 10])
        assert kinds == ["resolved"]
        assert report.persisted
        assert report.journal_batches == 0
        assert segments(spool_dir) == []
        await engine.aclose()
    shutil.rmtree(spool_dir)
    shutil.copytree(backup, spool_dir)

    engine = engine_for(pool, clock, receiver, spool_dir)
    await engine.start()
    alerts, outbox = await stored(pool)
    assert [a.status for a in alerts] == ["resolved"]
    assert outbox == ["firing", "resolved"]
    assert engine.alerts() == []
    await engine.aclose()


async def test_torn_journal_tail_is_tolerated(
    pool: asyncpg.Pool,
    migrated_db: str,
    proxy: TcpProxy,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    spool_dir = tmp_path / "alert-spool"
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    await outage_run(migrated_db, proxy, clock, receiver, spool_dir, ids, [90, 90])
    (segment,) = segments(spool_dir)
    # A crash in the middle of a third append: half a record header, then nothing.
    with segment.open("ab") as handle:
        handle.write(b"\x40\x00\x00")
    engine = engine_for(pool, clock, receiver, spool_dir)
    await engine.start()
    alerts, outbox = await stored(pool)
    assert [a.status for a in alerts] == ["firing"]
    assert outbox == ["firing"]
    assert segments(spool_dir) == []
    await engine.aclose()


async def test_torn_last_batch_loses_only_that_cycle(
    pool: asyncpg.Pool,
    migrated_db: str,
    proxy: TcpProxy,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """The firing cycle's append was cut short by the crash (it never returned): the
    pending alert from the cycle before is replayed, and the alert fires again later."""
    spool_dir = tmp_path / "alert-spool"
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    await outage_run(migrated_db, proxy, clock, receiver, spool_dir, ids, [90, 90])
    (segment,) = segments(spool_dir)
    with segment.open("r+b") as handle:
        handle.truncate(segment.stat().st_size - 7)
    engine = engine_for(pool, clock, receiver, spool_dir)
    await engine.start()
    alerts, outbox = await stored(pool)
    assert [a.status for a in alerts] == ["pending"]
    assert outbox == []
    kinds, report = await run_cycles(engine, clock, ids, [90])
    assert kinds == ["firing"]
    assert report.persisted
    assert report.notifications_queued == 1
    alerts, outbox = await stored(pool)
    assert [a.status for a in alerts] == ["firing"]
    assert outbox == ["firing"]
    await engine.aclose()


async def test_journal_left_while_database_is_down_at_start_is_replayed_later(
    pool: asyncpg.Pool,
    migrated_db: str,
    proxy: TcpProxy,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """start() cannot reach the database: the old journal stays, new outage state is
    appended after it, and the first cycle that reaches the database writes both in order."""
    spool_dir = tmp_path / "alert-spool"
    clock = FakeClock()
    ids = await plugin_ids(pool, [KEY])
    await outage_run(migrated_db, proxy, clock, receiver, spool_dir, ids, [90, 90, 10])
    async with asyncpg.create_pool(
        proxied_url(migrated_db, proxy), min_size=0, max_size=2
    ) as flaky:
        engine = engine_for(flaky, clock, receiver, spool_dir)
        with pytest.raises(TRANSIENT_ERRORS):
            await engine.start()
        kinds, report = await run_cycles(engine, clock, ids, [90, 90])
        assert kinds == ["pending", "firing"]
        assert not report.persisted
        assert report.journal_batches >= 2
        assert await stored(pool) == ([], [])
        await proxy.up()
        _, report = await run_cycles(engine, clock, ids, [90])
        assert report.persisted
        assert report.journal_batches == 0
        await engine.aclose()
    alerts, outbox = await stored(pool)
    assert [a.status for a in alerts] == ["resolved", "firing"]
    assert outbox == ["firing", "resolved", "firing"]
    assert segments(spool_dir) == []


_CHILD = """
import asyncio, json, sys
from pathlib import Path

import asyncpg

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.rules import WebhookConfig
from tests.alerts_helpers import FakeClock, plugin_sample, snapshot
from tests.test_alert_spool import KEY, RULES


async def main(url: str, spool_dir: str, plugin_id: int, hook_url: str) -> None:
    clock = FakeClock()
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    hook = WebhookConfig(name="ops", url=hook_url, secret="s3cret")
    engine = AlertEngine(
        pool, RULES, clock=clock, webhooks=[hook], database_timeout_seconds=3,
        spool_dir=Path(spool_dir),
    )
    await engine.start()
    print("started", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the parent cuts the database meanwhile
    for cpu in (90, 90):
        report = await engine.process(
            snapshot(clock(), [plugin_sample(KEY, clock(), cpu=cpu)]), {KEY: plugin_id}
        )
        clock.advance(10)
    print(json.dumps({"persisted": report.persisted, "journal": report.journal_batches}),
          flush=True)
    await asyncio.sleep(3600)  # SIGKILLed here


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""


async def test_sigkilled_process_journal_is_replayed(
    pool: asyncpg.Pool,
    migrated_db: str,
    proxy: TcpProxy,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """A real process fires an alert during an outage and is SIGKILLed: no close, no
    flush, the kernel releases its journal lock. A new engine replays what it journaled."""
    spool_dir = tmp_path / "alert-spool"
    ids = await plugin_ids(pool, [KEY])
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        proxied_url(migrated_db, proxy),
        str(spool_dir),
        str(ids[KEY]),
        receiver.url,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert await child.stdout.readline() == b"started\n"
            await proxy.down()
            child.stdin.write(b"go\n")
            await child.stdin.drain()
            report = json.loads(await child.stdout.readline())
        assert report == {"persisted": False, "journal": 2}
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    assert await stored(pool) == ([], [])

    clock = FakeClock()
    clock.advance(20)
    engine = engine_for(pool, clock, receiver, spool_dir)
    await engine.start()
    alerts, outbox = await stored(pool)
    assert [(a.status, a.value) for a in alerts] == [("firing", 90.0)]
    assert outbox == ["firing"]
    assert segments(spool_dir) == []
    _, report2 = await run_cycles(engine, clock, ids, [90])
    assert report2.notifications_queued == 0
    async with OutboxDeliverer(pool, [hook_for(receiver)], clock=clock) as deliverer:
        for _ in range(3):
            await deliverer.deliver_due()
    assert [r.json["status"] for r in receiver.received] == ["firing"]
    await engine.aclose()
