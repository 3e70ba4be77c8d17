"""The command line of plugin configuration and its keyring: ``pluginmon config
set|get|list|history|rollback`` and ``pluginmon secrets status|rotate|rewrap|retire``.

Config commands act on one tenant (``--tenant``) exactly as an API request does: in one
transaction, as the ``pluginmon_api`` role under row-level security. Exit codes: 0 ok, 1 a
runtime failure (a missing key, an unknown plugin), 2 bad arguments (including a value the
config_schema rejects). Nothing here prints a secret unless ``config get --reveal`` asks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # light at import, like daemon/cli_api.py
    import asyncpg

    from pluginmon.daemon.settings import Settings
    from pluginmon.registry.config_values import ConfigValue
    from pluginmon.registry.crypto import Keyring
    from pluginmon.registry.keyring import KeyringLocation

CONFIG_COMMANDS: Final = frozenset({"config", "secrets"})
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
API_ROLE: Final = "pluginmon_api"

DatabaseUrl = Callable[["Settings"], AbstractContextManager[str]]


def add_config_commands(sub: Any) -> None:
    config = sub.add_parser("config", help="plugin configuration values (validated, versioned)")
    actions = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    set_ = actions.add_parser(
        "set",
        help="set one key (a new version)",
        description="Set PLUGIN's KEY in one environment. VALUE is JSON (42, true, "
        '"text", {"a": 1}); --string takes it as text; --stdin reads it from standard input '
        "(use it for secrets: the command line is visible to other users).",
    )
    set_.add_argument("plugin", metavar="PLUGIN")
    set_.add_argument("key", metavar="KEY")
    set_.add_argument("value", metavar="VALUE", nargs="?")
    set_.add_argument("--secret", action="store_true", help="encrypt it; reads back as ***")
    set_.add_argument("--string", action="store_true", help="VALUE is text, not JSON")
    set_.add_argument("--stdin", action="store_true", help="read VALUE from standard input")
    get = actions.add_parser("get", help="one key's current value")
    get.add_argument("plugin", metavar="PLUGIN")
    get.add_argument("key", metavar="KEY")
    get.add_argument("--reveal", action="store_true", help="a secret in clear (audited)")
    listing = actions.add_parser("list", help="the current values of one environment")
    listing.add_argument("plugin", metavar="PLUGIN")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    hist = actions.add_parser("history", help="every version of one key, newest first")
    hist.add_argument("plugin", metavar="PLUGIN")
    hist.add_argument("key", metavar="KEY")
    back = actions.add_parser("rollback", help="make an older version current (a new version)")
    back.add_argument("plugin", metavar="PLUGIN")
    back.add_argument("key", metavar="KEY")
    back.add_argument("version", metavar="VERSION", type=int)
    for parser in (set_, get, listing, hist, back):
        parser.add_argument("--tenant", required=True, help="the tenant the plugin belongs to")
        parser.add_argument("--environment", default="production", help="default: production")

    secrets = sub.add_parser("secrets", help="the keyring of config secrets: rotate, rewrap")
    s_actions = secrets.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")
    status = s_actions.add_parser("status", help="keys and how many secrets each encrypts")
    rotate = s_actions.add_parser(
        "rotate",
        help="add a new primary key (then run rewrap)",
        description="Add a new "
        "primary key to the key file: new secrets are encrypted with it, old keys still decrypt.",
    )
    rotate.add_argument("--key-id", help="the new key's id (default: k<n+1>)")
    rewrap = s_actions.add_parser(
        "rewrap",
        help="re-encrypt every secret's data key to the primary key, in batches (resumable)",
    )
    rewrap.add_argument("--batch-size", type=int, default=500, help="secrets per transaction")
    retire = s_actions.add_parser(
        "retire", help="stop a key from decrypting (refused while it still encrypts secrets)"
    )
    retire.add_argument("key_id", metavar="KEY_ID")
    for parser in (set_, get, listing, hist, back, status, rotate, rewrap, retire):
        parser.add_argument("--config", metavar="PATH", type=Path, help="TOML config file")


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _now() -> datetime:
    return datetime.now(UTC)


def run_config_command(args: argparse.Namespace, *, database_url: DatabaseUrl) -> int:
    from pluginmon.daemon.cli_api import url_secrets
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.logs import configure_logging
    from pluginmon.daemon.settings import load_settings

    what = "pluginmon " + " ".join(
        x
        for x in (
            args.command,
            getattr(args, "config_command", None),
            getattr(args, "secrets_command", None),
        )
        if x
    )
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"{what}: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(
        log_format=settings.log_format, log_level="WARNING", secrets=url_secrets(settings)
    )
    import asyncpg

    from pluginmon.daemon.api_wiring import keyring_location
    from pluginmon.registry.crypto import KeyringError
    from pluginmon.registry.errors import InvalidError, RegistryError
    from pluginmon.storage.errors import constraint_name, refused_where

    location = keyring_location(settings)
    try:
        value = _value_argument(args) if getattr(args, "config_command", None) == "set" else None
        with database_url(settings) as url:
            return asyncio.run(_connected(url, lambda c: _dispatch(c, args, location, value)))
    except _Exit as exc:
        print(f"{what}: {exc.message}", file=sys.stderr)
        return exc.code
    except InvalidError as exc:
        print(f"{what}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except (RegistryError, KeyringError) as exc:
        print(f"{what}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except asyncpg.UndefinedTableError:
        print(f"{what}: the database has no schema yet; run `pluginmon migrate`", file=sys.stderr)
        return EXIT_FAILURE
    except asyncpg.IntegrityConstraintViolationError as exc:
        # Its message may quote values: only the constraint's name, or where it happened.
        where = constraint_name(exc) or refused_where(exc)
        print(f"{what}: the database refused it ({where})", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        from pluginmon.daemon.logs import redact

        print(f"{what}: {redact(type(exc).__name__)}", file=sys.stderr)
        return EXIT_FAILURE


def _value_argument(args: argparse.Namespace) -> Any:
    if args.stdin == (args.value is not None):
        raise _Exit(EXIT_USAGE, "give VALUE or --stdin (one of them)")
    text = sys.stdin.read().removesuffix("\n") if args.stdin else args.value
    if args.string:
        return text
    try:
        return json.loads(text)
    except ValueError:
        # Never echo it: it may be a secret.
        raise _Exit(
            EXIT_USAGE, "VALUE is not valid JSON (quote text as JSON, or pass --string)"
        ) from None


async def _connected(
    url: str, work: Callable[[asyncpg.Connection], Coroutine[Any, Any, int]]
) -> int:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await work(conn)
    finally:
        await conn.close()


async def _keyring_of(location: KeyringLocation | None) -> Keyring:
    from pluginmon.registry.crypto import KeyringError
    from pluginmon.registry.keyring import load_keyring

    if location is None:
        raise KeyringError(
            "no secret keyring: set secret_keys_file or PLUGINMON_SECRET_KEYS (the key file "
            "under data_dir is made only for the embedded database)"
        )
    keyring, _ = await asyncio.to_thread(load_keyring, location, now=_now())
    return keyring


async def _dispatch(
    conn: asyncpg.Connection,
    args: argparse.Namespace,
    location: KeyringLocation | None,
    value: Any,
) -> int:
    if args.command == "secrets":
        return await _secrets(conn, args, location)
    from pluginmon.registry import config_values
    from pluginmon.registry.actor import cli_actor

    actor = cli_actor()
    action = args.config_command
    needs_keys = (
        (action == "set" and args.secret)
        or action == "rollback"
        or (action == "get" and args.reveal)
    )
    keyring = await _keyring_of(location) if needs_keys else None
    async with conn.transaction():
        await config_values.enter_tenant(conn, args.tenant, role=API_ROLE)
        common: dict[str, Any] = {"environment": args.environment}
        written: dict[str, Any] = {"tenant_id": args.tenant, "actor": actor, "now": _now()}
        if action == "set":
            (item,) = await config_values.set_values(
                conn,
                args.plugin,
                {args.key: (value, args.secret)},
                keyring=keyring,
                **common,
                **written,
            )
            print(_described(args.plugin, item, "set"))
        elif action == "rollback":
            item = await config_values.rollback(
                conn,
                args.plugin,
                args.key,
                version=args.version,
                keyring=keyring,
                **common,
                **written,
            )
            print(_described(args.plugin, item, f"rolled back to version {args.version}"))
        elif action == "get":
            item = await config_values.get_value(
                conn,
                args.plugin,
                args.key,
                reveal=args.reveal,
                keyring=keyring,
                **common,
                **written,
            )
            print(json.dumps(item.value))
        elif action == "list":
            items = await config_values.list_values(conn, args.plugin, **common)
            if args.json:
                print(json.dumps([_as_dict(i) for i in items], indent=2))
            else:
                _table(
                    ("KEY", "VERSION", "SECRET", "VALUE"),
                    [(i.key, str(i.version), "yes" if i.secret else "", _short(i)) for i in items],
                )
        else:
            items = await config_values.history(conn, args.plugin, args.key, **common)
            _table(
                ("VERSION", "CURRENT", "CREATED", "BY", "VALUE", "NOTE"),
                [
                    (
                        str(i.version),
                        "*" if i.current else "",
                        f"{i.created_at:%Y-%m-%d %H:%M:%S}",
                        i.created_by or "",
                        _short(i),
                        f"rollback of {i.rollback_of}" if i.rollback_of else "",
                    )
                    for i in items
                ],
            )
    return EXIT_OK


def _described(plugin: str, item: ConfigValue, verb: str) -> str:
    where = f"{plugin}/{item.environment}/{item.key}"
    how = f", encrypted under key {item.key_id}" if item.secret else ""
    return f"config {where} {verb}: version {item.version}{how}"


def _short(item: ConfigValue) -> str:
    text = json.dumps(item.value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_dict(item: ConfigValue) -> dict[str, Any]:
    return {
        "key": item.key,
        "environment": item.environment,
        "value": item.value,
        "secret": item.secret,
        "version": item.version,
        "encryption_key_id": item.key_id,
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    everything = [tuple(header), *[tuple(r) for r in rows]]
    widths = [max(len(r[i]) for r in everything) for i in range(len(header))]
    for r in everything:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


async def _secrets(
    conn: asyncpg.Connection, args: argparse.Namespace, location: KeyringLocation | None
) -> int:
    from pluginmon.registry import audit, secrets
    from pluginmon.registry.actor import cli_actor
    from pluginmon.registry.keyring import retire_in_key_file, rotate_key_file

    actor = cli_actor()
    action = args.secrets_command
    if action == "status":
        keyring = await _keyring_of(location)
        usage = {u.key_id: u.values for u in await secrets.key_usage(conn)}
        print(f"keyring: {keyring.source}; primary key {keyring.primary_id}")
        rows = [
            (
                k.key_id,
                "primary" if k.key_id == keyring.primary_id else ("retired" if k.retired else ""),
                k.created_at or "",
                str(usage.pop(k.key_id, 0)),
            )
            for k in keyring.keys
        ]
        rows += [(key_id, "NOT IN KEYRING", "", str(n)) for key_id, n in sorted(usage.items())]
        _table(("KEY", "STATE", "CREATED", "SECRETS"), rows)
        return EXIT_FAILURE if usage else EXIT_OK
    if action == "rotate":
        if location is None:
            await _keyring_of(location)  # raises, naming what to configure
        assert location is not None
        before = (
            (await _keyring_of(location)).primary_id
            if location.inline or (location.path is not None and location.path.exists())
            else None
        )
        keyring = await asyncio.to_thread(rotate_key_file, location, now=_now(), key_id=args.key_id)
        async with conn.transaction():
            await audit.append(
                conn,
                tenant_id=audit.SYSTEM_TENANT,
                actor=actor,
                action="keyring.rotate",
                entity_type="keyring",
                entity_id=keyring.primary_id,
                occurred_at=_now(),
                before={"primary_key_id": before},
                after={"primary_key_id": keyring.primary_id},
            )
        pending = sum(
            u.values for u in await secrets.key_usage(conn) if u.key_id != keyring.primary_id
        )
        was = f" (was {before})" if before else " (a new keyring)"
        print(f"new primary key {keyring.primary_id} in {keyring.source}{was}")
        print(
            f"{pending} secret(s) are under older keys: restart or wait for the daemons to "
            "pick up the key file, then run `pluginmon secrets rewrap`"
        )
        return EXIT_OK
    if action == "rewrap":
        if args.batch_size < 1:
            raise _Exit(EXIT_USAGE, "--batch-size must be >= 1")
        keyring = await _keyring_of(location)

        def progress(done: int) -> None:
            print(f"  {done} re-wrapped", file=sys.stderr, flush=True)

        report = await secrets.rewrap_all(
            conn,
            keyring,
            actor=actor,
            clock=_now,
            batch_size=args.batch_size,
            progress=progress,
        )
        print(
            f"re-wrapped {report.values} secret(s) to key {keyring.primary_id} in "
            f"{report.batches} batch(es); {report.remaining} left under other keys"
        )
        return EXIT_OK if report.remaining == 0 else EXIT_FAILURE
    # retire
    if location is None:
        await _keyring_of(location)
    assert location is not None
    still = await secrets.values_under(conn, args.key_id)
    if still:
        raise _Exit(
            EXIT_FAILURE,
            f"key {args.key_id} still encrypts {still} secret(s); run `pluginmon secrets "
            "rewrap` first",
        )
    await asyncio.to_thread(retire_in_key_file, location, args.key_id)
    async with conn.transaction():
        await audit.append(
            conn,
            tenant_id=audit.SYSTEM_TENANT,
            actor=actor,
            action="keyring.retire",
            entity_type="keyring",
            entity_id=args.key_id,
            occurred_at=_now(),
        )
    print(f"key {args.key_id} retired: it no longer decrypts anything")
    return EXIT_OK
