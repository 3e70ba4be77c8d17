"""A database_url no retry can fix (a port out of range or not a number, an sslmode or
target_session_attrs libpq does not know) is refused by check-config and run alike, exit 2
naming database_url, never printing the password; multi-host URLs and raw special characters
in passwords still pass; the daemon's probe classifies an out-of-range port, never raises."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from pluginmon.storage.dsn_check import database_url_problems
from pluginmon.storage.reachability import DatabaseWatch
from tests.daemon_helpers import run_cli

PASSWORD = "Sekr3t-pw-canary"

BAD: dict[str, tuple[str, str]] = {
    "port over 65535": (
        f"postgresql://u:{PASSWORD}@127.0.0.1:99999/db",
        "database_url: the host: port '99999' is not a number from 1 to 65535",
    ),
    "port not a number": (
        f"postgresql://u:{PASSWORD}@127.0.0.1:notaport/db",
        "port 'notaport' is not a number from 1 to 65535",
    ),
    "port 0 of a second host": (
        f"postgresql://u:{PASSWORD}@db1:5432,db2:0/db",
        "database_url: host 2: port '0' is not a number from 1 to 65535",
    ),
    "sslmode": (
        f"postgresql://u:{PASSWORD}@127.0.0.1/db?sslmode=bogus",
        "query parameter 'sslmode' is 'bogus'; it must be one of disable, allow, prefer, "
        "require, verify-ca, verify-full",
    ),
    "target_session_attrs": (
        f"postgresql://u:{PASSWORD}@db1,db2/db?target_session_attrs=writable",
        "query parameter 'target_session_attrs' is 'writable'; it must be one of any, read-write",
    ),
    "port parameter": (
        f"postgresql://u:{PASSWORD}@127.0.0.1/db?port=70000",
        "query parameter 'port': port '70000' is not a number from 1 to 65535",
    ),
}


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", list(BAD))
def test_refused_with_exit_2_naming_database_url(tmp_path: Path, case: str, command: str) -> None:
    url, expected = BAD[case]
    env = {"PLUGINMON_DATABASE_URL": url, "PLUGINMON_DATA_DIR": str(tmp_path / "state")}
    result = run_cli(command, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "invalid configuration" in result.stderr
    assert expected in result.stderr
    assert PASSWORD not in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{PASSWORD}@db1:5432,db2:5433,[::1]:5434/db?target_session_attrs=read-write",
        "postgresql://u:p/w@x:99999@127.0.0.1:5432/db",  # raw '/', '@' and ':' in the password
        "postgresql://u:a#b?c%d e@127.0.0.1:5432/db?sslmode=verify-full",
        "postgresql://u@127.0.0.1:1/x?connect_timeout=1&application_name=x",  # left to the server
        "postgresql://u@/db?host=/run/postgresql",
    ],
)
def test_good_urls_still_pass(tmp_path: Path, url: str) -> None:
    assert database_url_problems(url) == []
    env = {"PLUGINMON_DATABASE_URL": url, "PLUGINMON_DATA_DIR": str(tmp_path / "state")}
    result = run_cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_a_password_that_looks_like_the_bad_port_is_hidden() -> None:
    assert database_url_problems("postgresql://u:99999999@h:99999999/db") == [
        "the host: port '***' is not a number from 1 to 65535"
    ]


class _Writer:
    database_available = False


async def test_the_probe_classifies_an_out_of_range_port() -> None:
    """Before the fix the probe job raised OverflowError (socket.connect: port must be 0-65535)."""
    pool = await asyncpg.create_pool(
        f"postgresql://u:{PASSWORD}@127.0.0.1:99999/db", min_size=0, max_size=1
    )
    try:
        watch = DatabaseWatch(pool, writer=_Writer())
        assert await watch.probe() is False
        failure = watch.failure
        assert failure is not None
        assert failure.reason == "error"
        assert PASSWORD not in failure.message
    finally:
        await pool.close()
