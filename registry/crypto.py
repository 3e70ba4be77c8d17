"""Envelope encryption of config secrets: AES-256-GCM under a data key per value, the data key
wrapped by a key-encryption key (KEK) of the keyring, the AAD binding both to where the value
is stored. Pure: keys and bytes in, bytes out; the keyring's file lives in registry/keyring.py.

A stored ciphertext (``plugin_config.secret_ciphertext``), format 1::

    0x01 | wrap nonce (12) | data key wrapped by the KEK (32 + 16 tag) | value nonce (12)
         | value encrypted by the data key (n + 16 tag)

The KEK's id sits beside it in ``plugin_config.secret_key_id``. The value's AAD is the row's
place: tenant, plugin, environment and key (as SOPS binds a value to its path, Kubernetes to
its storage key), so a ciphertext copied to another row does not decrypt. The wrap's AAD adds
the KEK id, so relabelling a row with another key id fails as well.

Why a data key per value: rotation re-wraps 48 bytes per value under the new KEK (Vault's
``rewrap``) without ever decrypting the value itself; and no two values share a GCM key, so
random 96-bit nonces are far from their collision bound.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pluginmon.registry.errors import ConflictError

FORMAT_V1: Final = 1
KEY_BYTES: Final = 32  # AES-256
NONCE_BYTES: Final = 12  # GCM's 96-bit nonce
TAG_BYTES: Final = 16
_WRAPPED_BYTES: Final = KEY_BYTES + TAG_BYTES
HEADER_BYTES: Final = 1 + NONCE_BYTES + _WRAPPED_BYTES + NONCE_BYTES
KEY_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_AAD_LABEL: Final = "pluginmon-secret/v1"
_WRAP_LABEL: Final = "pluginmon-data-key/v1"


class KeyringError(Exception):
    """The keyring itself is unusable (bad file, bad variable): names the source and the key
    id, never key material."""


# Plain ConflictErrors with their own codes (the HTTP glue maps error classes exactly):
# a value under a KEK this keyring lacks or has retired, and a ciphertext that does not
# authenticate for its row (moved, altered, or a wrong key).
KEY_UNAVAILABLE: Final = "secret_key_unavailable"
UNDECRYPTABLE: Final = "secret_undecryptable"


def key_unavailable_error(message: str, *, field: str) -> ConflictError:
    return ConflictError(message, field=field, code=KEY_UNAVAILABLE)


def undecryptable_error(message: str, *, field: str) -> ConflictError:
    return ConflictError(message, field=field, code=UNDECRYPTABLE)


@dataclass(frozen=True, slots=True)
class KeyEncryptionKey:
    """One KEK. ``material`` never reaches a repr, a log line or an error."""

    key_id: str
    material: bytes = field(repr=False)
    created_at: str | None = None
    retired: bool = False


@dataclass(frozen=True, slots=True)
class Keyring:
    """The KEKs: the primary encrypts, every key that is not retired decrypts."""

    primary_id: str
    keys: tuple[KeyEncryptionKey, ...]
    source: str  # where it came from, for messages ("file /etc/pluginmon/keys")

    def __post_init__(self) -> None:
        ids = [k.key_id for k in self.keys]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise KeyringError(f"{self.source}: key id {duplicate!r} appears twice")
        if self.primary_id not in ids:
            raise KeyringError(f"{self.source}: the primary key {self.primary_id!r} is not in it")
        if self.primary.retired:
            raise KeyringError(f"{self.source}: the primary key {self.primary_id!r} is retired")

    @property
    def primary(self) -> KeyEncryptionKey:
        return next(k for k in self.keys if k.key_id == self.primary_id)

    def key(self, key_id: str) -> KeyEncryptionKey | None:
        return next((k for k in self.keys if k.key_id == key_id), None)

    def for_decryption(self, key_id: str, *, where: str) -> KeyEncryptionKey:
        found = self.key(key_id)
        if found is None:
            raise key_unavailable_error(
                f"{where} is encrypted under key {key_id!r}, which is not in the keyring "
                f"({self.source}); add that key back to decrypt it",
                field="secret_key_id",
            )
        if found.retired:
            raise key_unavailable_error(
                f"{where} is encrypted under key {key_id!r}, which is retired in the keyring "
                f"({self.source}); un-retire it and run `pluginmon secrets rewrap`",
                field="secret_key_id",
            )
        return found


def secret_aad(*, tenant_id: str, plugin: str, environment: str, key: str) -> bytes:
    """The value's place, canonical (a JSON array: no separator can be smuggled in a name)."""
    return json.dumps(
        [_AAD_LABEL, tenant_id, plugin, environment, key], separators=(",", ":")
    ).encode()


