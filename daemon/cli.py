"""Command line: argument parsing and exit codes (0 ok, 1 runtime failure, 2 bad config/arguments)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pluginmon", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "migrate", "check-config", "status"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--config", metavar="PATH", help="TOML config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(f"pluginmon {args.command}: not wired yet", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
