"""A database that answers read-only (25006, as a standby after a failover does) is an outage.

The writer already kept its rows through it; the alert store used to treat 25006 as "these
rows are bad", take the item-by-item path and drop alert state and queued notifications.
Both now share storage.errors.TRANSIENT_ERRORS.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from pluginmon.alerts.engine import AlertEngine
from pluginmon.alerts.outbox import OutboxDeliverer
from pluginmon.alerts.rules import WebhookConfig
from pluginmon.collectors.models import PluginKey
from pluginmon.daemon.config_sections import parse_rules
from pluginmon.storage import alert_state
from pluginmon.storage.errors import is_transient
from tests.alerts_helpers import FakeClock, Receiver, plugin_ids, plugin_sample, snapshot

KEY = PluginKey("acme", "resizer", "production")
RULES = parse_rules(
    [
        {
            "name": "CpuHigh",
            "metric": "cpu_percent",
            "op": ">",
            "threshold": 50,
            "for_seconds": 10,
            "severity": "critical",
        },
    ],
    include_builtins=False,
)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(secret="s3cret")
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


async def set_read_only(admin: asyncpg.Connection, on: bool) -> None:
    """Make every new session of the database read-only (or not) and end the current ones,
    so the pools reconnect into the new mode, as they would onto a promoted standby."""
    database = await admin.fetchval("SELECT current_database()")
    ident = '"' + database.replace('"', '""') + '"'
    if on:
        await admin.execute(f"ALTER DATABASE {ident} SET default_transaction_read_only = on")
    else:
        await admin.execute(f"ALTER DATABASE {ident} RESET default_transaction_read_only")
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )


async def test_read_only_database_loses_no_alert_state_or_notification(
    migrated_db: str, receiver: Receiver, tmp_path: Path
) -> None:
    clock = FakeClock()
    hook = WebhookConfig(name="ops", url=receiver.url, secret=receiver.secret)
    admin = await asyncpg.connect(migrated_db)
    try:
        async with asyncpg.create_pool(migrated_db, min_size=1, max_size=3) as pool:
            ids = await plugin_ids(pool, [KEY])
            engine = AlertEngine(
                pool,
                RULES,
                clock=clock,
                webhooks=[hook],
                database_timeout_seconds=3,
                spool_dir=tmp_path / "alert-spool",
            )
            await engine.start()

            await set_read_only(admin, True)
            await pool.expire_connections()
            # The server really refuses writes now, with the standby's SQLSTATE.
            async with pool.acquire() as conn:
                with pytest.raises(asyncpg.ReadOnlySQLTransactionError) as refused:
                    await conn.execute("CREATE TEMP TABLE probe_write (x int)")
            assert is_transient(refused.value)

            kinds: list[str] = []
            for _ in range(3):  # pending, then firing, then still firing
                report = await engine.process(
                    snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids
                )
                kinds += [kind for _, _, kind in report.transitions]
                assert not report.persisted
                assert report.database_error is not None
                assert "ReadOnlySQLTransaction" in report.database_error
                clock.advance(10)
            assert kinds == ["pending", "firing"]
            async with pool.acquire() as conn:
                assert await alert_state.load_alerts(conn) == []

            await set_read_only(admin, False)  # the primary is back
            await pool.expire_connections()
            report = await engine.process(
                snapshot(clock(), [plugin_sample(KEY, clock(), cpu=90)]), ids
            )
            assert report.persisted, report.database_error

            async with pool.acquire() as conn:
                alerts = await alert_state.load_alerts(conn)
                bodies = await conn.fetch("SELECT body FROM notification_outbox ORDER BY id")
            assert [(a.rule_name, a.status) for a in alerts] == [("CpuHigh", "firing")]
            assert [json.loads(b["body"])["status"] for b in bodies] == ["firing"]

            async with OutboxDeliverer(pool, [hook], clock=clock) as deliverer:
                for _ in range(3):
                    await deliverer.deliver_due()
            assert [r.json["status"] for r in receiver.received] == ["firing"]
            assert receiver.received[0].json["alerts"][0]["fingerprint"] == alerts[0].fingerprint
            await engine.aclose()
    finally:
        await admin.close()
