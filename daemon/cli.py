"""Command line: argument parsing and exit codes (0 ok, 1 runtime failure, 2 bad config/arguments)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

# Only what `run` needs before its signal guard is in place is imported at the top: the
# settings (pydantic) and the rest take a few hundred milliseconds, during which a signal
# would otherwise find the kernel's default disposition (see daemon.signal_guard).
# daemon.cli_api is light at import too (its commands import what they need).
from pluginmon.daemon.cli_api import API_COMMANDS, add_api_commands, run_api_command
from pluginmon.daemon.cli_config import CONFIG_COMMANDS, add_config_commands, run_config_command
from pluginmon.daemon.cli_deps import DEPS_COMMAND, add_deps_commands, run_deps_command
from pluginmon.daemon.cli_vulns import VULNS_COMMAND, add_vulns_commands, run_vulns_command
from pluginmon.daemon.runtime import loop_kind
from pluginmon.daemon.signal_guard import SignalGuard

if TYPE_CHECKING:
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.settings import Settings

logger = logging.getLogger("pluginmon")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pluginmon")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class _VersionAction(argparse.Action):
    """``--version``, the version looked up only when asked (importlib.metadata is slow)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the version"
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        print(f"pluginmon {version()}")  # on stdout, as argparse's own version action
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pluginmon", description="Plugin health-monitoring daemon."
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps = {
        "run": "run the daemon until SIGTERM/SIGINT",
        "migrate": "apply pending database migrations",
        "check-config": "validate the configuration; list every problem",
        "status": "per-plugin health from the database",
    }
    for name, text in helps.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--config", metavar="PATH", type=Path, help="TOML config file")
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="JSON instead of a table")
            cmd.add_argument("--tenant", help="only this tenant's plugins")
            cmd.add_argument(
                "--metrics",
                action="store_true",
                help="also each plugin's own metrics (gauges, counter rates, quantiles)",
            )
    add_api_commands(sub)  # token, audit, api (daemon/cli_api.py)
    add_config_commands(sub)  # config, secrets (daemon/cli_config.py)
    add_deps_commands(sub)  # deps set|remove|list|check (daemon/cli_deps.py)
    add_vulns_commands(sub)  # vulns (daemon/cli_vulns.py)
    return parser


