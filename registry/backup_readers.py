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

Every reader has an allow-list (local/nfs roots, sftp hosts and path prefixes, s3 buckets and
key prefixes), and a ``{tenant}`` placeholder in an entry makes it per tenant. The check is
lexical (:meth:`Readers.refusal`): the registration endpoint refuses a location outside it,
and a stored row outside it is ``outside_roots`` before any connection or file access, so a
writer token can neither probe hosts and ports nor read another tenant's artifact. An empty
allow-list allows nothing (``not_configured``).

Over 500 lines on purpose: the four readers share the outcome vocabulary, the allow-list
rules and the "what does this failure mean" decisions above, and are read together.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
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


TENANT_PLACEHOLDER = "{tenant}"
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # registry.tokens.TENANT_SLUG_RE


def for_tenant(entry: str, tenant: str | None) -> str | None:
    """``entry`` with ``{tenant}`` replaced; None when it names a tenant and there is none
    (or not a plain slug, which could otherwise climb out with "/" or "..")."""
    if TENANT_PLACEHOLDER not in entry:
        return entry
    if tenant is None or not _TENANT_RE.fullmatch(tenant):
        return None
    return entry.replace(TENANT_PLACEHOLDER, tenant)


def _outside(provider: str, what: str) -> Outcome:
    return Outcome(ReadResult.OUTSIDE_ROOTS, f"location is outside the allowed {provider} {what}")


class ArtifactReader(Protocol):
    """One provider: read ``location`` back and judge it against ``expected``.

    ``refusal`` is the allow-list check alone (lexical: no file or network access); ``verify``
    applies it first. ``tenant`` fills a ``{tenant}`` placeholder in the allow-list."""

    def refusal(self, location: str, *, tenant: str | None) -> Outcome | None: ...

    async def verify(
        self, location: str, expected: Expected, *, tenant: str | None = None
    ) -> Outcome: ...


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

    def _roots(self, tenant: str | None) -> list[Path]:
        found = (for_tenant(str(r), tenant) for r in self.roots)
        return [Path(r) for r in found if r is not None]

    def refusal(self, location: str, *, tenant: str | None) -> Outcome | None:
        return self._check(location, tenant)[0]

    def _check(self, location: str, tenant: str | None) -> tuple[Outcome | None, Path, Path]:
        path = Path(location.removeprefix("file://"))
        if not self.roots:
            return (
                Outcome(
                    ReadResult.NOT_CONFIGURED,
                    f"no allowed roots are configured for provider {self.provider} "
                    f"([backups.providers.{self.provider}] roots)",
                ),
                path,
                path,
            )
        if not path.is_absolute() or ".." in path.parts:
            # ".." would be judged against the roots before resolving, and "not found" versus
            # "outside the roots" would then tell whether a file exists anywhere.
            return (
                Outcome(ReadResult.BAD_LOCATION, "location must be an absolute path without '..'"),
                path,
                path,
            )
        root = next((r for r in self._roots(tenant) if path.is_relative_to(r)), None)
        if root is None:
            return _outside(self.provider, "roots"), path, path
        return None, path, root

    async def verify(
        self, location: str, expected: Expected, *, tenant: str | None = None
    ) -> Outcome:
        return await asyncio.to_thread(self._verify, location, expected, tenant)

    def _verify(self, location: str, expected: Expected, tenant: str | None) -> Outcome:
        refused, path, root = self._check(location, tenant)
        if refused is not None:
            return refused
        if not root.is_dir():
            # The mount (or directory) itself is away: nothing is known about the artifact.
            return Outcome(
                ReadResult.UNREACHABLE,
                f"{self.provider} root {root} is not available (not mounted?)",
                transient=True,
            )
        try:
            resolved = path.resolve(strict=True)
            if not any(resolved.is_relative_to(r.resolve()) for r in self._roots(tenant)):
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
    ``known_hosts_file`` (never skipped), key authentication with ``private_key_file``.

    Only ``allowed_hosts`` (``host`` meaning port 22, or ``host:port``) are connected to, only
    paths under ``path_prefixes`` read, and a user in the location must be ``username``: the
    daemon's key must not be pointed at another host, port, account or tenant's directory."""

    username: str | None
    private_key_file: Path | None
    known_hosts_file: Path | None
    connect_timeout_seconds: float = 10.0
    chunk_bytes: int = CHUNK_BYTES
    allowed_hosts: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()

    def refusal(self, location: str, *, tenant: str | None) -> Outcome | None:
        parts = urlsplit(location)
        if parts.scheme != "sftp" or not parts.hostname or not parts.path:
            return Outcome(
                ReadResult.BAD_LOCATION, "location must be sftp://[user@]host[:port]/path"
            )
        if parts.password is not None:
            # The location is stored and shown back (API, audit): it must name no secret.
            return Outcome(
                ReadResult.BAD_LOCATION,
                "location must not hold a password (sftp authenticates with private_key_file)",
            )
        try:
            port = parts.port or 22
        except ValueError:
            return Outcome(ReadResult.BAD_LOCATION, "location has an invalid port")
        path = PurePosixPath(unquote(parts.path))
        if ".." in path.parts or parts.query or parts.fragment:
            return Outcome(
                ReadResult.BAD_LOCATION, "location must be a path without '..', '?' or '#'"
            )
        if not self.allowed_hosts or not self.path_prefixes:
            return Outcome(
                ReadResult.NOT_CONFIGURED,
                "no sftp hosts or path prefixes are allowed "
                "([backups.providers.sftp] allowed_hosts, path_prefixes)",
            )
        if (parts.hostname.lower(), port) not in {_host_port(h) for h in self.allowed_hosts}:
            return _outside("sftp", "hosts")
        if parts.username and unquote(parts.username) != self.username:
            return _outside("sftp", "user (only the configured username)")
        prefixes = (for_tenant(p, tenant) for p in self.path_prefixes)
        if not any(p is not None and path.is_relative_to(p) for p in prefixes):
            return _outside("sftp", "path prefixes")
        return None

    async def verify(
        self, location: str, expected: Expected, *, tenant: str | None = None
    ) -> Outcome:
        refused = self.refusal(location, tenant=tenant)
        if refused is not None:
            return refused
        import asyncssh  # the dependency is only needed where sftp backups are verified

        parts = urlsplit(location)
        if self.known_hosts_file is None:
            return Outcome(
                ReadResult.NOT_CONFIGURED,
                "[backups.providers.sftp] known_hosts_file is not set (host keys are always checked)",
            )
        host = parts.hostname
        assert host is not None  # refusal() checked
        port = parts.port or 22
        username = self.username
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


def _host_port(entry: str) -> tuple[str, int]:
    """An ``allowed_hosts`` entry: ``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    parts = urlsplit("//" + entry.strip())
    return (parts.hostname or "").lower(), parts.port or 22


