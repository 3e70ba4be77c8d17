"""The audit trail in the database: the hash chain, append-only enforcement, retention with an
anchor, and verification catching rows changed, removed or reordered behind the triggers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import psycopg
import pytest

from pluginmon.registry import audit
from pluginmon.registry.actor import Actor
from pluginmon.registry.audit import Breach
from pluginmon.storage import backend
from pluginmon.storage.backend import Retention, admin_connection
from tests.waiting import wait_until

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
ANN = Actor(name="ann", token_id=1, request_id="req-1", source_address="127.0.0.1")


async def _append(conn: asyncpg.Connection, tenant: str, n: int, *, start: int = 0) -> None:
    for i in range(start, start + n):
        await audit.append(
            conn,
            tenant_id=tenant,
            actor=ANN,
            action="plugin.update",
            entity_type="plugin",
            entity_id=f"p{i}",
            occurred_at=NOW + timedelta(seconds=i),
            before={"version": f"1.{i}"},
            after={"version": f"1.{i + 1}", "api_token": "pmt_should_not_appear"},
        )


async def _writer_entry(writer: asyncpg.Connection, name: str, request_id: str) -> None:
    """One entry of tenant ``a`` by writer ``name``, found again by ``request_id``."""
    await audit.append(
        writer,
        tenant_id="a",
        actor=Actor(name=name, request_id=request_id),
        action="plugin.update",
        entity_type="plugin",
        occurred_at=NOW,
    )


def _owner(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, autocommit=True)


async def _verdict(conn: asyncpg.Connection, tenant: str) -> audit.ChainVerdict:
    (verdict,) = await audit.verify(conn, tenant_id=tenant)
    return verdict


async def test_entries_are_chained_per_tenant_and_verify(conn: asyncpg.Connection) -> None:
    await _append(conn, "a", 3)
    await _append(conn, "b", 2)
    rows = await conn.fetch(
        "SELECT tenant_id, seq, prev_hash, entry_hash FROM audit_log ORDER BY tenant_id, seq"
    )
    assert [(r["tenant_id"], r["seq"]) for r in rows] == [
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 1),
        ("b", 2),
    ]
    assert bytes(rows[0]["prev_hash"]) == audit.GENESIS_HASH
    assert bytes(rows[1]["prev_hash"]) == bytes(rows[0]["entry_hash"])
    assert bytes(rows[3]["prev_hash"]) == audit.GENESIS_HASH  # b's chain is its own
    verdicts = await audit.verify(conn)
    assert [(v.tenant_id, v.checked, v.intact) for v in verdicts] == [
        ("a", 3, True),
        ("b", 2, True),
    ]
    # Redaction happened before hashing and storing.
    after = await conn.fetchval(
        "SELECT after_state::text FROM audit_log WHERE seq = 1 AND tenant_id = 'a'"
    )
    assert "pmt_should_not_appear" not in after
    assert '"api_token": "***"' in after


async def test_python_hash_matches_the_database_function(conn: asyncpg.Connection) -> None:
    """Two independent implementations of one encoding (non-ASCII text included)."""
    await audit.append(
        conn,
        tenant_id="a",
        actor=Actor(name="zoë", request_id=None),
        action="plugin.create",
        entity_type="plugin",
        entity_id="résumé",
        occurred_at=NOW,
        details={"note": "ünïcode ✓", "n": 1.5},
    )
    row = await conn.fetchrow(
        f"SELECT {audit._CANONICAL_SELECT}, prev_hash, entry_hash,"  # noqa: S608 - constant
        " pluginmon_audit_entry_hash(l) AS db_hash FROM audit_log l"
    )
    assert row is not None
    python_hash = audit.entry_hash(
        [row[c] for c in audit._CANONICAL_COLUMNS], bytes(row["prev_hash"])
    )
    assert python_hash == bytes(row["entry_hash"]) == bytes(row["db_hash"])


async def test_append_only_for_everyone_including_the_owner(
    conn: asyncpg.Connection, migrated_db: str
) -> None:
    await _append(conn, "a", 2)
    with _owner(migrated_db) as owner:
        for statement in (
            "UPDATE audit_log SET actor = 'mallory'",
            "DELETE FROM audit_log WHERE seq = 1",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                owner.execute(statement)
        # The API role has neither the grant nor the function.
        with owner.transaction():
            owner.execute("SET LOCAL ROLE pluginmon_api")
            owner.execute("SELECT set_config('pluginmon.tenant_id', 'a', true)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                owner.execute("SELECT pluginmon_audit_expire(now())")
        with owner.transaction():
            owner.execute("SET LOCAL ROLE pluginmon_api")
            owner.execute("SELECT set_config('pluginmon.tenant_id', 'a', true)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                owner.execute("SELECT pluginmon_audit_expire_tenant('a', now(), 10)")
        with owner.transaction():
            owner.execute("SET LOCAL ROLE pluginmon_api")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                owner.execute("DELETE FROM audit_log")
        # Supplied chain columns are ignored: the trigger takes the next link.
        owner.execute(
            "INSERT INTO audit_log (tenant_id, actor, action, entity_type, seq, prev_hash, entry_hash)"
            " VALUES ('a', 'x', 'forged', 'plugin', 1, '\\x00', '\\x00')"
        )
        assert owner.execute("SELECT seq FROM audit_log WHERE action = 'forged'").fetchone() == (3,)
        assert owner.execute("SELECT count(*) FROM audit_log").fetchone() == (3,)
    assert (await _verdict(conn, "a")).intact


async def test_retention_cuts_a_prefix_keeps_an_anchor_and_the_chain_verifies(
    conn: asyncpg.Connection, migrated_db: str
) -> None:
    # Entries 1, 2 and 4 are old, 3 is not: the cut stops before 3, never leaves a hole.
    old = NOW - timedelta(days=800)
    for i, when in enumerate((old, old, NOW, old, NOW)):
        await audit.append(
            conn,
            tenant_id="a",
            actor=ANN,
            action=f"act{i + 1}",
            entity_type="plugin",
            occurred_at=when,
        )
    with _owner(migrated_db) as owner:
        removed = owner.execute(
            "SELECT pluginmon_audit_expire(%s)", (NOW - timedelta(days=730),)
        ).fetchone()
        assert removed == (2,)
        left = owner.execute("SELECT seq, action FROM audit_log ORDER BY seq").fetchall()
        assert left == [(3, "act3"), (4, "act4"), (5, "act5"), (6, "audit.expire")]
        chain = owner.execute(
            "SELECT anchor_seq, head_seq FROM audit_chain WHERE lane = 0"
        ).fetchone()
        assert chain == (2, 6)
        # Nothing more is old enough to go past entry 3: a second run removes nothing.
        assert owner.execute(
            "SELECT pluginmon_audit_expire(%s)", (NOW - timedelta(days=730),)
        ).fetchone() == (0,)
    verdict = await _verdict(conn, "a")
    assert verdict.intact, verdict.problem
    (lane,) = verdict.lanes
    assert (lane.lane, lane.anchor_seq, lane.checked, lane.head_seq) == (0, 2, 4, 6)


async def _old_entries_in_two_lanes(conn: asyncpg.Connection, url: str, tenant: str) -> None:
    """Lane 0: one old entry, then a recent one; lane 1 (taken while lane 0 is held): three
    old entries."""
    old = NOW - timedelta(days=800)
    await audit.append(conn, tenant_id=tenant, actor=ANN, action="old0", entity_type="plugin",
                       occurred_at=old)  # fmt: skip
    holder = await asyncpg.connect(url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM audit_chain WHERE tenant_id = $1 AND lane = 0 FOR UPDATE", tenant
            )
            for i in range(3):
                await audit.append(conn, tenant_id=tenant, actor=ANN, action=f"old1-{i}",
                                   entity_type="plugin", occurred_at=old)  # fmt: skip
    finally:
        await holder.close()
    await audit.append(conn, tenant_id=tenant, actor=ANN, action="recent", entity_type="plugin",
                       occurred_at=NOW)  # fmt: skip
    lanes = await conn.fetch(
        "SELECT lane, count(*) AS n FROM audit_log WHERE tenant_id = $1 GROUP BY 1 ORDER BY 1",
        tenant,
    )
    assert [(r["lane"], r["n"]) for r in lanes] == [(0, 2), (1, 3)]


async def test_retention_per_tenant_cuts_each_lane_in_bounded_steps(
    conn: asyncpg.Connection, migrated_db: str
) -> None:
    """sql/130: at most max_rows entries a call, lane by lane, each lane's prefix only, the
    anchors moved and the call recorded in the tenant's chain."""
    await _old_entries_in_two_lanes(conn, migrated_db, "a")
    horizon = NOW - timedelta(days=730)
    with _owner(migrated_db) as owner:
        step = "SELECT pluginmon_audit_expire_tenant('a', %s, 2)"
        assert owner.execute(step, (horizon,)).fetchone() == (2,)
        anchors = owner.execute(
            "SELECT lane, anchor_seq FROM audit_chain WHERE tenant_id = 'a' AND lane < 2"
            " ORDER BY lane"
        ).fetchall()
        assert anchors == [(0, 1), (1, 1)]  # lane 0's recent entry stops its cut
        assert owner.execute(step, (horizon,)).fetchone() == (2,)
        assert owner.execute(step, (horizon,)).fetchone() == (0,)
        left = owner.execute(
            "SELECT action, details->>'removed', details->'anchors' FROM audit_log"
            " WHERE tenant_id = 'a' ORDER BY id"
        ).fetchall()
        assert left == [
            ("recent", None, None),
            ("audit.expire", "2", {"0": 1, "1": 1}),
            ("audit.expire", "2", {"1": 3}),
        ]
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_rows"):
            owner.execute("SELECT pluginmon_audit_expire_tenant('a', %s, 0)", (horizon,))
    verdict = await _verdict(conn, "a")
    assert verdict.intact, verdict.problem


