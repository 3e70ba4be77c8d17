"""Re-reading a backup artifact where its provider keeps it (local or NFS path, SFTP, S3) and
hashing it, with every way that can go wrong turned into a named :class:`ReadResult`.

Like restic's ``check --read-data`` and pgBackRest's ``verify``, an artifact counts as
verified only when all of it was read back and its size and SHA-256 match the registered
ones; "the file exists" is not verification. Hashing never runs on the event loop: a local
file is read and hashed in a worker thread, and a remote one's chunks are handed to a worker
thread while the next chunk is fetched.

What a failure means is decided here, per provider, once:
  * ``failed``: the artifact is gone or differs (not found, size or checksum mismatch).
  * ``unverifiable``, transient: it could not be read right now (host unreachable, timeout,
    connection lost, an NFS mount that is away); the scheduler retries sooner.
  * ``unverifiable``, permanent: reading it needs a change of configuration (credentials, a
    host key, an allowed root) or the provider is one pluginmon cannot read.
Reasons name the provider, host and condition; never a credential.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# errnos of a network filesystem that is away rather than of a file that is wrong.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.ESTALE,
        errno.EIO,
        errno.ETIMEDOUT,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ECONNREFUSED,
        errno.ENOTCONN,
    }
)


class VerifyStatus(StrEnum):
    VERIFIED = "verified"
    FAILED = "failed"
    UNVERIFIABLE = "unverifiable"


class ReadResult(StrEnum):
    """The named outcome of one verification (the ``result`` label of the metric)."""

    VERIFIED = "verified"
    SIZE_MISMATCH = "size_mismatch"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    NOT_FOUND = "not_found"
    NOT_A_FILE = "not_a_file"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    CONNECTION_LOST = "connection_lost"
    IO_ERROR = "io_error"
    AUTH_FAILED = "auth_failed"
    HOST_KEY_UNKNOWN = "host_key_unknown"
    PERMISSION_DENIED = "permission_denied"
    OUTSIDE_ROOTS = "outside_roots"
    BAD_LOCATION = "bad_location"
    NOT_CONFIGURED = "not_configured"
    UNSUPPORTED_PROVIDER = "unsupported_provider"

    @property
    def status(self) -> VerifyStatus:
        if self is ReadResult.VERIFIED:
            return VerifyStatus.VERIFIED
        if self in _FAILED:
            return VerifyStatus.FAILED
        return VerifyStatus.UNVERIFIABLE


_FAILED = frozenset(
    {
        ReadResult.SIZE_MISMATCH,
        ReadResult.CHECKSUM_MISMATCH,
        ReadResult.NOT_FOUND,
        ReadResult.NOT_A_FILE,
    }
)


@dataclass(frozen=True, slots=True)
class Expected:
    """What the backup job registered."""

    size_bytes: int
    sha256_hex: str


@dataclass(frozen=True, slots=True)
class Outcome:
    result: ReadResult
    reason: str
    transient: bool = False
    observed_size_bytes: int | None = None
    observed_sha256_hex: str | None = None

    @property
    def status(self) -> VerifyStatus:
        return self.result.status


def judge(expected: Expected, *, size_bytes: int, sha256_hex: str | None) -> Outcome:
    """Compare what was read with what was registered (pure)."""
    if size_bytes != expected.size_bytes:
        return Outcome(
            ReadResult.SIZE_MISMATCH,
            f"size is {size_bytes} bytes, registered {expected.size_bytes}",
            observed_size_bytes=size_bytes,
            observed_sha256_hex=sha256_hex,
        )
    if sha256_hex != expected.sha256_hex:
        return Outcome(
            ReadResult.CHECKSUM_MISMATCH,
            "SHA-256 of the content differs from the registered checksum",
            observed_size_bytes=size_bytes,
            observed_sha256_hex=sha256_hex,
        )
    return Outcome(
        ReadResult.VERIFIED,
        f"{size_bytes} bytes read, SHA-256 matches",
        observed_size_bytes=size_bytes,
        observed_sha256_hex=sha256_hex,
    )


def hash_file(path: Path, *, chunk_bytes: int = CHUNK_BYTES) -> tuple[int, str]:
    """(size, SHA-256 hex) of a whole file, read once. Blocking: call it in a worker thread."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    size = 0
    with path.open("rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


class ArtifactReader(Protocol):
    """One provider: read ``location`` back and judge it against ``expected``."""

    async def verify(self, location: str, expected: Expected) -> Outcome: ...


# --- local and NFS paths ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathReader:
    """``local`` and ``nfs``: an absolute path under one of ``roots``.

    The roots are the daemon's allow-list: a writer token must not be able to make the daemon
    read (and so reveal the size and hash of) an arbitrary file. Symlinks are resolved before
    the check. For ``nfs``, a root that is not there (the mount is away) is transient.
    """

    provider: str
    roots: tuple[Path, ...]
    chunk_bytes: int = CHUNK_BYTES

    async def verify(self, location: str, expected: Expected) -> Outcome:
        return await asyncio.to_thread(self._verify, location, expected)

    def _verify(self, location: str, expected: Expected) -> Outcome:
        if not self.roots:
            return Outcome(
                ReadResult.NOT_CONFIGURED,
                f"no allowed roots are configured for provider {self.provider} "
                f"([backups.providers.{self.provider}] roots)",
            )
        raw = location.removeprefix("file://")
        path = Path(raw)
        if not path.is_absolute() or ".." in path.parts:
            # ".." would be judged against the roots before resolving, and "not found" versus
            # "outside the roots" would then tell whether a file exists anywhere.
            return Outcome(
                ReadResult.BAD_LOCATION, "location must be an absolute path without '..'"
            )
        root = next((r for r in self.roots if path.is_relative_to(r)), None)
        if root is None:
            return Outcome(
                ReadResult.OUTSIDE_ROOTS, f"location is outside the {self.provider} roots"
            )
        if not root.is_dir():
            # The mount (or directory) itself is away: nothing is known about the artifact.
            return Outcome(
                ReadResult.UNREACHABLE,
                f"{self.provider} root {root} is not available (not mounted?)",
                transient=True,
            )
        try:
            resolved = path.resolve(strict=True)
            if not any(resolved.is_relative_to(r.resolve()) for r in self.roots):
                return Outcome(
                    ReadResult.OUTSIDE_ROOTS,
                    f"location resolves outside the {self.provider} roots",
                )
            if not resolved.is_file():
                return Outcome(ReadResult.NOT_A_FILE, "location is not a regular file")
            size, sha = hash_file(resolved, chunk_bytes=self.chunk_bytes)
        except FileNotFoundError:
            return Outcome(ReadResult.NOT_FOUND, f"no file at the location ({self.provider})")
        except PermissionError:
            return Outcome(ReadResult.PERMISSION_DENIED, "the daemon may not read the file")
        except OSError as exc:
            transient = exc.errno in _TRANSIENT_ERRNOS
            return Outcome(
                ReadResult.IO_ERROR,
                f"reading failed: {errno.errorcode.get(exc.errno or 0, 'OSError')}",
                transient=transient,
            )
        return judge(expected, size_bytes=size, sha256_hex=sha)


# --- SFTP -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SftpReader:
    """``sftp://[user@]host[:port]/path`` through asyncssh, host keys checked against
    ``known_hosts_file`` (never skipped), key authentication with ``private_key_file``."""

    username: str | None
    private_key_file: Path | None
    known_hosts_file: Path | None
    connect_timeout_seconds: float = 10.0
    chunk_bytes: int = CHUNK_BYTES

    async def verify(self, location: str, expected: Expected) -> Outcome:
        import asyncssh  # the dependency is only needed where sftp backups are verified

        parts = urlsplit(location)
        if parts.scheme != "sftp" or not parts.hostname or not parts.path:
            return Outcome(
                ReadResult.BAD_LOCATION, "location must be sftp://[user@]host[:port]/path"
            )
        if self.known_hosts_file is None:
            return Outcome(
                ReadResult.NOT_CONFIGURED,
                "[backups.providers.sftp] known_hosts_file is not set (host keys are always checked)",
            )
        host = parts.hostname
        try:
            port = parts.port or 22
        except ValueError:
            return Outcome(ReadResult.BAD_LOCATION, "location has an invalid port")
        username = unquote(parts.username) if parts.username else self.username
        where = f"sftp host {host}:{port}"
        try:
            async with asyncio.timeout(self.connect_timeout_seconds):
                connection = await asyncssh.connect(
                    host,
                    port=port,
                    username=username,
                    client_keys=[str(self.private_key_file)] if self.private_key_file else None,
                    known_hosts=str(self.known_hosts_file),
                    password=None,
                    agent_path=None,
                )
        except TimeoutError:
            return Outcome(ReadResult.TIMEOUT, f"{where}: no answer in time", transient=True)
        except asyncssh.HostKeyNotVerifiable:
            return Outcome(ReadResult.HOST_KEY_UNKNOWN, f"{where}: host key not in known_hosts")
        except asyncssh.PermissionDenied:
            return Outcome(ReadResult.AUTH_FAILED, f"{where}: authentication refused")
        except (asyncssh.ConnectionLost, asyncssh.DisconnectError) as exc:
            return Outcome(
                ReadResult.CONNECTION_LOST, f"{where}: {type(exc).__name__}", transient=True
            )
        except (OSError, socket.gaierror) as exc:
            return Outcome(
                ReadResult.UNREACHABLE,
                f"{where}: {errno.errorcode.get(exc.errno or 0, type(exc).__name__)}",
                transient=True,
            )
        try:
            async with connection, connection.start_sftp_client() as sftp:
                outcome = await self._read(sftp, unquote(parts.path), expected, where)
        except asyncssh.SFTPNoSuchFile:
            return Outcome(ReadResult.NOT_FOUND, f"{where}: no such file")
        except asyncssh.SFTPPermissionDenied:
            return Outcome(ReadResult.PERMISSION_DENIED, f"{where}: permission denied")
        except (asyncssh.ConnectionLost, asyncssh.DisconnectError, ConnectionError) as exc:
            return Outcome(
                ReadResult.CONNECTION_LOST, f"{where}: {type(exc).__name__}", transient=True
            )
        except asyncssh.SFTPError as exc:
            return Outcome(ReadResult.IO_ERROR, f"{where}: SFTP error {exc.code}")
        return outcome

    async def _read(self, sftp: object, path: str, expected: Expected, where: str) -> Outcome:
        import asyncssh

        assert isinstance(sftp, asyncssh.SFTPClient)
        attrs = await sftp.stat(path)
        if attrs.type != asyncssh.FILEXFER_TYPE_REGULAR:
            return Outcome(ReadResult.NOT_A_FILE, f"{where}: not a regular file")
        digest = hashlib.sha256()
        size = 0
        async with sftp.open(path, "rb") as handle:
            pending: asyncio.Future[None] | None = None
            while True:
                chunk = await handle.read(self.chunk_bytes)
                if pending is not None:
                    await pending
                if not chunk:
                    break
                assert isinstance(chunk, bytes)
                size += len(chunk)
                # Hash this chunk in a worker thread while the next one is fetched.
                pending = asyncio.ensure_future(asyncio.to_thread(digest.update, chunk))
        return judge(expected, size_bytes=size, sha256_hex=digest.hexdigest())


# --- S3 -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Reader:
    """``s3://bucket/key`` on an S3-compatible endpoint through boto3 (an optional
    dependency: ``pip install boto3``), streamed and hashed in a worker thread."""

    endpoint_url: str | None
    region: str | None
    access_key_id: str | None
    secret_access_key: Callable[[], str | None] = field(default=lambda: None)
    chunk_bytes: int = CHUNK_BYTES

    async def verify(self, location: str, expected: Expected) -> Outcome:
        parts = urlsplit(location)
        if parts.scheme != "s3" or not parts.netloc or len(parts.path) < 2:
            return Outcome(ReadResult.BAD_LOCATION, "location must be s3://bucket/key")
        return await asyncio.to_thread(
            self._verify, parts.netloc, unquote(parts.path[1:]), expected
        )

    def _verify(self, bucket: str, key: str, expected: Expected) -> Outcome:
        try:
            import boto3  # type: ignore[import-not-found, import-untyped, unused-ignore]
            import botocore.exceptions  # type: ignore[import-not-found, import-untyped, unused-ignore]
        except ImportError:
            return Outcome(ReadResult.NOT_CONFIGURED, "provider s3 needs boto3 (pip install boto3)")
        where = f"s3 bucket {bucket}"
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key(),
        )
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            digest = hashlib.sha256()
            size = 0
            for chunk in body.iter_chunks(self.chunk_bytes):
                digest.update(chunk)
                size += len(chunk)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in {"NoSuchKey", "404", "NoSuchBucket"}:
                return Outcome(ReadResult.NOT_FOUND, f"{where}: {code}")
            if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                return Outcome(ReadResult.AUTH_FAILED, f"{where}: {code}")
            transient = code.startswith("5") or code in {"SlowDown", "ServiceUnavailable"}
            return Outcome(ReadResult.IO_ERROR, f"{where}: {code}", transient=transient)
        except (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
        ):
            return Outcome(ReadResult.UNREACHABLE, f"{where}: endpoint unreachable", transient=True)
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            return Outcome(
                ReadResult.CONNECTION_LOST, f"{where}: {type(exc).__name__}", transient=True
            )
        return judge(expected, size_bytes=size, sha256_hex=digest.hexdigest())


