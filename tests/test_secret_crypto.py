"""The envelope encryption and the keyring's text, pure: round trips, AAD binding, rewrap
without touching the value's ciphertext, key errors naming the key id and never material."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pluginmon.registry import crypto
from pluginmon.registry.errors import ConflictError
from pluginmon.registry.keyring import (
    KeyringLocation,
    load_keyring,
    read_key_file,
    retire_in_key_file,
    rotate_key_file,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)
AAD = crypto.secret_aad(tenant_id="a", plugin="gw", environment="production", key="api_key")


def _keyring() -> crypto.Keyring:
    key = crypto.generate_key(key_id="k1", now=NOW)
    return crypto.Keyring(primary_id="k1", keys=(key,), source="test")


def test_round_trip_and_fresh_data_key_each_time() -> None:
    keyring = _keyring()
    one, key_id = crypto.encrypt(keyring, b'"s3cret"', aad=AAD)
    two, _ = crypto.encrypt(keyring, b'"s3cret"', aad=AAD)
    assert key_id == "k1"
    assert one != two  # a fresh data key and nonces per value
    assert len(one) == crypto.HEADER_BYTES + len(b'"s3cret"') + crypto.TAG_BYTES
    assert b"s3cret" not in one
    assert crypto.decrypt(keyring, one, key_id="k1", aad=AAD, where="x") == b'"s3cret"'


@pytest.mark.parametrize(
    "place",
    [
        {"tenant_id": "b", "plugin": "gw", "environment": "production", "key": "api_key"},
        {"tenant_id": "a", "plugin": "gw2", "environment": "production", "key": "api_key"},
        {"tenant_id": "a", "plugin": "gw", "environment": "staging", "key": "api_key"},
        {"tenant_id": "a", "plugin": "gw", "environment": "production", "key": "api_key2"},
    ],
)
def test_ciphertext_is_bound_to_its_place(place: dict[str, str]) -> None:
    keyring = _keyring()
    blob, _ = crypto.encrypt(keyring, b"1", aad=AAD)
    with pytest.raises(ConflictError) as refused:
        crypto.decrypt(keyring, blob, key_id="k1", aad=crypto.secret_aad(**place), where="there")
    assert refused.value.code == crypto.UNDECRYPTABLE
    assert "there does not decrypt under key 'k1'" in refused.value.message


def test_aad_cannot_be_forged_by_separators_in_names() -> None:
    left = crypto.secret_aad(tenant_id="a", plugin="b/c", environment="d", key="e")
    right = crypto.secret_aad(tenant_id="a", plugin="b", environment="c/d", key="e")
    assert left != right


def test_rewrap_keeps_the_value_ciphertext_and_needs_the_old_key() -> None:
    keyring = _keyring()
    blob, _ = crypto.encrypt(keyring, b'{"a": 1}', aad=AAD)
    newer = crypto.rotated(keyring, now=NOW)
    assert newer.primary_id == "k2"
    again = crypto.rewrap(newer, blob, key_id="k1", aad=AAD, where="x")
    # The value part (nonce + ciphertext) is untouched: only the data key was re-wrapped.
    value_at = 1 + crypto.NONCE_BYTES + crypto.KEY_BYTES + crypto.TAG_BYTES
    assert again[value_at:] == blob[value_at:]
    assert again[:value_at] != blob[:value_at]
    assert crypto.decrypt(newer, again, key_id="k2", aad=AAD, where="x") == b'{"a": 1}'
    # Relabelled with the old id, the new wrap does not authenticate.
    with pytest.raises(ConflictError):
        crypto.decrypt(newer, again, key_id="k1", aad=AAD, where="x")
    without_k1 = crypto.Keyring(primary_id="k2", keys=(newer.primary,), source="file /k")
    with pytest.raises(ConflictError) as missing:
        crypto.decrypt(without_k1, blob, key_id="k1", aad=AAD, where="secret gw/production/k")
    assert missing.value.code == crypto.KEY_UNAVAILABLE
    assert missing.value.message.startswith(
        "secret gw/production/k is encrypted under key 'k1', which is not in the keyring"
    )
    retired = crypto.retired(newer, "k1")
    with pytest.raises(ConflictError) as refused:
        crypto.rewrap(retired, blob, key_id="k1", aad=AAD, where="x")
    assert "'k1', which is retired" in refused.value.message
    with pytest.raises(crypto.KeyringError, match="'k2' is the primary key"):
        crypto.retired(newer, "k2")


def test_keyring_text_forms_and_errors_without_material() -> None:
    material = base64.b64encode(bytes(range(32))).decode()
    compact = crypto.parse_keyring(f"k2:{material}, k1:{material}", source="ENV")
    assert (compact.primary_id, [k.key_id for k in compact.keys]) == ("k2", ["k2", "k1"])
    assert material not in repr(compact)
    dumped = crypto.dump_keyring(compact)
    assert crypto.parse_keyring(dumped, source="f") == crypto.Keyring(
        primary_id="k2", keys=compact.keys, source="f"
    )
    bad = base64.b64encode(b"short").decode()
    for text, words in [
        (f"k1:{bad}", "key 'k1' must be 32 bytes (AES-256), got 5"),
        ("k1:@@@", "key 'k1' is not valid base64"),
        (f"k1{material}", "each key is written <id>:<base64 key>"),
        (
            json.dumps({"primary": "k9", "keys": [{"id": "k1", "key": material}]}),
            "'k9' is not in it",
        ),
        (f"k1:{material},k1:{material}", "key id 'k1' appears twice"),
        ("", "empty"),
    ]:
        with pytest.raises(crypto.KeyringError) as refused:
            crypto.parse_keyring(text, source="ENV")
        assert words in str(refused.value)
        assert material not in str(refused.value)


def test_key_file_create_rotate_retire(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "d" / "keys.json"
    location = KeyringLocation(path, create=True)
    first, created = load_keyring(location, now=NOW)
    assert created
    assert path.stat().st_mode & 0o777 == 0o600
    again, created_again = load_keyring(location, now=NOW)
    assert (created_again, again) == (False, crypto.Keyring("k1", first.keys, first.source))
    rotated = rotate_key_file(location, now=NOW)
    assert (rotated.primary_id, [k.key_id for k in rotated.keys]) == ("k2", ["k1", "k2"])
    assert path.stat().st_mode & 0o777 == 0o600
    retire_in_key_file(location, "k1")
    assert read_key_file(path).key("k1") == crypto.KeyEncryptionKey(
        key_id="k1", material=first.primary.material, created_at=NOW.isoformat(), retired=True
    )
    path.chmod(0o644)
    read_key_file(path)
    messages = [r.getMessage() for r in caplog.records]
    assert any("readable by group or others (mode 644)" in m for m in messages)
    for key in read_key_file(path).keys:
        encoded = base64.b64encode(key.material).decode()
        assert all(encoded not in m for m in messages)
    inline = KeyringLocation(None, inline="k1:" + base64.b64encode(bytes(32)).decode())
    assert "***" in repr(inline)
    with pytest.raises(crypto.KeyringError, match="PLUGINMON_SECRET_KEYS, which pluginmon cannot"):
        rotate_key_file(inline, now=NOW)


def test_keyring_settings_precedence_and_env_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pluginmon.daemon.api_wiring import keyring_location
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.settings import Settings, load_settings

    for name in ("PLUGINMON_SECRET_KEYS", "PLUGINMON_SECRET_KEYS_FILE", "PLUGINMON_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    embedded = keyring_location(Settings(data_dir=tmp_path))
    assert embedded == KeyringLocation(tmp_path / "secret-keys.json", create=True)
    monkeypatch.setenv("PLUGINMON_DATABASE_URL", "postgresql://db/x")
    external = Settings(data_dir=tmp_path)
    assert keyring_location(external) is None
    monkeypatch.delenv("PLUGINMON_DATABASE_URL")
    monkeypatch.setenv("PLUGINMON_SECRET_KEYS_FILE", "/etc/pluginmon/keys")
    assert keyring_location(Settings(data_dir=tmp_path)) == KeyringLocation(
        Path("/etc/pluginmon/keys")
    )
    monkeypatch.setenv("PLUGINMON_SECRET_KEYS", "k1:" + base64.b64encode(bytes(32)).decode())
    inline = keyring_location(Settings(data_dir=tmp_path))
    assert inline is not None
    assert inline.inline is not None
    assert inline.describe == "PLUGINMON_SECRET_KEYS"
    config = tmp_path / "c.toml"
    config.write_text('secret_keys = "k1:AAAA"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert "secret_keys" in str(refused.value.problems)
    assert "PLUGINMON_SECRET_KEYS" in str(refused.value.problems)


def test_secret_keys_variable_names_the_key_file_or_holds_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN.md names PLUGINMON_SECRET_KEYS as secret_keys_file's variable: it may hold the
    key file's path; inline keys keep working; anything else is refused without an echo."""
    from pluginmon.daemon.api_wiring import keyring_location
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.settings import load_settings
    from pluginmon.registry.keyring import environment_location

    for name in ("PLUGINMON_SECRET_KEYS", "PLUGINMON_SECRET_KEYS_FILE", "PLUGINMON_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PLUGINMON_DATABASE_URL", "postgresql://db/x")
    key_file = tmp_path / "etc" / "keys"
    made, _ = load_keyring(KeyringLocation(key_file, create=True), now=NOW)
    material = base64.b64encode(made.keys[0].material).decode()

    def located(value: str) -> KeyringLocation | None:
        monkeypatch.setenv("PLUGINMON_SECRET_KEYS", value)
        return keyring_location(load_settings(None))

    # An absolute path: the key file, readable and rotatable (it is not read-only as keys are).
    by_path = located(str(key_file))
    assert by_path is not None
    assert by_path == KeyringLocation(key_file)
    assert by_path.describe == f"file {key_file}"
    assert load_keyring(by_path, now=NOW)[0].keys == made.keys
    assert rotate_key_file(by_path, now=NOW).primary_id == "k2"
    # It wins over secret_keys_file, as the variable always did.
    monkeypatch.setenv("PLUGINMON_SECRET_KEYS_FILE", str(tmp_path / "other"))
    assert located(f"  {key_file}\n") == KeyringLocation(key_file)
    monkeypatch.delenv("PLUGINMON_SECRET_KEYS_FILE")
    # A relative path naming an existing file, taken from the working directory.
    monkeypatch.chdir(tmp_path)
    assert located("etc/keys") == KeyringLocation(key_file)
    # Inline keys and the inline JSON still work.
    for inline in (f"k1:{material}", f"k9:{material}, k1:{material}", key_file.read_text()):
        found = located(inline)
        assert found is not None
        assert (found.path, found.inline) == (None, inline)
        assert found.describe == "PLUGINMON_SECRET_KEYS"
    two = located(f"k9:{material},k1:{material}")
    assert two is not None
    assert load_keyring(two, now=NOW)[0].primary_id == "k9"
    # Neither form: a clear error naming the variable, never the value. A bare key (the
    # "k1:" forgotten) may start with "/": it is not taken for a path.
    bare = base64.b64encode(b"\xfc" * 32).decode()
    assert bare.startswith("/")
    for bad in (
        "hunter2-not-a-keyring",
        "relative/missing.json",
        str(tmp_path / "nowhere.json"),
        str(tmp_path),  # a directory
        bare,
        material,
        "k1:",
    ):
        monkeypatch.setenv("PLUGINMON_SECRET_KEYS", bad)
        with pytest.raises(ConfigError) as refused:
            load_settings(None)
        text = str(refused.value.problems)
        assert "PLUGINMON_SECRET_KEYS names no existing file and is not inline keys" in text
        assert bad not in text
    with pytest.raises(crypto.KeyringError) as direct:
        environment_location("k1:not base64!", cwd=tmp_path)
    assert "not base64" not in str(direct.value)
