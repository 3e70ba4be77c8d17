"""The pool's reset on release: skipped only for a connection its user vouched for, and an API
request (which vouches) leaves nothing behind for the next user of its connection."""

from __future__ import annotations

import asyncpg

from pluginmon.registry.tokens import Role
from pluginmon.storage.pool import close_pool, mark_session_untouched, open_pool
from tests.api_helpers import api_server


async def _application_name(pool: asyncpg.Pool) -> str:
    async with pool.acquire() as conn:
        name: str = await conn.fetchval("SHOW application_name")
        return name


async def test_release_resets_the_session_unless_vouched_for(migrated_db: str) -> None:
    pool = await open_pool(migrated_db, min_size=1, max_size=1, application_name="pm-test")
    try:
        # Not vouched for: a session-level SET is undone on release.
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'touched'")
        assert await _application_name(pool) == "pm-test"
        # Vouched for (wrongly, on purpose): the reset is skipped, so the SET survives. This
        # is what makes the rule on Call binding, and shows the skip really happens.
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'touched'")
            mark_session_untouched(conn)
        assert await _application_name(pool) == "touched"
        # The vouching lasts for one release only: the next user's SET is undone again.
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'again'")
        assert await _application_name(pool) == "pm-test"
    finally:
        await close_pool(pool)


async def test_vouching_inside_a_transaction_is_ignored(migrated_db: str) -> None:
    pool = await open_pool(migrated_db, min_size=1, max_size=1, application_name="pm-test")
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SET application_name = 'in-tx'")
                mark_session_untouched(conn)  # the transaction is still open: refused
            # Committed: a plain SET in a committed transaction lasts for the session.
            assert await conn.fetchval("SHOW application_name") == "in-tx"
        assert await _application_name(pool) == "pm-test"
    finally:
        await close_pool(pool)


async def test_an_api_request_leaves_its_connection_as_the_daemon_role(migrated_db: str) -> None:
    async with api_server(migrated_db) as api:
        await api.token("writer-a", tenant="a", role=Role.WRITER)
        owner = await api.fetch("SELECT current_user AS name")
        for i in range(3):
            created = await api.call(
                "POST", "/api/v1/plugins", token="writer-a", body={"name": f"p{i}"}
            )
            assert created.status == 201, created.body
            listed = await api.call("GET", "/api/v1/plugins", token="writer-a")
            assert listed.status == 200
        # Every connection of the pool: back to the owner's role, no tenant, no transaction.
        held = [await api.pool.acquire() for _ in range(api.pool.get_max_size())]
        try:
            for conn in held:
                assert conn.is_in_transaction() is False
                row = await conn.fetchrow(
                    "SELECT current_user AS name, current_setting('role') AS role, "
                    "coalesce(current_setting('pluginmon.tenant_id', true), '') AS tenant"
                )
                assert row is not None
                assert (row["name"], row["role"], row["tenant"]) == (owner[0]["name"], "none", "")
        finally:
            for conn in held:
                await api.pool.release(conn)
