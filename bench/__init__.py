"""Benchmarks, run by hand; each prints its headline figure as name=value on its last line."""