def _print_problems(exc: ConfigError) -> None:
    print(f"pluginmon: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _secrets(settings: Settings) -> tuple[str, ...]:
    """What of the configured database URL must never be printed (scrubbed from logs and
    from the errors printed here, whatever a driver echoes of a mis-parsed URL)."""
    from pluginmon.storage.dsn import dsn_secrets

    if settings.database_url is None:
        return ()
    return dsn_secrets(settings.database_url.get_secret_value())


@contextmanager
def _database_url(settings: Settings) -> Iterator[str]:
    """The configured URL, or the embedded server's (started for the command if not running)."""
    if settings.database_url is not None:
        yield settings.database_url.get_secret_value()
        return
    from pluginmon.storage.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(settings.data_dir)
    server.start()
    try:
        yield server.local_url()
    finally:
        if server.started_here:
            server.stop()


def _database_failure(command: str, exc: Exception) -> int:
    """Exit 1 with the server's own message, then the condition's name and what to do."""
    from pluginmon.daemon.logs import redact
    from pluginmon.storage.reachability import condition, failure_message, failure_reason

    reason = failure_reason(exc)
    print(f"pluginmon {command}: {redact(failure_message(exc))}", file=sys.stderr)
    if reason != "error":
        print(f"pluginmon {command}: {reason}: {condition(reason).action}", file=sys.stderr)
    return EXIT_FAILURE


def _check_config(config: Path | None) -> int:
    from pluginmon.daemon.config import load
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.preflight import preflight_warnings

    try:
        resolved = load(config)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    settings = resolved.settings
    database = "embedded (under data_dir)" if settings.embedded else "PLUGINMON_DATABASE_URL"
    print(
        f"configuration OK: {len(resolved.plugins)} plugin(s)"
        f"{' + label discovery' if settings.label_discovery else ''}, "
        f"{len(resolved.rules)} rule(s), {len(resolved.webhooks)} webhook(s), "
        f"database {database}, sample every {settings.sample_interval_seconds:g} s, "
        f"HTTP {settings.http_host}:{settings.http_port}"
    )
    for field, warning in preflight_warnings(settings):
        print(f"warning: {field}: {warning}", file=sys.stderr)
    return EXIT_OK


def _migrate(config: Path | None) -> int:
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.logs import configure_logging
    from pluginmon.daemon.settings import load_settings
    from pluginmon.storage.engines import prepare_database
    from pluginmon.storage.migrate import Backend

    try:
        settings = load_settings(config)
        retention = settings.retention.to_retention()
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    configure_logging(
        log_format=settings.log_format, log_level=settings.log_level, secrets=_secrets(settings)
    )
    backend = None if settings.backend == "auto" else Backend(settings.backend)
    try:
        with _database_url(settings) as url:
            prepared = prepare_database(url, retention, backend=backend)
            result = prepared.migrations
    except Exception as exc:
        return _database_failure("migrate", exc)
    print(
        f"backend {result.backend.value}: applied {len(result.applied)} migration(s)"
        f"{': ' + ', '.join(result.applied) if result.applied else ''}; "
        f"{result.already_applied} already applied"
        + (f"; policies: {', '.join(prepared.policy_changes)}" if prepared.policy_changes else "")
    )
    return EXIT_OK


def _status(config: Path | None, as_json: bool, tenant: str | None, metrics: bool = False) -> int:
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.logs import configure_logging
    from pluginmon.daemon.settings import load_settings
    from pluginmon.daemon.status import fetch_status, format_metrics, format_table

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    configure_logging(
        log_format=settings.log_format, log_level="WARNING", secrets=_secrets(settings)
    )
    import psycopg

    try:
        with _database_url(settings) as url:
            rows = fetch_status(url, tenant=tenant, metrics=metrics)
    except psycopg.errors.UndefinedTable:
        print(
            "pluginmon status: the database has no pluginmon schema yet; "
            "run `pluginmon migrate` or `pluginmon run` first",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except Exception as exc:
        return _database_failure("status", exc)
    if as_json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        print(format_table(rows))
        if metrics:
            print()
            print(format_metrics(rows))
    return EXIT_OK


def _run(config: Path | None) -> int:
    # First, before anything slow: from here no signal kills the daemon without a flush.
    guard = SignalGuard()
    guard.install()
    from pluginmon.daemon.app import run_daemon
    from pluginmon.daemon.config import load
    from pluginmon.daemon.config_schema import ConfigError
    from pluginmon.daemon.logs import configure_logging
    from pluginmon.daemon.preflight import preflight_warnings

    try:
        resolved = load(config)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    settings = resolved.settings
    configure_logging(
        log_format=settings.log_format, log_level=settings.log_level, secrets=_secrets(settings)
    )
    logger.info("pluginmon %s starting (event loop: %s)", version(), loop_kind(settings.event_loop))
    for field, warning in preflight_warnings(settings):
        logger.warning("%s: %s", field, warning)
    return run_daemon(resolved, version=version(), config_path=config, guard=guard)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in API_COMMANDS:
        return run_api_command(args, database_url=_database_url)
    if args.command in CONFIG_COMMANDS:
        return run_config_command(args, database_url=_database_url)
    if args.command == DEPS_COMMAND:
        return run_deps_command(args, database_url=_database_url)
    if args.command == VULNS_COMMAND:
        return run_vulns_command(args, database_url=_database_url)
    config: Path | None = args.config
    if args.command == "check-config":
        return _check_config(config)
    if args.command == "migrate":
        return _migrate(config)
    if args.command == "status":
        return _status(config, args.json, args.tenant, args.metrics)
    return _run(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
