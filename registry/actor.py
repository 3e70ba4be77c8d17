"""Who acts: a token, the CLI or the daemon, with the request facts the audit trail records."""

from __future__ import annotations

import getpass
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Actor:
    """The identity behind a write. ``token_id`` is the identity for four-eyes checks: a
    free-text name is never trusted to tell two people apart."""

    name: str
    token_id: int | None = None
    operator: bool = False
    request_id: str | None = None
    source_address: str | None = None


DAEMON = Actor(name="daemon")


def cli_actor() -> Actor:
    """``cli:<user>``: the operating-system user running the command."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return Actor(name=f"cli:{user}")
