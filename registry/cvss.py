"""CVSS v3.x base scores from a vector string, and the qualitative severity of a score.

The formula is the CVSS v3.1 specification's (section 7.1 and Appendix A's Roundup); a v3.0
vector is scored with it too (the two differ only in Roundup's floating-point guard). Other
versions (v2, v4) are not computed here: the caller falls back to the severity a scanner
reported, or ``unknown``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Severity(StrEnum):
    """The values of plugin_vulnerabilities.severity, least to most severe."""

    UNKNOWN = "unknown"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK: Final = {s: i for i, s in enumerate(Severity)}

_WEIGHTS: Final[dict[str, dict[str, float]]] = {
    "AV": {"N": 0.85, "A": 0.62, "L": 0.55, "P": 0.2},
    "AC": {"L": 0.77, "H": 0.44},
    "UI": {"N": 0.85, "R": 0.62},
    "C": {"H": 0.56, "L": 0.22, "N": 0.0},
    "I": {"H": 0.56, "L": 0.22, "N": 0.0},
    "A": {"H": 0.56, "L": 0.22, "N": 0.0},
}
# Privileges Required weighs more when the scope changes.
_PR_UNCHANGED: Final = {"N": 0.85, "L": 0.62, "H": 0.27}
_PR_CHANGED: Final = {"N": 0.85, "L": 0.68, "H": 0.5}
_BASE_METRICS: Final = ("AV", "AC", "PR", "UI", "S", "C", "I", "A")


class CvssError(ValueError):
    """The vector is not a CVSS v3 base vector; the message names the part that is wrong."""


@dataclass(frozen=True, slots=True)
class CvssScore:
    vector: str
    base_score: float
    severity: Severity


def roundup(value: float) -> float:
    """The smallest number with one decimal that is >= ``value`` (CVSS v3.1 Appendix A)."""
    scaled = round(value * 100_000)
    if scaled % 10_000 == 0:
        return scaled / 100_000.0
    return (math.floor(scaled / 10_000) + 1) / 10.0


def severity_of_score(score: float) -> Severity:
    """The qualitative rating of a base score. 0.0 ("None") is recorded as low: a finding
    someone reported is never below low here."""
    if score >= 9.0:
        return Severity.CRITICAL
    if score >= 7.0:
        return Severity.HIGH
    if score >= 4.0:
        return Severity.MEDIUM
    return Severity.LOW


def base_score(vector: str) -> CvssScore:
    """Score a ``CVSS:3.1/AV:N/AC:L/...`` (or 3.0) vector; temporal/environmental metrics in
    the vector are accepted and ignored (the base score is what advisories publish)."""
    parts = vector.strip().split("/")
    if not parts or parts[0] not in ("CVSS:3.1", "CVSS:3.0"):
        raise CvssError(f"not a CVSS v3 vector (prefix {parts[0][:16]!r})")
    metrics: dict[str, str] = {}
    for part in parts[1:]:
        name, sep, value = part.partition(":")
        if not sep or not value:
            raise CvssError(f"malformed metric {part[:16]!r}")
        if name in metrics:
            raise CvssError(f"metric {name} given twice")
        metrics[name] = value
    missing = [m for m in _BASE_METRICS if m not in metrics]
    if missing:
        raise CvssError(f"base metric(s) missing: {', '.join(missing)}")
    scope = metrics["S"]
    if scope not in ("U", "C"):
        raise CvssError(f"S must be U or C, not {scope[:4]!r}")
    changed = scope == "C"
    weights: dict[str, float] = {}
    for name, table in (*_WEIGHTS.items(), ("PR", _PR_CHANGED if changed else _PR_UNCHANGED)):
        value = metrics[name]
        if value not in table:
            raise CvssError(f"{name}:{value[:4]} is not a valid value")
        weights[name] = table[value]
    iss = 1.0 - (1.0 - weights["C"]) * (1.0 - weights["I"]) * (1.0 - weights["A"])
    impact = 7.52 * (iss - 0.029) - 3.25 * (iss - 0.02) ** 15 if changed else 6.42 * iss
    exploitability = 8.22 * weights["AV"] * weights["AC"] * weights["PR"] * weights["UI"]
    if impact <= 0:
        score = 0.0
    elif changed:
        score = roundup(min(1.08 * (impact + exploitability), 10.0))
    else:
        score = roundup(min(impact + exploitability, 10.0))
    return CvssScore(vector=vector.strip(), base_score=score, severity=severity_of_score(score))


def severity_of_label(label: str | None) -> Severity:
    """A scanner's own rating ("HIGH", "Critical", "moderate", "Negligible") as ours."""
    text = (label or "").strip().lower()
    if text in ("critical",):
        return Severity.CRITICAL
    if text in ("high", "important"):
        return Severity.HIGH
    if text in ("medium", "moderate"):
        return Severity.MEDIUM
    if text in ("low", "negligible", "none", "info", "informational"):
        return Severity.LOW
    return Severity.UNKNOWN
