"""A session the server ends under an idle connection fails the next statement with an error
the retry loops take as transient (storage.errors), whichever way asyncpg reports it."""

from __future__ import annotations

import asyncpg

from pluginmon.storage.errors import is_transient

ATTEMPTS = 20


async def test_a_statement_on_a_session_the_server_ended_fails_transiently(
    pg_admin_url: str,
) -> None:
    # asyncpg reports it three ways, depending on what it has read of the server's FATAL and
    # the close when the statement arrives: InterfaceError, ConnectionDoesNotExistError, or
    # InternalClientError ("cannot switch to state 11; another operation (2) is in
    # progress", 8 of 20 on a local server). Twenty tries meet the last one almost surely.
    errors: list[BaseException] = []
    admin = await asyncpg.connect(pg_admin_url)
    try:
        for _ in range(ATTEMPTS):
            conn = await asyncpg.connect(pg_admin_url)
            try:
                assert await conn.fetchval("SELECT 1") == 1
                assert await admin.fetchval(
                    "SELECT pg_terminate_backend($1::int)", conn.get_server_pid()
                )
                try:
                    await conn.fetchval("SELECT $1::int", 1)
                except Exception as exc:  # every kind is checked below
                    errors.append(exc)
            finally:
                conn.terminate()
    finally:
        await admin.close()
    assert len(errors) == ATTEMPTS  # no statement ran on an ended session
    refused = [f"{type(e).__name__}: {e}" for e in errors if not is_transient(e)]
    assert refused == []
