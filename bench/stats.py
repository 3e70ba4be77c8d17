"""Small statistics shared by the bench scripts."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile by nearest rank: the value at index ``int(q * n)`` of the sorted
    values (the last one at most)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
