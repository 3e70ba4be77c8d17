"""``pluginmon deps set|remove|list|check``: plugin dependencies from the command line, and an
ERESOLVE-style report of the problems that exits 1 when there are any (for CI pipelines).

Exit codes as everywhere: 0 ok (``check``: no runtime problem), 1 a runtime failure or
(``check``) a runtime problem, 2 bad arguments. Commands that act on one tenant run as the
API's role under row-level security with the tenant set, like a request; ``check`` without
``--tenant`` reads every tenant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from pluginmon.daemon.settings import Settings
    from pluginmon.registry.dependencies import DependencyItem

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_CONFIG: Final = 2
DEPS_COMMAND: Final = "deps"

DatabaseUrl = Callable[["Settings"], AbstractContextManager[str]]


def add_deps_commands(sub: Any) -> None:
    """Register ``deps`` on the parser's subparsers (``sub``)."""
    deps = sub.add_parser("deps", help="declare plugin dependencies and check them")
    actions = deps.add_subparsers(dest="deps_command", required=True, metavar="ACTION")
    set_ = actions.add_parser(
        "set",
        help="declare PLUGIN needs DEPENDENCY in RANGE (npm semver: ^2.0.0, ~1.4, 1.x, ...)",
    )
    set_.add_argument("plugin", metavar="PLUGIN")
    set_.add_argument("dependency", metavar="DEPENDENCY")
    set_.add_argument("version_range", metavar="RANGE", nargs="?", default="*")
    set_.add_argument("--kind", choices=("runtime", "dev"), default="runtime")
    remove = actions.add_parser("remove", help="remove PLUGIN's dependency on DEPENDENCY")
    remove.add_argument("plugin", metavar="PLUGIN")
    remove.add_argument("dependency", metavar="DEPENDENCY")
    listing = actions.add_parser("list", help="PLUGIN's dependencies in one environment")
    listing.add_argument("plugin", metavar="PLUGIN")
    check = actions.add_parser(
        "check",
        help="print every unsatisfied or conflicting dependency; exit 1 if a runtime one",
    )
    for parser in (set_, remove, listing):
        parser.add_argument("--tenant", required=True, help="the tenant")
    check.add_argument("--tenant", help="only this tenant (default: every tenant)")
    for parser in (listing, check):
        parser.add_argument("--environment", help="one environment (list: production)")
        parser.add_argument("--json", action="store_true", help="JSON instead of text")
    for parser in (set_, remove, listing, check):
        parser.add_argument("--config", metavar="PATH", type=Path, help="TOML config file")


def run_deps_command(args: argparse.Namespace, *, database_url: DatabaseUrl) -> int:
    from pluginmon.daemon.cli_api import url_secrets
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.logs import configure_logging
    from pluginmon.daemon.settings import load_settings
    from pluginmon.registry.errors import InvalidError, RegistryError

    what = f"pluginmon deps {args.deps_command}"
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"{what}: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(
        log_format=settings.log_format, log_level="WARNING", secrets=url_secrets(settings)
    )
    import asyncpg

    try:
        with database_url(settings) as url:
            return asyncio.run(_run(url, args))
    except InvalidError as exc:
        print(f"{what}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
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


def _now() -> datetime:
    return datetime.now(UTC)


async def _run(url: str, args: argparse.Namespace) -> int:
    import asyncpg

    from pluginmon.registry import dependencies
    from pluginmon.registry.actor import cli_actor
    from pluginmon.storage.queries import detect_tenant_scope

    conn = await asyncpg.connect(url, timeout=10)
    try:
        async with conn.transaction():
            tenant: str | None = args.tenant
            if tenant is not None:
                # As a request does: the API's role, under row-level security for the tenant.
                scope = await detect_tenant_scope(conn)
                await scope.enter(conn, tenant, role="pluginmon_api")
            command = args.deps_command
            if command == "set":
                assert tenant is not None
                item = await dependencies.set_dependency(
                    conn,
                    args.plugin,
                    args.dependency,
                    version_range=args.version_range,
                    kind=args.kind,
                    tenant_id=tenant,
                    actor=cli_actor(),
                    now=_now(),
                )
                print(f"{item.plugin} -> {item.dependency}@{item.version_range} ({item.kind})")
                print(f"{item.environment}: {'ok' if item.satisfied else 'PROBLEM'}: {item.reason}")
                return EXIT_OK
            if command == "remove":
                assert tenant is not None
                await dependencies.remove_dependency(
                    conn,
                    args.plugin,
                    args.dependency,
                    tenant_id=tenant,
                    actor=cli_actor(),
                    now=_now(),
                )
                print(f"{args.plugin} no longer depends on {args.dependency}")
                return EXIT_OK
            if command == "list":
                found = await dependencies.list_dependencies(
                    conn, args.plugin, environment=args.environment or "production"
                )
                if args.json:
                    print(json.dumps([_json(i) for i in found], indent=2))
                else:
                    for i in found:
                        state = (
                            "ok" if i.satisfied else ("CONFLICT" if i.conflict else "UNSATISFIED")
                        )
                        print(f"{i.dependency}@{i.version_range} {i.kind} {state}: {i.reason}")
                return EXIT_OK
            problems = await dependencies.list_problems(
                conn, environment=args.environment, tenant_id=tenant
            )
    finally:
        await conn.close()
    if args.json:
        print(json.dumps([{"tenant": t, **_json(i)} for t, i in problems], indent=2))
    else:
        print(report(problems))
    return EXIT_FAILURE if any(i.gating for _, i in problems) else EXIT_OK


def _json(item: DependencyItem) -> dict[str, Any]:
    return {
        "plugin": item.plugin,
        "dependency": item.dependency,
        "version_range": item.version_range,
        "kind": item.kind,
        "environment": item.environment,
        "satisfied": item.satisfied,
        "conflict": item.conflict,
        "problem": item.problem,
        "installed_version": item.installed_version,
        "reason": item.reason,
    }


_TITLES: Final = {
    "conflict": "conflicting ranges: no version satisfies every dependent",
    "cycle": "runtime dependency cycle",
}


def report(problems: Sequence[tuple[str, DependencyItem]]) -> str:
    """npm's ERESOLVE report, per (tenant, environment, dependency): which dependent wants
    which range of what, and what is installed there. Dev problems are listed last, marked
    as not gating."""
    if not problems:
        return "pluginmon deps check: every dependency is satisfied"
    runtime = [(t, i) for t, i in problems if i.kind == "runtime"]
    dev = [(t, i) for t, i in problems if i.kind != "runtime"]
    lines = [f"pluginmon deps check: {len(runtime)} runtime problem(s), {len(dev)} dev problem(s)"]
    for heading, group in (("", runtime), (" (dev: reported, never gating)", dev)):
        by_target: dict[tuple[str, str, str], list[DependencyItem]] = defaultdict(list)
        for tenant, item in group:
            by_target[(tenant, item.environment, item.dependency)].append(item)
        for (tenant, environment, dependency), items in by_target.items():
            kinds = {i.problem for i in items}
            title = next((_TITLES[k] for k in ("cycle", "conflict") if k in kinds), "unsatisfied")
            found = items[0].installed_version
            lines += [
                "",
                f"ERESOLVE {title}{heading}",
                f"tenant {tenant}, environment {environment}",
                f"Found: {dependency}@{found}" if found else f"Found: no installed {dependency}",
                "Could not resolve dependency:",
            ]
            for i in items:
                lines.append(f'  {i.kind} {dependency}@"{i.version_range}" from {i.plugin}')
                lines.append(f"    {i.reason}")
    return "\n".join(lines)
