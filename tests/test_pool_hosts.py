"""Multi-host database URLs on the data plane: hosts tried in order, each within its own connect timeout.

Real servers on loopback: a TCP listener that accepts and never answers (a SIGSTOPped or
wedged primary), a closed port, the test database, and the test database made read-only.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
import pytest
from psycopg import sql

from pluginmon.storage.errors import is_transient
from pluginmon.storage.pool import close_pool, open_pool, split_hosts
from pluginmon.storage.reachability import failure_reason
from tests.net_helpers import free_port


def test_split_hosts_gives_one_url_per_host_in_order() -> None:
    url = "postgresql://pm:s3cret@db1:5432,db2:5433,[::1]:5434/pluginmon?target_session_attrs=read-write"
    assert split_hosts(url) == (
        "postgresql://pm:s3cret@db1:5432/pluginmon?target_session_attrs=read-write",
        "postgresql://pm:s3cret@db2:5433/pluginmon?target_session_attrs=read-write",
        "postgresql://pm:s3cret@[::1]:5434/pluginmon?target_session_attrs=read-write",
    )
    assert split_hosts("postgresql://db1,db2/x") == ("postgresql://db1/x", "postgresql://db2/x")
    # Left to the driver: one host, keyword DSNs, hosts in the query.
    for single in (
        "postgresql://pm@db1:5432/pluginmon",
        "host=db1,db2 dbname=pluginmon",
        "postgresql:///pluginmon?host=db1,db2",
    ):
        assert split_hosts(single) == (single,)


def two_hosts(url: str, first_port: int) -> str:
    """``url`` (one host) with a first host on ``first_port`` in front of its own."""
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    query = "target_session_attrs=read-write"
    return urlunsplit(
        parts._replace(netloc=f"{userinfo}@127.0.0.1:{first_port},{hostport}", query=query)
    )


class SilentListener:
    """Accepts TCP connections and never says a word (the startup packet is not answered)."""

    def __init__(self) -> None:
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> SilentListener:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        while await reader.read(65536):
            pass

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_a_hung_first_host_is_given_up_after_its_own_timeout(migrated_db: str) -> None:
    async with SilentListener() as silent:
        pool = await open_pool(
            two_hosts(migrated_db, silent.port), min_size=0, connect_timeout_seconds=2
        )
        try:
            started = time.monotonic()
            # asyncpg alone spends its one 60 s timeout on the silent host and never
            # reaches the second.
            async with asyncio.timeout(15):
                answer = await pool.fetchval("SELECT 1")
            elapsed = time.monotonic() - started
        finally:
            await close_pool(pool)
    assert answer == 1
    assert silent.accepted >= 1  # it was tried first...
    assert 1.5 < elapsed < 15  # ...for about its own timeout


@pytest.fixture
def read_only_db(migrated_db: str) -> str:
    """``migrated_db`` where every new session is read-only (as on a standby)."""
    name = urlsplit(migrated_db).path.lstrip("/")
    with psycopg.connect(migrated_db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                sql.Identifier(name)
            )
        )
    return migrated_db


async def test_only_read_only_hosts_answering_is_the_read_only_condition(
    read_only_db: str,
) -> None:
    closed = free_port()
    pool = await open_pool(two_hosts(read_only_db, closed), min_size=0, connect_timeout_seconds=2)
    try:
        with pytest.raises(asyncpg.exceptions.TargetServerAttributeNotMatched) as info:
            await pool.fetchval("SELECT 1")
    finally:
        await close_pool(pool)
    # Not the closed port's "connection refused": the host that answered is read-only.
    assert failure_reason(info.value) == "read_only"
    assert is_transient(info.value)
    # libpq (the admin plane) sees the same.
    with pytest.raises(psycopg.OperationalError) as libpq:
        psycopg.connect(two_hosts(read_only_db, closed), connect_timeout=2).close()
    assert failure_reason(libpq.value) == "read_only"


async def test_a_refused_login_does_not_move_on_to_the_next_host(migrated_db: str) -> None:
    """As in libpq: a wrong password ends the attempt; it is not a reason to try elsewhere."""
    parts = urlsplit(migrated_db)
    user = parts.username or "pluginmon"
    wrong = urlunsplit(
        parts._replace(netloc=f"{user}:wrong-password@{parts.hostname}:{parts.port}")
    )
    try:
        psycopg.connect(wrong, connect_timeout=10).close()
    except psycopg.OperationalError:
        pass
    else:  # the local Citus cluster of tests/citus_cluster.py trusts loopback
        pytest.skip("the test server accepts any password (trust auth): nothing to refuse")
    async with SilentListener() as second:
        url = urlunsplit(
            urlsplit(wrong)._replace(
                netloc=urlsplit(wrong).netloc + f",127.0.0.1:{second.port}",
                query="target_session_attrs=read-write",
            )
        )
        pool = await open_pool(url, min_size=0, connect_timeout_seconds=2)
        try:
            with pytest.raises(asyncpg.InvalidPasswordError):
                await pool.fetchval("SELECT 1")
        finally:
            await close_pool(pool)
        assert second.accepted == 0
