"""``pluginmon vulns import|scan|list|accept``: vulnerability tracking from the command line.

Commands on one tenant run like an API request: in one transaction as the ``pluginmon_api``
role with ``pluginmon.tenant_id`` set, so row-level security scopes them; every write is
audited as ``cli:<user>``. ``scan`` without ``--tenant`` matches every tenant's SBOMs that
changed (or all, with ``--force``) as the daemon's maintenance job does. Exit codes: 0 ok,
1 a runtime failure, 2 bad arguments (the message names the option or field).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import asyncpg

    from pluginmon.daemon.settings import Settings

VULNS_COMMAND: Final = "vulns"
FORMATS: Final = ("osv-scanner", "trivy", "grype", "cyclonedx-vex")
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2

DatabaseUrl = Callable[["Settings"], AbstractContextManager[str]]


def add_vulns_commands(sub: Any) -> None:
    vulns = sub.add_parser("vulns", help="vulnerability findings: import reports, scan SBOMs")
    actions = vulns.add_subparsers(dest="vulns_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", type=Path, help="TOML config file")
    common.add_argument("--environment", default="production", help="default: production")

    imp = actions.add_parser(
        "import", parents=[common], help="import a scanner report or a CycloneDX VEX"
    )
    imp.add_argument("--tenant", required=True)
    imp.add_argument("--plugin", required=True)
    imp.add_argument("--format", required=True, choices=FORMATS)
    imp.add_argument("file", type=Path, help="the report (JSON); - reads stdin")

    scan = actions.add_parser(
        "scan", parents=[common], help="match SBOMs offline against the OSV database"
    )
    scan.add_argument("--tenant", help="only this tenant (default: every tenant)")
    scan.add_argument("--plugin", help="only this plugin (needs --tenant)")
    scan.add_argument(
        "--db", type=Path, help="advisory directory or zip (default: vulnerability_db)"
    )
    scan.add_argument(
        "--force", action="store_true", help="also SBOMs already matched against this database"
    )

    listing = actions.add_parser("list", parents=[common], help="a plugin's findings")
    listing.add_argument("--tenant", required=True)
    listing.add_argument("--plugin", required=True)
    listing.add_argument("--status", help="only findings in this status (open, accepted, ...)")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")

    accept = actions.add_parser(
        "accept", parents=[common], help="accept an open finding's risk until a time"
    )
    accept.add_argument("--tenant", required=True)
    accept.add_argument("id", type=int, help="the finding's id")
    accept.add_argument("--reason", required=True)
    accept.add_argument("--until", required=True, help="ISO 8601 time with a zone")


class _Exit(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def run_vulns_command(args: argparse.Namespace, *, database_url: DatabaseUrl) -> int:
    from pluginmon.daemon.cli_api import url_secrets
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.logs import configure_logging
    from pluginmon.daemon.settings import load_settings

    what = f"pluginmon vulns {args.vulns_command}"
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"{what}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(
        log_format=settings.log_format, log_level="WARNING", secrets=url_secrets(settings)
    )
    import asyncpg

    from pluginmon.registry.errors import InvalidError, NotFoundError, RegistryError

    try:
        work = _command(args, settings)
        with database_url(settings) as url:
            return asyncio.run(_with_connection(url, work))
    except _Exit as exc:
        print(f"{what}: {exc.message}", file=sys.stderr)
        return exc.code
    except InvalidError as exc:
        print(f"{what}: {exc.field or 'input'}: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except NotFoundError as exc:
        print(f"{what}: {exc.message} (tenant {args.tenant})", file=sys.stderr)
        return EXIT_FAILURE
    except RegistryError as exc:
        print(f"{what}: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    except asyncpg.UndefinedTableError:
        print(f"{what}: the database has no schema yet; run `pluginmon migrate`", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        from pluginmon.daemon.logs import redact

        print(f"{what}: {redact(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILURE


async def _with_connection(
    url: str, work: Callable[[asyncpg.Connection], Coroutine[Any, Any, int]]
) -> int:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        return await work(conn)
    finally:
        await conn.close()


async def _as_tenant(conn: asyncpg.Connection, tenant: str) -> None:
    """Inside the caller's transaction: row-level security for ``tenant`` from here on."""
    from pluginmon.daemon.api_http import API_DATABASE_ROLE
    from pluginmon.storage.queries import detect_tenant_scope

    await (await detect_tenant_scope(conn)).enter(conn, tenant, role=API_DATABASE_ROLE)