# --- S3 -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Reader:
    """``s3://bucket/key`` on an S3-compatible endpoint through boto3 (an optional
    dependency: ``pip install boto3``), streamed and hashed in a worker thread.

    Only objects under ``buckets`` are read: each entry is ``bucket`` (all of it) or
    ``bucket/prefix`` (keys below that prefix, at a "/" boundary; ``{tenant}`` allowed)."""

    endpoint_url: str | None
    region: str | None
    access_key_id: str | None
    secret_access_key: Callable[[], str | None] = field(default=lambda: None)
    chunk_bytes: int = CHUNK_BYTES
    buckets: tuple[str, ...] = ()

    def refusal(self, location: str, *, tenant: str | None) -> Outcome | None:
        parts = urlsplit(location)
        if parts.scheme != "s3" or not parts.netloc or len(parts.path) < 2:
            return Outcome(ReadResult.BAD_LOCATION, "location must be s3://bucket/key")
        key = unquote(parts.path[1:])
        if {".", ".."} & set(key.split("/")) or parts.query or parts.fragment:
            return Outcome(
                ReadResult.BAD_LOCATION, "location's key must not hold '.', '..', '?' or '#'"
            )
        if not self.buckets:
            return Outcome(
                ReadResult.NOT_CONFIGURED,
                "no s3 buckets are allowed ([backups.providers.s3] buckets)",
            )
        for entry in self.buckets:
            allowed = for_tenant(entry, tenant)
            if allowed is None:
                continue
            bucket, _, prefix = allowed.partition("/")
            prefix = prefix.strip("/")
            if bucket == parts.netloc and (not prefix or key.startswith(prefix + "/")):
                return None
        return _outside("s3", "buckets and prefixes")

    async def verify(
        self, location: str, expected: Expected, *, tenant: str | None = None
    ) -> Outcome:
        refused = self.refusal(location, tenant=tenant)
        if refused is not None:
            return refused
        parts = urlsplit(location)
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

    def refusal(self, location: str, *, tenant: str | None) -> Outcome | None:
        return None  # never read, so nothing to protect

    async def verify(
        self, location: str, expected: Expected, *, tenant: str | None = None
    ) -> Outcome:
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

    def refusal(self, provider: str, location: str, *, tenant: str | None) -> Outcome | None:
        """Why ``location`` is outside ``provider``'s allow-list for ``tenant``, or None."""
        return self.reader(provider).refusal(location, tenant=tenant)

    async def verify(
        self, provider: str, location: str, expected: Expected, *, tenant: str | None
    ) -> Outcome:
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await self.reader(provider).verify(location, expected, tenant=tenant)
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