async def test_the_daemons_retention_takes_every_tenant_in_batches(
    conn: asyncpg.Connection, migrated_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _old_entries_in_two_lanes(conn, migrated_db, "a")
    await _old_entries_in_two_lanes(conn, migrated_db, "b")
    monkeypatch.setattr(backend, "AUDIT_EXPIRE_BATCH", 3)
    async with admin_connection(migrated_db) as admin:
        removed = await backend.delete_expired(admin, Retention(), NOW)
    assert dict(removed)["audit_log"] == 8  # 4 old entries of each tenant
    for tenant in ("a", "b"):
        rows = await conn.fetch(
            "SELECT action, (details->>'removed')::int AS n FROM audit_log WHERE tenant_id = $1"
            " ORDER BY id",
            tenant,
        )
        # Two calls of 3 and 1 entries: two records of the run in the tenant's own chain.
        assert [(r["action"], r["n"]) for r in rows] == [
            ("recent", None),
            ("audit.expire", 3),
            ("audit.expire", 1),
        ]
        verdict = await _verdict(conn, tenant)
        assert verdict.intact, verdict.problem


async def test_retention_leaves_a_lane_that_misses_an_entry_of_its_cut(
    conn: asyncpg.Connection, migrated_db: str
) -> None:
    """A missing entry is evidence of tampering: retention never erases it. 030 checked only
    the cut entry itself, so a hole before it was removed with the prefix."""
    await _old_entries_in_two_lanes(conn, migrated_db, "a")
    # Lane 1 holds seq 1-3, all past the horizon: remove the middle one behind the triggers.
    _tamper(migrated_db, "DELETE FROM audit_log WHERE tenant_id = 'a' AND lane = 1 AND seq = 2")
    horizon = NOW - timedelta(days=730)
    with _owner(migrated_db) as owner:
        removed = owner.execute(
            "SELECT pluginmon_audit_expire_tenant('a', %s, 100)", (horizon,)
        ).fetchone()
        assert removed == (1,)  # lane 0's old entry only
        anchors = owner.execute(
            "SELECT lane, anchor_seq FROM audit_chain WHERE tenant_id = 'a' AND lane < 2"
            " ORDER BY lane"
        ).fetchall()
        assert anchors == [(0, 1), (1, 0)]
        # Then its first entry too: the lane is still left alone.
        _tamper(migrated_db, "DELETE FROM audit_log WHERE tenant_id = 'a' AND lane = 1 AND seq = 1")
        assert owner.execute(
            "SELECT pluginmon_audit_expire_tenant('a', %s, 100)", (horizon,)
        ).fetchone() == (0,)
        assert owner.execute(
            "SELECT count(*) FROM audit_log WHERE tenant_id = 'a' AND lane = 1"
        ).fetchone() == (1,)
    verdict = await _verdict(conn, "a")
    assert not verdict.intact
    assert verdict.problem is not None
    assert verdict.problem.lane == 1


async def test_the_daemons_retention_gives_up_on_a_held_lane_until_the_next_pass(
    conn: asyncpg.Connection, migrated_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that keeps a lane's head does not stall the maintenance job: the step waits
    lock_timeout, that tenant is left for the next pass, the other tenants are done."""
    await _old_entries_in_two_lanes(conn, migrated_db, "a")
    await _old_entries_in_two_lanes(conn, migrated_db, "b")
    monkeypatch.setattr(backend, "AUDIT_EXPIRE_LOCK_TIMEOUT", "200ms")
    holder = await asyncpg.connect(migrated_db)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM audit_chain WHERE tenant_id = 'a' AND lane = 1 FOR UPDATE"
            )
            async with admin_connection(migrated_db) as admin:
                # (bounded: without the lock timeout the step would wait for the holder)
                first = await asyncio.wait_for(backend.delete_expired(admin, Retention(), NOW), 60)
        assert dict(first)["audit_log"] == 4  # tenant b's; none of a's (its step rolled back)
        left = await conn.fetchval(
            "SELECT count(*) FROM audit_log WHERE tenant_id = 'a' AND action LIKE 'old%'"
        )
        assert left == 4
        async with admin_connection(migrated_db) as admin:
            second = await backend.delete_expired(admin, Retention(), NOW)
        assert dict(second)["audit_log"] == 4
    finally:
        await holder.close()
    for tenant in ("a", "b"):
        verdict = await _verdict(conn, tenant)
        assert verdict.intact, verdict.problem


async def test_retention_of_a_tenant_holds_no_other_tenants_lane_and_leaves_its_writers_one(
    conn: asyncpg.Connection, migrated_db: str
) -> None:
    """030's retention held every lane of every tenant until it was done, so every audited
    write waited for it (an API write; a plugin seen for the first time, whose id lookup
    gave up after 3 s). sql/130 holds only the lanes it cut, of the tenant it cuts."""
    await _old_entries_in_two_lanes(conn, migrated_db, "a")
    await _append(conn, "b", 1)
    retention = await asyncpg.connect(migrated_db)
    writer_a = await asyncpg.connect(migrated_db)
    writer_b = await asyncpg.connect(migrated_db)
    try:
        run = retention.transaction()
        await run.start()
        removed = await retention.fetchval(
            "SELECT pluginmon_audit_expire_tenant('a', $1, 100)", NOW - timedelta(days=730)
        )
        assert removed == 4
        # Its transaction is open: lanes 0 and 1 of tenant a are held. Writers of b and of
        # a each get a lane at once (a bound that only a wait for the open transaction, which
        # never ends by itself here, would reach).
        await asyncio.wait_for(_writer_entry(writer_a, "wa", "during-retention"), 20)
        await asyncio.wait_for(
            audit.append(
                writer_b,
                tenant_id="b",
                actor=ANN,
                action="plugin.update",
                entity_type="plugin",
                occurred_at=NOW,
            ),
            20,
        )
        lane = await conn.fetchval(
            "SELECT lane FROM audit_log WHERE request_id = 'during-retention'"
        )
        assert lane == 2  # the first lane nobody holds
        await run.commit()
    finally:
        for connection in (retention, writer_a, writer_b):
            await connection.close()
    for tenant in ("a", "b"):
        verdict = await _verdict(conn, tenant)
        assert verdict.intact, verdict.problem


def _tamper(url: str, *statements: str) -> None:
    """As the table owner, with the append-only trigger switched off for the moment."""
    with _owner(url) as owner, owner.transaction():
        owner.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
        for statement in statements:
            owner.execute(statement)
        owner.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")


async def test_verify_names_an_updated_entry(conn: asyncpg.Connection, migrated_db: str) -> None:
    await _append(conn, "a", 5)
    await _append(conn, "b", 2)
    _tamper(migrated_db, "UPDATE audit_log SET actor = 'mallory' WHERE tenant_id = 'a' AND seq = 3")
    verdicts = {v.tenant_id: v for v in await audit.verify(conn)}
    assert verdicts["b"].intact
    problem = verdicts["a"].problem
    assert problem is not None
    assert (problem.kind, problem.seq) == (Breach.CHANGED, 3)
    entry_id = await conn.fetchval("SELECT id FROM audit_log WHERE tenant_id = 'a' AND seq = 3")
    assert problem.entry_id == entry_id
    assert f"seq=3 id={entry_id} was changed" in problem.message


async def test_verify_names_a_deleted_entry(conn: asyncpg.Connection, migrated_db: str) -> None:
    await _append(conn, "a", 5)
    _tamper(migrated_db, "DELETE FROM audit_log WHERE tenant_id = 'a' AND seq = 2")
    problem = (await _verdict(conn, "a")).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == (Breach.REMOVED, 2)
    assert "entry seq=2 is missing" in problem.message


async def test_verify_notices_a_removed_tail(conn: asyncpg.Connection, migrated_db: str) -> None:
    await _append(conn, "a", 4)
    _tamper(migrated_db, "DELETE FROM audit_log WHERE tenant_id = 'a' AND seq >= 3")
    problem = (await _verdict(conn, "a")).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == (Breach.REMOVED, 3)
    assert "chain head is seq=4" in problem.message


async def test_verify_names_a_swapped_pair(conn: asyncpg.Connection, migrated_db: str) -> None:
    await _append(conn, "a", 5)
    # Entries 2 and 3 trade places (the unique (tenant, seq) needs a parking value).
    _tamper(
        migrated_db,
        "UPDATE audit_log SET seq = 1000000 WHERE tenant_id = 'a' AND seq = 2",
        "UPDATE audit_log SET seq = 2 WHERE tenant_id = 'a' AND seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE tenant_id = 'a' AND seq = 1000000",
    )
    problem = (await _verdict(conn, "a")).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == (Breach.REORDERED, 2)
    assert "does not follow entry seq=1" in problem.message


async def test_verify_catches_a_recomputed_hash(conn: asyncpg.Connection, migrated_db: str) -> None:
    """A forger who also recomputes the changed entry's own hash breaks the next link."""
    await _append(conn, "a", 4)
    _tamper(
        migrated_db,
        "UPDATE audit_log SET actor = 'mallory' WHERE tenant_id = 'a' AND seq = 2",
        "UPDATE audit_log l SET entry_hash = pluginmon_audit_entry_hash(l)"
        " WHERE tenant_id = 'a' AND seq = 2",
    )
    problem = (await _verdict(conn, "a")).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == (Breach.REORDERED, 3)


async def test_query_filters(conn: asyncpg.Connection) -> None:
    await _append(conn, "a", 3)
    await audit.append(
        conn,
        tenant_id="a",
        actor=Actor(name="bob"),
        action="operation.create",
        entity_type="operation",
        entity_id="7",
        occurred_at=NOW + timedelta(hours=1),
    )
    everything = await audit.query(conn, audit.AuditQuery())
    assert [e.seq for e in everything] == [4, 3, 2, 1]
    by_bob = await audit.query(conn, audit.AuditQuery(actor="bob"))
    assert [(e.action, e.target) for e in by_bob] == [("operation.create", "operation/7")]
    one_plugin = await audit.query(conn, audit.AuditQuery(target="plugin/p1"))
    assert [e.entity_id for e in one_plugin] == ["p1"]
    plugins_only = await audit.query(conn, audit.AuditQuery(target="plugin"))
    assert len(plugins_only) == 3
    window = await audit.query(
        conn, audit.AuditQuery(since=NOW + timedelta(seconds=1), until=NOW + timedelta(seconds=2))
    )
    assert [e.entity_id for e in window] == ["p1"]
    page = await audit.query(conn, audit.AuditQuery(limit=2))
    older = await audit.query(conn, audit.AuditQuery(before_id=page[-1].id, limit=2))
    assert [e.seq for e in page + older] == [4, 3, 2, 1]


async def test_concurrent_writers_chain_side_by_side(
    conn: asyncpg.Connection, migrated_db: str
) -> None:
    """Open transactions of one tenant do not wait for each other: each takes a free lane."""
    await _append(conn, "a", 1)  # the tenant's first entry creates its lanes
    writers = [await asyncpg.connect(migrated_db) for _ in range(3)]
    try:
        transactions = [w.transaction() for w in writers]
        lanes = []
        for i, (writer, transaction) in enumerate(zip(writers, transactions, strict=True)):
            await transaction.start()
            # Waiting for another writer's lane would fail here instead of hanging.
            await writer.execute("SET LOCAL lock_timeout = '2s'")
            await _writer_entry(writer, f"w{i}", f"r{i}")
            lanes.append(
                await writer.fetchval("SELECT lane FROM audit_log WHERE request_id = $1", f"r{i}")
            )
        assert lanes == [0, 1, 2]
        for transaction in transactions:
            await transaction.commit()
    finally:
        for writer in writers:
            await writer.close()
    await _append(conn, "a", 2)  # one at a time: lane 0 again
    (verdict,) = await audit.verify(conn, tenant_id="a")
    assert verdict.intact, verdict.problem
    assert [(lane.lane, lane.checked) for lane in verdict.lanes] == [(0, 4), (1, 1), (2, 1)]
    _tamper(
        migrated_db, "UPDATE audit_log SET actor = 'mallory' WHERE tenant_id = 'a' AND lane = 1"
    )
    (verdict,) = await audit.verify(conn, tenant_id="a")
    assert verdict.problem is not None
    assert (verdict.problem.lane, verdict.problem.seq, verdict.problem.kind) == (
        1,
        1,
        Breach.CHANGED,
    )
    assert "in lane 1 was changed" in verdict.problem.message


async def test_entries_arriving_while_every_lane_is_held_wait_and_chain(
    conn: asyncpg.Connection, migrated_db: str
) -> None:
    """Audit retention locks every lane's head; entries that arrive meanwhile wait for a
    lane and chain after it (sql/122: 030 drew the fallback lane per row, and about one
    such entry in three got no lane: a NOT NULL failure, an API 409)."""
    await _append(conn, "a", 1)  # the tenant's lanes exist
    holder = await asyncpg.connect(migrated_db)
    writers = [await asyncpg.connect(migrated_db) for _ in range(12)]
    try:
        hold = holder.transaction()
        await hold.start()
        # What pluginmon_audit_expire does first.
        await holder.execute("SELECT 1 FROM audit_chain ORDER BY tenant_id, lane FOR UPDATE")

        pending = [
            asyncio.create_task(_writer_entry(w, f"w{i}", f"held-{i}"))
            for i, w in enumerate(writers)
        ]

        async def settled() -> bool:
            # Writers waiting on a lock, plus writers that are done (failed: nothing can
            # finish while every lane is held).
            # (Not the holder: inside its transaction pg_stat_activity is one snapshot.)
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO audit_log%'"
            )
            return int(waiting) + sum(task.done() for task in pending) == len(writers)

        await wait_until(
            settled, timeout_seconds=20, what="every writer waiting on a lane's lock, or done"
        )
        failed = [repr(task.exception()) for task in pending if task.done()]
        assert failed == []
        await hold.commit()
        await asyncio.wait_for(asyncio.gather(*pending), 30)
    finally:
        for connection in (holder, *writers):
            await connection.close()
    lanes = await conn.fetch(
        "SELECT lane FROM audit_log WHERE request_id LIKE 'held-%' ORDER BY lane"
    )
    assert len(lanes) == len(writers)
    assert all(row["lane"] is not None and 0 <= row["lane"] < 16 for row in lanes)
    (verdict,) = await audit.verify(conn, tenant_id="a")
    assert verdict.intact, verdict.problem
    assert sum(lane.checked for lane in verdict.lanes) == 1 + len(writers)


async def test_a_write_and_its_entry_go_in_one_statement(conn: asyncpg.Connection) -> None:
    """append(write=...): the write is made, the entry chained after it, and the chain
    verifies; a write the database refuses leaves no entry either."""
    await conn.execute("INSERT INTO tenants (id, name) VALUES ('a', 'a')")
    plugin_id = await conn.fetchval(
        "INSERT INTO plugins (tenant_id, name) VALUES ('a', 'resizer') RETURNING id"
    )
    entries_before = await conn.fetchval("SELECT count(*) FROM audit_log WHERE tenant_id = 'a'")
    seq = await audit.append(
        conn,
        write=audit.Write("UPDATE plugins SET version = $2 WHERE id = $1", (plugin_id, "2.0.0")),
        tenant_id="a",
        actor=ANN,
        action="plugin.update",
        entity_type="plugin",
        entity_id="resizer",
        plugin_id=plugin_id,
        occurred_at=NOW,
        after={"version": "2.0.0"},
    )
    assert await conn.fetchval("SELECT version FROM plugins WHERE id = $1", plugin_id) == "2.0.0"
    entry = await conn.fetchrow(
        "SELECT seq, after_state::text AS after FROM audit_log WHERE tenant_id = 'a' "
        "AND action = 'plugin.update'"
    )
    assert entry is not None
    assert (entry["seq"], entry["after"]) == (seq, '{"version": "2.0.0"}')
    with pytest.raises(asyncpg.NotNullViolationError):
        await audit.append(
            conn,
            write=audit.Write("UPDATE plugins SET name = NULL WHERE id = $1", (plugin_id,)),
            tenant_id="a",
            actor=ANN,
            action="plugin.update",
            entity_type="plugin",
            occurred_at=NOW,
        )
    count = await conn.fetchval("SELECT count(*) FROM audit_log WHERE tenant_id = 'a'")
    assert count == entries_before + 1
    assert await conn.fetchval("SELECT name FROM plugins WHERE id = $1", plugin_id) == "resizer"
    verdict = await _verdict(conn, "a")
    assert verdict.intact, verdict.problem