# --- the set --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Unsupported:
    provider: str

    async def verify(self, location: str, expected: Expected) -> Outcome:
        return Outcome(
            ReadResult.UNSUPPORTED_PROVIDER,
            f"pluginmon cannot read provider {self.provider}; the backup stays unverified",
        )


@dataclass(frozen=True, slots=True)
class Readers:
    """The reader of each provider; any provider without one is unverifiable, never verified."""

    by_provider: Mapping[str, ArtifactReader] = field(default_factory=dict)
    timeout_seconds: float = 3600.0

    def reader(self, provider: str) -> ArtifactReader:
        return self.by_provider.get(provider) or Unsupported(provider)

    async def verify(self, provider: str, location: str, expected: Expected) -> Outcome:
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await self.reader(provider).verify(location, expected)
        except TimeoutError:
            return Outcome(
                ReadResult.TIMEOUT,
                f"{provider}: reading took longer than {self.timeout_seconds:.0f} s",
                transient=True,
            )


def local_readers(roots: Mapping[str, tuple[Path, ...]]) -> dict[str, ArtifactReader]:
    """PathReaders for ``local`` and ``nfs`` from their allowed roots."""
    return {
        provider: PathReader(provider, tuple(Path(os.path.abspath(r)) for r in paths))
        for provider, paths in roots.items()
    }
