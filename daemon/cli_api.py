"""The management half of the command line: ``pluginmon token create|list|revoke``,
``pluginmon audit verify`` and ``pluginmon api``. Exit codes as everywhere: 0 ok, 1 a runtime
failure (or a broken audit chain), 2 bad arguments or configuration."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pluginmon.daemon.signal_guard import SignalGuard

# Light at import: `pluginmon run` builds the whole parser before its signal guard is in
# place, so asyncpg and the settings (pydantic) are imported only by the commands below.
if TYPE_CHECKING:
    import asyncpg

    from pluginmon.daemon.settings import Settings

logger = logging.getLogger("pluginmon")

API_COMMANDS: Final = frozenset({"token", "audit", "api"})
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_CONFIG: Final = 2

DatabaseUrl = Callable[["Settings"], AbstractContextManager[str]]
T = TypeVar("T")


def add_api_commands(sub: Any) -> None:
    """Register the subcommands on the parser's subparsers (``sub``)."""
    token = sub.add_parser("token", help="create, list and revoke API tokens")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="issue a token (printed once, alone on the last line)",
        description="Issue an API token; the tenant is created when new. The token is printed "
        "once, alone on the last line of stdout; only its hash is stored.",
    )
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="the tenant the token acts for")
    who.add_argument(
        "--operator",
        action="store_true",
        help="a cross-tenant token (names the tenant per request)",
    )
    create.add_argument("--role", required=True, choices=("reader", "writer", "admin"))
    create.add_argument("--name", required=True, help="unique, never reused")
    listing = actions.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--tenant", help="only this tenant's tokens")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    revoke = actions.add_parser("revoke", help="revoke a token (effective on its next request)")
    revoke.add_argument("name", metavar="NAME")
    audit = sub.add_parser("audit", help="the audit trail")
    audit_actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = audit_actions.add_parser(
        "verify",
        help="check the hash chain (exit 0 intact, 1 naming the first bad entry)",
    )
    verify.add_argument("--tenant", help="only this tenant's chain")
    api = sub.add_parser(
        "api",
        help="serve /api/v1 without sampling",
        description="Serve /api/v1 (and /healthz, "
        "/readyz, /metrics) on the HTTP port, without sampling: a central deployment.",
    )
    for parser in (create, listing, revoke, verify, api):
        parser.add_argument("--config", metavar="PATH", type=Path, help="TOML config file")


def url_secrets(settings: Settings) -> tuple[str, ...]:
    """What of the configured database URL is scrubbed from logs and printed errors (drivers
    echo pieces of a URL they mis-parse: a raw '@', ' ' or '/' in the password)."""
    from pluginmon.storage.dsn import dsn_secrets

    if settings.database_url is None:
        return ()
    return dsn_secrets(settings.database_url.get_secret_value())