def _wrap_aad(key_id: str, aad: bytes) -> bytes:
    return _WRAP_LABEL.encode() + b"\0" + key_id.encode() + b"\0" + aad


def encrypt(keyring: Keyring, plaintext: bytes, *, aad: bytes) -> tuple[bytes, str]:
    """(ciphertext, KEK id) of ``plaintext`` under a fresh data key wrapped by the primary."""
    kek = keyring.primary
    data_key = AESGCM.generate_key(bit_length=256)
    wrap_nonce = os.urandom(NONCE_BYTES)
    value_nonce = os.urandom(NONCE_BYTES)
    wrapped = AESGCM(kek.material).encrypt(wrap_nonce, data_key, _wrap_aad(kek.key_id, aad))
    sealed = AESGCM(data_key).encrypt(value_nonce, plaintext, aad)
    return bytes([FORMAT_V1]) + wrap_nonce + wrapped + value_nonce + sealed, kek.key_id


def _split(blob: bytes, *, where: str) -> tuple[bytes, bytes, bytes, bytes]:
    if len(blob) < HEADER_BYTES + TAG_BYTES or blob[0] != FORMAT_V1:
        raise undecryptable_error(
            f"{where}: the stored ciphertext is not in a known format", field="secret_ciphertext"
        )
    at = 1
    wrap_nonce = blob[at : at + NONCE_BYTES]
    at += NONCE_BYTES
    wrapped = blob[at : at + _WRAPPED_BYTES]
    at += _WRAPPED_BYTES
    value_nonce = blob[at : at + NONCE_BYTES]
    at += NONCE_BYTES
    return wrap_nonce, wrapped, value_nonce, blob[at:]


def _unwrap(keyring: Keyring, blob: bytes, *, key_id: str, aad: bytes, where: str) -> bytes:
    kek = keyring.for_decryption(key_id, where=where)
    wrap_nonce, wrapped, _, _ = _split(blob, where=where)
    try:
        return AESGCM(kek.material).decrypt(wrap_nonce, wrapped, _wrap_aad(key_id, aad))
    except InvalidTag:
        raise undecryptable_error(
            f"{where} does not decrypt under key {key_id!r}: the ciphertext was altered, "
            "belongs to another row, or the key material under that id changed",
            field="secret_ciphertext",
        ) from None


def decrypt(keyring: Keyring, blob: bytes, *, key_id: str, aad: bytes, where: str) -> bytes:
    """The plaintext; key_unavailable_error or undecryptable_error naming ``where`` (a
    location such as "plugin 'x' production/api_key") and the key id."""
    data_key = _unwrap(keyring, blob, key_id=key_id, aad=aad, where=where)
    _, _, value_nonce, sealed = _split(blob, where=where)
    try:
        return AESGCM(data_key).decrypt(value_nonce, sealed, aad)
    except InvalidTag:
        raise undecryptable_error(
            f"{where}: the value's ciphertext does not authenticate", field="secret_ciphertext"
        ) from None


def rewrap(keyring: Keyring, blob: bytes, *, key_id: str, aad: bytes, where: str) -> bytes:
    """The same value, its data key re-wrapped under the primary KEK. The value itself is
    never decrypted; the old wrap must still authenticate for this row."""
    data_key = _unwrap(keyring, blob, key_id=key_id, aad=aad, where=where)
    _, _, value_nonce, sealed = _split(blob, where=where)
    kek = keyring.primary
    wrap_nonce = os.urandom(NONCE_BYTES)
    wrapped = AESGCM(kek.material).encrypt(wrap_nonce, data_key, _wrap_aad(kek.key_id, aad))
    return bytes([FORMAT_V1]) + wrap_nonce + wrapped + value_nonce + sealed


# -- the keyring's text ----------------------------------------------------------------------------


def new_key_id(existing: Iterable[str]) -> str:
    """``k<n>``, one past the highest ``k<n>`` in use (numbered versions, as Vault's)."""
    numbers = [int(m[1]) for i in existing if (m := re.fullmatch(r"k(\d+)", i))]
    return f"k{max(numbers, default=0) + 1}"


