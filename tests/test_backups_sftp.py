"""SFTP backups verified against a real OpenSSH server, started by the test as a normal process
on a loopback port: a good artifact, a corrupted byte, a missing file, an unreachable host, an
unknown host key and a refused key, each a named result (transient or permanent)."""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pluginmon.registry.backup_readers import (
    Expected,
    Readers,
    ReadResult,
    SftpReader,
    VerifyStatus,
)
from pluginmon.registry.tokens import Role
from tests.api_helpers import api_server
from tests.net_helpers import free_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


@dataclass(frozen=True)
class Sshd:
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    data: Path


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
    )


def _prepare(tmp_path: Path) -> tuple[Path, Path, int]:
    """Keys, authorized_keys and sshd_config under tmp_path: (base dir, config, port)."""
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH server not installed (Debian package openssh-server)")
    base = tmp_path / "sshd"
    base.mkdir()
    os.chmod(base, 0o700)
    _keygen(base / "host_key")
    _keygen(base / "client_key")
    (base / "authorized_keys").write_text((base / "client_key.pub").read_text())
    os.chmod(base / "authorized_keys", 0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    port = free_port()
    config = base / "sshd_config"
    config.write_text(
        f"""ListenAddress 127.0.0.1
Port {port}
HostKey {base / "host_key"}
PidFile {base / "sshd.pid"}
AuthorizedKeysFile {base / "authorized_keys"}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
"""
    )
    return base, config, port


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[Sshd]:
    base, config, port = await asyncio.to_thread(_prepare, tmp_path)
    process = await asyncio.create_subprocess_exec(
        SSHD, "-D", "-e", "-f", str(config),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if process.returncode is not None:
                    break
                await asyncio.sleep(0.1)
                continue
            writer.close()
            break
        if process.returncode is not None:
            assert process.stderr is not None
            err = (await process.stderr.read()).decode(errors="replace").strip()
            pytest.skip(f"sshd cannot run here: {err[-300:]}")
        host_key = (base / "host_key.pub").read_text().split()
        known = base / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        data = tmp_path / "remote"
        data.mkdir()
        yield Sshd(port, getpass.getuser(), base / "client_key", known, data)
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


def _reader(sshd: Sshd, **changes: object) -> SftpReader:
    values: dict[str, object] = {
        "username": sshd.user,
        "private_key_file": sshd.client_key,
        "known_hosts_file": sshd.known_hosts,
        "connect_timeout_seconds": 10.0,
        "allowed_hosts": (f"127.0.0.1:{sshd.port}",),
        "path_prefixes": (str(sshd.data),),
    }
    values.update(changes)
    return SftpReader(**values)  # type: ignore[arg-type]


async def test_sftp_verifies_and_catches_a_corrupted_byte(sshd: Sshd) -> None:
    data = os.urandom(5 * (1 << 20) + 17)
    path = sshd.data / "resizer.tar"
    path.write_bytes(data)
    expected = Expected(size_bytes=len(data), sha256_hex=hashlib.sha256(data).hexdigest())
    url = f"sftp://127.0.0.1:{sshd.port}{path}"

    good = await _reader(sshd).verify(url, expected)
    assert (good.result, good.status) == (ReadResult.VERIFIED, VerifyStatus.VERIFIED), good
    assert good.observed_sha256_hex == expected.sha256_hex

    corrupted = bytearray(data)
    corrupted[3 * (1 << 20) + 5] ^= 0x80
    path.write_bytes(bytes(corrupted))
    bad = await _reader(sshd).verify(url, expected)
    assert (bad.result, bad.status, bad.transient) == (
        ReadResult.CHECKSUM_MISMATCH,
        VerifyStatus.FAILED,
        False,
    )
    assert bad.observed_size_bytes == len(data)

    path.write_bytes(data[:-1])
    short = await _reader(sshd).verify(url, expected)
    assert short.result is ReadResult.SIZE_MISMATCH


async def test_sftp_failures_are_named(sshd: Sshd, tmp_path: Path) -> None:
    expected = Expected(size_bytes=1, sha256_hex="0" * 64)
    missing = await _reader(sshd).verify(
        f"sftp://127.0.0.1:{sshd.port}{sshd.data}/nope.tar", expected
    )
    assert (missing.result, missing.status, missing.transient) == (
        ReadResult.NOT_FOUND,
        VerifyStatus.FAILED,
        False,
    )

    closed = free_port()
    unreachable = await _reader(sshd, allowed_hosts=(f"127.0.0.1:{closed}",)).verify(
        f"sftp://127.0.0.1:{closed}{sshd.data}/x.tar", expected
    )
    assert (unreachable.result, unreachable.status, unreachable.transient) == (
        ReadResult.UNREACHABLE,
        VerifyStatus.UNVERIFIABLE,
        True,
    )
    assert f"127.0.0.1:{closed}" in unreachable.reason

    empty_known = tmp_path / "empty_known_hosts"
    empty_known.write_text("")
    unknown = await _reader(sshd, known_hosts_file=empty_known).verify(
        f"sftp://127.0.0.1:{sshd.port}{sshd.data}/x.tar", expected
    )
    assert (unknown.result, unknown.transient) == (ReadResult.HOST_KEY_UNKNOWN, False)

    stranger = tmp_path / "stranger_key"
    _keygen(stranger)
    refused = await _reader(sshd, private_key_file=stranger).verify(
        f"sftp://127.0.0.1:{sshd.port}{sshd.data}/x.tar", expected
    )
    assert (refused.result, refused.status, refused.transient) == (
        ReadResult.AUTH_FAILED,
        VerifyStatus.UNVERIFIABLE,
        False,
    )

    no_known_hosts = await _reader(sshd, known_hosts_file=None).verify(
        f"sftp://127.0.0.1:{sshd.port}{sshd.data}/x", expected
    )
    assert no_known_hosts.result is ReadResult.NOT_CONFIGURED


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


async def test_sftp_backup_through_the_api(sshd: Sshd, migrated_db: str) -> None:
    data = os.urandom(2 * (1 << 20) + 3)
    path = sshd.data / "mailer.tar"
    await asyncio.to_thread(_write, path, data)
    readers = Readers(by_provider={"sftp": _reader(sshd)}, timeout_seconds=60)
    async with api_server(migrated_db, backup_readers=readers) as api:
        await api.token("ci", tenant="a", role=Role.WRITER)
        assert (
            await api.call("POST", "/api/v1/plugins", token="ci", body={"name": "mailer"})
        ).status == 201
        reply = await api.call(
            "POST",
            "/api/v1/plugins/mailer/backups",
            token="ci",
            body={
                "provider": "sftp",
                "location": f"sftp://127.0.0.1:{sshd.port}{path}",
                "size_bytes": len(data),
                "checksum_sha256": hashlib.sha256(data).hexdigest(),
            },
        )
        assert reply.status == 201, reply.body
        url = f"/api/v1/backups/{reply.body['id']}/verify"
        good = await api.call("POST", url, token="ci")
        assert good.body["verification"]["result"] == "verified", good.body
        corrupted = bytearray(data)
        corrupted[12345] ^= 0xFF
        await asyncio.to_thread(_write, path, bytes(corrupted))
        bad = await api.call("POST", url, token="ci")
        assert (bad.body["verification"]["status"], bad.body["verification"]["result"]) == (
            "failed",
            "checksum_mismatch",
        )
        assert bad.body["backup"]["verified_at"] == good.body["verification"]["started_at"]
