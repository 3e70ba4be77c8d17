"""The keyring's storage: the key file (created 0600 on first start for the embedded default,
rotated and retired in place, atomically and under a lock), named by ``secret_keys_file`` or by
``PLUGINMON_SECRET_KEYS``, which may instead hold the keyring whole; and the holder the daemon
encrypts with, which picks up a rotation made by the CLI without a restart. Key material is
never logged: log lines name the file and key ids only."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from pluginmon.registry.crypto import (
    Keyring,
    KeyringError,
    dump_keyring,
    generate_key,
    parse_keyring,
    retired,
    rotated,
)

logger = logging.getLogger(__name__)

DEFAULT_KEY_FILE_NAME: Final = "secret-keys.json"
ENV_SOURCE: Final = "PLUGINMON_SECRET_KEYS"

_INLINE_KEY: Final = r"\s*[A-Za-z0-9][A-Za-z0-9._-]{0,63}:[A-Za-z0-9+/=_-]+\s*"
INLINE_KEYS_RE: Final = re.compile(rf"^{_INLINE_KEY}(?:,{_INLINE_KEY})*$")


@dataclass(frozen=True, slots=True)
class KeyringLocation:
    """Where the keyring comes from: ``inline`` (the variable's text) wins over ``path``.
    ``create`` makes a new key file at ``path`` when there is none (the embedded default)."""

    path: Path | None
    inline: str | None = None
    create: bool = False

    def __repr__(self) -> str:  # the inline text is key material
        return f"KeyringLocation(path={self.path!r}, inline={'***' if self.inline else None})"

    @property
    def describe(self) -> str:
        return ENV_SOURCE if self.inline else f"file {self.path}"


def environment_location(value: str, *, cwd: Path) -> KeyringLocation:
    """What ``PLUGINMON_SECRET_KEYS`` holds (DESIGN.md names it as ``secret_keys_file``'s
    variable); the first rule that matches wins:

    1. ``{...}``: the keyring's JSON, inline;
    2. ``<id>:<base64>[,<id>:<base64>...]``: inline keys, the first the primary;
    3. the path of an existing file (absolute, or relative to ``cwd``): the key file.

    A key id starts with a letter or digit, so no path that starts with ``/`` is taken for
    inline keys. The file must exist: a bare base64 key may start with ``/`` too, and taking it
    for a path would put it in a "no such file" message. Anything else is an error naming the
    variable, never its value."""
    text = value.strip()
    if text.startswith("{") or INLINE_KEYS_RE.match(text):
        return KeyringLocation(path=None, inline=value)
    if text and "\x00" not in text:
        path = Path(text) if Path(text).is_absolute() else cwd / text
        if path.is_file():
            return KeyringLocation(path=path)
    raise KeyringError(
        f"{ENV_SOURCE} names no existing file and is not inline keys (<id>:<base64>"
        "[,<id>:<base64>...] or the key file's JSON); its value is not repeated here"
    )


def _source(path: Path) -> str:
    return f"file {path}"


def read_key_file(path: Path) -> Keyring:
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyringError(f"{_source(path)}: no such file") from None
    except PermissionError:
        raise KeyringError(f"{_source(path)}: permission denied") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"{_source(path)}: cannot read it ({type(exc).__name__})") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "the secret keyring %s is readable by group or others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(info.st_mode),
        )
    return parse_keyring(text, source=_source(path))


def write_key_file(path: Path, keyring: Keyring, *, exclusive: bool = False) -> None:
    """Atomically (temporary file, fsync, rename, fsync of the directory), mode 0600 from the
    first byte. ``exclusive``: fail if the file exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dump_keyring(keyring).encode()
    if exclusive:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
    else:
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialises rotations of one key file (two `pluginmon secrets rotate` at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_keyring(location: KeyringLocation, *, now: datetime) -> tuple[Keyring, bool]:
    """The keyring, and whether this call created its file (blocking: call it off the loop)."""
    if location.inline:
        return parse_keyring(location.inline, source=ENV_SOURCE), False
    if location.path is None:
        raise KeyringError("no keyring: set secret_keys_file or PLUGINMON_SECRET_KEYS")
    if location.create and not location.path.exists():
        with _locked(location.path):
            if not location.path.exists():
                key = generate_key(key_id="k1", now=now)
                keyring = Keyring(primary_id=key.key_id, keys=(key,), source=_source(location.path))
                write_key_file(location.path, keyring, exclusive=True)
                logger.warning(
                    "created a new secret keyring %s (mode 0600, primary key %s): back it up "
                    "with the database; without it the config secrets cannot be decrypted",
                    location.path,
                    key.key_id,
                )
                return keyring, True
    return read_key_file(location.path), False


def _writable(location: KeyringLocation) -> Path:
    if location.inline or location.path is None:
        raise KeyringError(
            f"the keyring comes from {ENV_SOURCE}, which pluginmon cannot change: add the new "
            "key to the front of the variable yourself (k2:<base64>,k1:<base64>) and restart"
        )
    return location.path


def rotate_key_file(
    location: KeyringLocation, *, now: datetime, key_id: str | None = None
) -> Keyring:
    """Add a new primary key to the key file (creating the file, 0600, with its first key
    when there is none); returns the new keyring."""
    path = _writable(location)
    with _locked(path):
        if not path.exists():
            key = generate_key(key_id=key_id or "k1", now=now)
            keyring = Keyring(primary_id=key.key_id, keys=(key,), source=_source(path))
            write_key_file(path, keyring, exclusive=True)
            logger.warning("created a new secret keyring %s (mode 0600)", path)
            return keyring
        keyring = rotated(read_key_file(path), now=now, key_id=key_id)
        write_key_file(path, keyring)
    logger.info("secret keyring %s: new primary key %s", path, keyring.primary_id)
    return keyring


def retire_in_key_file(location: KeyringLocation, key_id: str) -> Keyring:
    path = _writable(location)
    with _locked(path):
        keyring = retired(read_key_file(path), key_id)
        write_key_file(path, keyring)
    logger.info("secret keyring %s: key %s retired", path, key_id)
    return keyring


class KeyringHolder:
    """The daemon's keyring: loaded off the event loop on first use, and re-read when its
    file changes (a `pluginmon secrets rotate` on this host), checked at most every
    ``recheck_seconds`` so a burst of requests costs one stat."""

    def __init__(
        self,
        location: KeyringLocation,
        *,
        clock: Callable[[], datetime],
        recheck_seconds: float = 2.0,
    ) -> None:
        self._location = location
        self._clock = clock
        self._recheck_seconds = recheck_seconds
        self._keyring: Keyring | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def location(self) -> KeyringLocation:
        return self._location

    def _file_stamp(self) -> tuple[int, int] | None:
        if self._location.inline or self._location.path is None:
            return None
        try:
            info = self._location.path.stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_ino

    def _load(self) -> tuple[Keyring, tuple[int, int] | None]:
        keyring, _ = load_keyring(self._location, now=self._clock())
        return keyring, self._file_stamp()

    async def get(self) -> Keyring:
        async with self._lock:
            due = time.monotonic() - self._checked_at >= self._recheck_seconds
            if self._keyring is not None and not due:
                return self._keyring
            self._checked_at = time.monotonic()
            if self._keyring is not None:
                stamp = await asyncio.to_thread(self._file_stamp)
                if stamp == self._stamp:
                    return self._keyring
            previous = self._keyring
            loaded, self._stamp = await asyncio.to_thread(self._load)
            self._keyring = loaded
            if previous is not None and previous.primary_id != loaded.primary_id:
                logger.info(
                    "secret keyring reloaded: primary key %s (was %s)",
                    loaded.primary_id,
                    previous.primary_id,
                )
            return loaded