def generate_key(*, key_id: str, now: datetime) -> KeyEncryptionKey:
    return KeyEncryptionKey(
        key_id=key_id, material=AESGCM.generate_key(bit_length=256), created_at=now.isoformat()
    )


def rotated(keyring: Keyring, *, now: datetime, key_id: str | None = None) -> Keyring:
    """A new primary KEK added; the old keys keep decrypting."""
    chosen = key_id or new_key_id(k.key_id for k in keyring.keys)
    if not KEY_ID_RE.fullmatch(chosen):
        raise KeyringError(f"key id {chosen!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if keyring.key(chosen) is not None:
        raise KeyringError(f"{keyring.source}: key id {chosen!r} exists already")
    return replace(
        keyring,
        primary_id=chosen,
        keys=(*keyring.keys, generate_key(key_id=chosen, now=now)),
    )


def retired(keyring: Keyring, key_id: str) -> Keyring:
    """``key_id`` may no longer decrypt (Vault's min_decryption_version, per key)."""
    if keyring.key(key_id) is None:
        raise KeyringError(f"{keyring.source}: no key {key_id!r}")
    if key_id == keyring.primary_id:
        raise KeyringError(
            f"{keyring.source}: {key_id!r} is the primary key; rotate first, then retire it"
        )
    return replace(
        keyring,
        keys=tuple(replace(k, retired=True) if k.key_id == key_id else k for k in keyring.keys),
    )


def _material(text: object, *, key_id: str, source: str) -> bytes:
    if not isinstance(text, str):
        raise KeyringError(f"{source}: key {key_id!r} must be base64 text")
    try:
        material = base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{source}: key {key_id!r} is not valid base64") from None
    if len(material) != KEY_BYTES:
        raise KeyringError(
            f"{source}: key {key_id!r} must be {KEY_BYTES} bytes (AES-256), got {len(material)}"
        )
    return material


def _key_id(value: object, *, source: str) -> str:
    if not isinstance(value, str) or not KEY_ID_RE.fullmatch(value):
        raise KeyringError(f"{source}: a key id must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def parse_keyring(text: str, *, source: str) -> Keyring:
    """A keyring from its JSON form (the file)::

        {"primary": "k2", "keys": [{"id": "k1", "key": "<base64>", "retired": false}, ...]}

    or the compact form for ``PLUGINMON_SECRET_KEYS``: ``k2:<base64>,k1:<base64>`` (the first
    is the primary). Errors name the source and key id, never the material.
    """
    stripped = text.strip()
    if not stripped:
        raise KeyringError(f"{source}: empty")
    if stripped.startswith("{"):
        try:
            data: Any = json.loads(stripped)
        except ValueError:
            raise KeyringError(f"{source}: not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise KeyringError(f'{source}: expected {{"primary": ..., "keys": [...]}}')
        keys = []
        for item in data["keys"]:
            if not isinstance(item, dict):
                raise KeyringError(f"{source}: each key must be an object")
            key_id = _key_id(item.get("id"), source=source)
            keys.append(
                KeyEncryptionKey(
                    key_id=key_id,
                    material=_material(item.get("key"), key_id=key_id, source=source),
                    created_at=item.get("created_at"),
                    retired=bool(item.get("retired", False)),
                )
            )
        if not keys:
            raise KeyringError(f"{source}: holds no key")
        primary = data.get("primary", keys[-1].key_id)
        return Keyring(primary_id=_key_id(primary, source=source), keys=tuple(keys), source=source)
    keys = []
    for part in stripped.split(","):
        key_id, sep, material = part.strip().partition(":")
        if not sep:
            raise KeyringError(f"{source}: each key is written <id>:<base64 key>")
        key_id = _key_id(key_id, source=source)
        keys.append(
            KeyEncryptionKey(
                key_id=key_id, material=_material(material, key_id=key_id, source=source)
            )
        )
    return Keyring(primary_id=keys[0].key_id, keys=tuple(keys), source=source)


def dump_keyring(keyring: Keyring) -> str:
    """The JSON form of :func:`parse_keyring` (for the key file only)."""
    return (
        json.dumps(
            {
                "format": 1,
                "primary": keyring.primary_id,
                "keys": [
                    {
                        "id": k.key_id,
                        "key": base64.b64encode(k.material).decode(),
                        "created_at": k.created_at,
                        "retired": k.retired,
                    }
                    for k in keyring.keys
                ],
            },
            indent=2,
        )
        + "\n"
    )
