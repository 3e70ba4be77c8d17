"""Logging set-up: text or JSON lines on stderr, with secrets and URL passwords redacted."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from pluginmon.storage.dsn import SecretScrubber, redact_urls

# One log message (or traceback) is cut beyond this: a 100 KB process label logged on
# every discovery must not flood the log. Redaction runs before the cut, so a secret is
# never half-printed.
MAX_MESSAGE_CHARS = 64 * 1024

_RESERVED = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)

# Process-wide, like the root logger configure_logging() sets up: the secrets it was told
# about (the database password) are scrubbed from every line, and from redact()'s result.
_scrubber = SecretScrubber()


def redact(text: str) -> str:
    """``text`` without the known secrets, URL passwords and ``password=`` values.

    Linear in ``len(text)``: known secrets are replaced literally, and URLs are looked for
    only where ``://`` occurs (see :func:`pluginmon.storage.dsn.redact_urls`).
    """
    if _scrubber:
        text = _scrubber.scrub(text)
    return redact_urls(text)


def _bounded(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}... [{len(text) - MAX_MESSAGE_CHARS} more characters cut]"


class RedactingFilter(logging.Filter):
    """Last line of defence: renders the message once and redacts it (args, traceback and
    string extras included), then bounds its length."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format must not print raw args
            record.msg, record.args = f"<unformattable log message: {type(exc).__name__}>", None
        else:
            cleaned = _bounded(redact(message))
            if cleaned != message:
                record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = _bounded(redact(logging.Formatter().formatException(record.exc_info)))
        if record.stack_info:
            record.stack_info = _bounded(redact(record.stack_info))
        for key, value in list(record.__dict__.items()):
            if key not in _RESERVED and isinstance(value, str):
                setattr(record, key, _bounded(redact(value)))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value if isinstance(value, int | float | str | bool) else str(value)
        if record.exc_info:
            payload["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)

    def formatException(self, ei: Any) -> str:
        return _bounded(redact(super().formatException(ei)))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatException(self, ei: Any) -> str:
        return _bounded(redact(super().formatException(ei)))


def configure_logging(
    *,
    log_format: str = "text",
    log_level: str = "INFO",
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Replace the root logger's handlers with one stderr handler in the chosen format.

    ``secrets`` (see :func:`pluginmon.storage.dsn.dsn_secrets`) are scrubbed from every
    line, whatever prints them: a driver that echoes a mis-parsed URL, a traceback.
    """
    global _scrubber
    _scrubber = SecretScrubber(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log_level)
    # Third-party chatter that says nothing an operator needs at INFO.
    for noisy in ("apscheduler", "aiohttp.access", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # Skipped runs are logged once per streak by daemon.scheduling instead of on every tick.
    logging.getLogger("apscheduler.scheduler").setLevel(max(logging.ERROR, root.level))