def _read_json(path: Path) -> Any:
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise _Exit(EXIT_USAGE, f"file: cannot read {path}: {exc.strerror}") from None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _Exit(EXIT_USAGE, f"file: {path} is not JSON: {exc}") from None


def _command(
    args: argparse.Namespace, settings: Settings
) -> Callable[[asyncpg.Connection], Coroutine[Any, Any, int]]:
    """The work of the command; arguments are checked here, before any connection."""
    from pluginmon.registry import sboms, vulnerabilities, vulnerability_imports
    from pluginmon.registry.actor import cli_actor
    from pluginmon.registry.scan_reports import ReportFormat

    actor = cli_actor()
    now = datetime.now(UTC)
    if args.vulns_command == "import":
        document = _read_json(args.file)

        async def do_import(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                await _as_tenant(conn, args.tenant)
                r = await vulnerability_imports.import_report(
                    conn,
                    tenant_id=args.tenant,
                    actor=actor,
                    now=now,
                    plugin_name=args.plugin,
                    environment=args.environment,
                    report_format=ReportFormat(args.format),
                    document=document,
                )
            print(
                f"imported {args.format}: {r.findings} item(s), {r.opened} new, {r.fixed} fixed, "
                f"{r.suppressed} suppressed"
            )
            return EXIT_OK

        return do_import

    if args.vulns_command == "scan":
        db = args.db or settings.vulnerability_db
        if db is None:
            raise _Exit(EXIT_USAGE, "--db: no advisory database (set vulnerability_db or --db)")
        if args.plugin and not args.tenant:
            raise _Exit(EXIT_USAGE, "--plugin needs --tenant")

        async def do_scan(conn: asyncpg.Connection) -> int:
            try:
                snapshot = await sboms.VulnerabilityDatabase(db).current()
            except OSError as exc:
                raise _Exit(EXIT_USAGE, f"--db: {exc}") from None
            async with conn.transaction():
                if args.tenant:
                    await _as_tenant(conn, args.tenant)
                results = await sboms.scan_sboms(
                    conn,
                    index=snapshot.index,
                    digest=snapshot.digest,
                    now=now,
                    actor=actor,
                    plugin_name=args.plugin,
                    force=args.force or args.plugin is not None,
                )
            print(f"{snapshot.index.advisories} advisories, {len(results)} SBOM(s) scanned")
            for r in results:
                print(
                    f"{r.plugin}/{r.environment}: {r.sync.findings} finding(s), "
                    f"{r.sync.opened} new, {r.sync.fixed} fixed, {r.sync.suppressed} suppressed"
                )
            return EXIT_OK

        return do_scan

    if args.vulns_command == "list":

        async def do_list(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                await _as_tenant(conn, args.tenant)
                found = await vulnerabilities.list_findings(
                    conn,
                    args.plugin,
                    now=now,
                    environment=args.environment,
                    status=args.status,
                )
            if args.json:
                print(json.dumps([_finding_json(f) for f in found], indent=2, default=str))
                return EXIT_OK
            for f in found:
                print(
                    f"{f.id:>6} {f.status:<10} {f.severity:<8} {f.cvss_score or '':>4} "
                    f"{f.vulnerability_id:<22} {f.package_name}@{f.package_version or '?'} "
                    f"fixed:{f.fixed_version or '-'} ({f.scanner})"
                )
            return EXIT_OK

        return do_list

    try:
        until = datetime.fromisoformat(args.until)
    except ValueError:
        raise _Exit(EXIT_USAGE, "--until: not an ISO 8601 time") from None
    if until.tzinfo is None:
        raise _Exit(EXIT_USAGE, "--until: give a time zone (e.g. 2027-01-01T00:00:00Z)")

    async def do_accept(conn: asyncpg.Connection) -> int:
        async with conn.transaction():
            await _as_tenant(conn, args.tenant)
            f = await vulnerabilities.accept(
                conn,
                args.id,
                tenant_id=args.tenant,
                actor=actor,
                now=now,
                reason=args.reason,
                until=until,
            )
        print(f"finding {f.id} ({f.vulnerability_id}) accepted until {f.accepted_until}")
        return EXIT_OK

    return do_accept


def _finding_json(f: Any) -> dict[str, Any]:
    from dataclasses import asdict

    out = asdict(f)
    out["aliases"] = list(f.aliases)
    return out
