"""The embedded server's Unix socket: what a daemon on the embedded default connects through,
beside the TCP port that tools use; a data_dir whose socket path would not fit runs on TCP."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pluginmon.storage.embedded import EmbeddedPostgres


def client_port_via(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def asyncpg_client_port(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


def test_the_local_url_goes_through_the_socket_and_tcp_stays(server_tmp_dir: Path) -> None:
    server = EmbeddedPostgres(server_tmp_dir / "pg")
    tcp = server.start()
    try:
        local = server.local_url()
        assert local != tcp
        assert f"host={server.socket_directory}" in local
        assert (server.socket_directory / f".s.PGSQL.{server.port}").is_socket()
        # A Unix-socket session has client_port -1, a TCP one its port.
        assert client_port_via(local) == -1
        assert asyncio.run(asyncpg_client_port(local)) == -1
        assert client_port_via(tcp) > 0
        assert client_port_via(server.local_url("postgres")) == -1
        # Stopped, the socket is gone and the local URL falls back to TCP's.
        server.stop()
        assert server.local_url() == server.url()
        # A restart of the same cluster gets its socket again.
        server.start()
        assert client_port_via(server.local_url()) == -1
    finally:
        server.stop(mode="immediate")


@pytest.mark.parametrize(
    "under",
    [
        pytest.param(Path("d" * 60) / ("e" * 40), id="too-long-for-a-socket"),
        # pg_ctl hands its -o options to a shell: only plain paths get a socket.
        pytest.param(Path("a b"), id="with-a-space"),
    ],
)
def test_a_data_dir_unfit_for_a_socket_runs_on_tcp(
    under: Path, server_tmp_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedPostgres(server_tmp_dir / under)
    path = str(server.socket_directory)
    assert len(path) + len("/.s.PGSQL.65535") > 107 or " " in path
    with caplog.at_level(logging.WARNING, logger="pluginmon.storage.embedded"):
        tcp = server.start()
    try:
        assert server.local_url() == tcp
        assert client_port_via(server.local_url()) > 0
        assert "no Unix socket, the path" in caplog.text
        assert not server.socket_directory.exists()
    finally:
        server.stop(mode="immediate")


def test_a_socket_the_server_cannot_make_leaves_it_on_tcp(
    server_tmp_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Where no socket can be made (here its lock file's name is taken by a directory, as a
    file system without sockets or a security policy would refuse it), the server starts on
    TCP alone and says why, instead of not starting."""
    server = EmbeddedPostgres(server_tmp_dir / "pg")
    server.start()
    server.stop()
    (server.socket_directory / f".s.PGSQL.{server.port}.lock").mkdir()
    with caplog.at_level(logging.WARNING, logger="pluginmon.storage.embedded"):
        tcp = server.start()
    try:
        assert server.local_url() == tcp
        assert client_port_via(tcp) > 0
        assert "did not start with a Unix socket" in caplog.text
        assert "lock file" in caplog.text  # the server's own reason, from its log
    finally:
        server.stop(mode="immediate")
