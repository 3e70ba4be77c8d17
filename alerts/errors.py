"""The configuration error raised by the alerts' parsers, listing every problem by location."""

from __future__ import annotations

from collections.abc import Iterable


class RuleError(ValueError):
    """Invalid alerts/health configuration.

    ``problems`` lists every problem found as ``(location, message)``, for example
    ``("alerts.rules[1] (PluginCpuHigh).op", "must be one of > >= < <= == !=")``.
    """

    def __init__(self, problems: Iterable[tuple[str, str]]) -> None:
        self.problems: list[tuple[str, str]] = list(problems)
        super().__init__("; ".join(f"{where}: {what}" for where, what in self.problems))