def run_api_command(args: argparse.Namespace, *, database_url: DatabaseUrl) -> int:
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.logs import configure_logging
    from pluginmon.daemon.settings import load_settings

    serving = args.command == "api"
    guard = SignalGuard()
    if serving:
        # As `run` does, before anything slow: from here no signal kills the server; those
        # that arrive before its event loop handles them are replayed then.
        guard.install()
    try:
        settings = load_settings(args.config)
        if serving:
            _check_before_serving(settings)
    except ConfigError as exc:
        print(
            f"pluginmon: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(
        log_format=settings.log_format,
        log_level=settings.log_level if serving else "WARNING",
        secrets=url_secrets(settings),
    )
    what = "pluginmon " + " ".join(
        x
        for x in (
            args.command,
            getattr(args, "token_command", None),
            getattr(args, "audit_command", None),
        )
        if x
    )
    import asyncpg

    try:
        with database_url(settings) as url:
            if serving:
                return _serve(settings, url, guard)
            if args.command == "audit":
                return asyncio.run(_with_connection(url, lambda c: _audit_verify(c, args.tenant)))
            handler = {"create": _token_create, "list": _token_list, "revoke": _token_revoke}[
                args.token_command
            ]
            return asyncio.run(_with_connection(url, lambda c: handler(c, args)))
    except _Exit as exc:
        print(f"{what}: {exc.message}", file=sys.stderr)
        return exc.code
    except asyncpg.UndefinedTableError:
        print(
            f"{what}: the database has no management schema yet; run `pluginmon migrate` "
            "(or `pluginmon run`) first",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except Exception as exc:
        from pluginmon.daemon.logs import redact

        print(f"{what}: {redact(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _with_connection(
    url: str, work: Callable[[asyncpg.Connection], Coroutine[Any, Any, T]]
) -> T:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await work(conn)
    finally:
        await conn.close()


def _now() -> datetime:
    return datetime.now(UTC)


async def _token_create(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from pluginmon.registry.actor import cli_actor
    from pluginmon.registry.errors import ConflictError, InvalidError
    from pluginmon.registry.tokens import Role, create_token

    try:
        info, text = await create_token(
            conn,
            name=args.name,
            tenant_id=None if args.operator else args.tenant,
            role=Role(args.role),
            actor=cli_actor(),
            now=_now(),
        )
    except InvalidError as exc:
        raise _Exit(EXIT_CONFIG, f"--{exc.field}: {exc.message}") from None
    except ConflictError as exc:
        raise _Exit(EXIT_FAILURE, exc.message) from None
    scope = (
        "an operator token (all tenants)" if info.tenant_id is None else f"tenant {info.tenant_id}"
    )
    print(f"token {info.name} created for {scope}, role {info.role.value}.")
    print("It is shown once and stored only as a hash; keep it now:")
    print(text)
    return EXIT_OK


async def _token_list(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from pluginmon.registry.tokens import list_tokens

    found = [
        t for t in await list_tokens(conn) if args.tenant is None or t.tenant_id == args.tenant
    ]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": t.name,
                        "tenant": t.tenant_id,
                        "operator": t.tenant_id is None,
                        "role": t.role.value,
                        "created_by": t.created_by,
                        "created_at": t.created_at.isoformat(),
                        "revoked_at": None if t.revoked_at is None else t.revoked_at.isoformat(),
                    }
                    for t in found
                ],
                indent=2,
            )
        )
        return EXIT_OK
    rows = [("NAME", "TENANT", "ROLE", "CREATED", "STATUS")]
    for t in found:
        status = "active" if t.revoked_at is None else f"revoked {t.revoked_at:%Y-%m-%d %H:%M}"
        rows.append(
            (
                t.name,
                t.tenant_id or "(operator)",
                t.role.value,
                f"{t.created_at:%Y-%m-%d %H:%M}",
                status,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return EXIT_OK


async def _token_revoke(conn: asyncpg.Connection, args: argparse.Namespace) -> int:
    from pluginmon.registry.actor import cli_actor
    from pluginmon.registry.errors import NotFoundError
    from pluginmon.registry.tokens import revoke_token

    try:
        info, revoked_now = await revoke_token(conn, args.name, actor=cli_actor(), now=_now())
    except NotFoundError as exc:
        raise _Exit(EXIT_FAILURE, exc.message) from None
    if revoked_now:
        print(f"token {info.name} revoked; requests with it now get 401")
    else:
        assert info.revoked_at is not None
        print(f"token {info.name} was already revoked at {info.revoked_at.isoformat()}")
    return EXIT_OK


async def _audit_verify(conn: asyncpg.Connection, tenant: str | None) -> int:
    from pluginmon.registry.audit import verify

    verdicts = await verify(conn, tenant_id=tenant)
    if not any(v.lanes for v in verdicts):
        print(f"no audit entries{' for tenant ' + tenant if tenant else ''}")
        return EXIT_OK
    broken = 0
    for v in verdicts:
        if v.problem is None:
            anchored = sum(1 for lane in v.lanes if lane.anchor_seq)
            after = f", {anchored} continuing from a retention anchor" if anchored else ""
            print(
                f"tenant {v.tenant_id}: intact, {v.checked} entries in "
                f"{len(v.lanes)} chain(s){after}"
            )
        else:
            broken += 1
            print(f"tenant {v.tenant_id}: BROKEN: {v.problem.message}")
    if broken:
        print(
            f"audit trail NOT intact: {broken} of {len(verdicts)} tenant(s) broken",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _check_before_serving(settings: Settings) -> None:
    """What ``run`` refuses at start (daemon.preflight) and ``pluginmon api`` uses too: the
    HTTP host and TLS files, the keyring, vulnerability and backup files, and data_dir when the embedded database lives there (nothing is
    sampled, so proc_root is not). ConfigError names each field, as for ``run``: exit 2."""
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.preflight import preflight

    used = {"http_host", "http_tls_cert_file", "http_tls_key_file", "event_loop"}
    used |= {"secret_keys_file", "vulnerability_db"}  # the API encrypts and scans
    if settings.embedded:
        used.add("data_dir")
    problems = [
        (field, problem)
        for field, problem in preflight(settings)
        if field in used or field.startswith("backups.")  # the API verifies backups
    ]
    if problems:
        raise ConfigError(problems)


def _serve(settings: Settings, url: str, guard: SignalGuard) -> int:
    from pluginmon import __version__
    from pluginmon.daemon.api_wiring import serve_api
    from pluginmon.daemon.lifecycle import install_signal_handlers
    from pluginmon.daemon.runtime import loop_kind, run_event_loop

    def forced_exit(signum: int) -> None:
        logging.shutdown()
        os._exit(EXIT_FAILURE)

    async def main() -> None:
        stop = asyncio.Event()
        # The same signals as `pluginmon run`: SIGHUP (systemd's reload) and SIGUSR1/2 must
        # not kill the server (their default action); a second stop signal exits 1 at once.
        handle = install_signal_handlers(
            asyncio.get_running_loop(),
            stop,
            on_second=forced_exit,
            on_reload=lambda: logger.info(
                "SIGHUP received: pluginmon api reads its configuration at start only; "
                "restart it to apply changes"
            ),
        )
        for signum in guard.take():
            handle(signum)
        if stop.is_set():
            logger.info("pluginmon api stopped during start-up")
            return
        logger.info(
            "pluginmon api %s starting (no sampling; event loop: %s)",
            __version__,
            loop_kind(settings.event_loop),
        )
        await serve_api(settings, url, version=__version__, stop=stop)
        logger.info("pluginmon api stopped")

    run_event_loop(main(), choice=settings.event_loop)
    return EXIT_OK
