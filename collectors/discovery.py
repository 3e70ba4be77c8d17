"""Matching processes to plugin specs: matchers, env-label discovery, lazy per-process metadata."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from pluginmon.collectors.labels import LabelRejection, parse_labels, parse_metrics_url
from pluginmon.collectors.models import PluginKey, PluginSpec
from pluginmon.collectors.patterns import Pattern, cmdline_text, compile_pattern, compile_union
from pluginmon.collectors.source import ProcessAccessDenied, ProcessGone, ProcessSource, comm_of
from pluginmon.collectors.specs import DEFAULT_ENVIRONMENT

# comm in /proc/PID/stat is cut at 15 bytes (TASK_COMM_LEN - 1).
_COMM_MAX = 15


@dataclass(frozen=True, slots=True)
class CompiledSpec:
    spec: PluginSpec
    cmdline_re: Pattern | None
    env_pair: tuple[str, str] | None
    systemd_unit: str | None
    # True when the spec has criteria other than pidfile (those are matched once per identity;
    # the pidfile is re-read every cycle because it changes on restarts).
    has_static_criteria: bool

    @classmethod
    def build(cls, spec: PluginSpec) -> CompiledSpec:
        m = spec.match
        env_pair = None
        if m.env is not None:
            key, _, value = m.env.partition("=")
            env_pair = (key, value)
        unit = m.systemd_unit
        if unit is not None and "." not in unit:
            unit += ".service"  # as systemctl does
        static = any(
            v is not None for v in (m.name, m.exe, m.cmdline, m.cgroup, m.env, m.systemd_unit)
        )
        return cls(
            spec=spec,
            cmdline_re=compile_pattern(m.cmdline) if m.cmdline is not None else None,
            env_pair=env_pair,
            systemd_unit=unit,
            has_static_criteria=static,
        )


class ProcessFacts:
    """One process's metadata, each item read from the source at most once, on first use.

    Read failures make the criterion that needed them not match, and are remembered in
    `gone` / `denied` for the cycle's error counts; `searches` counts the regex searches
    made in the command line, for the cycle's match budget.
    """

    __slots__ = (
        "_cgroup",
        "_cmdline",
        "_comm",
        "_environ",
        "_exe",
        "_text",
        "denied",
        "gone",
        "pid",
        "searches",
        "source",
    )

    def __init__(self, source: ProcessSource, pid: int, comm_raw: bytes) -> None:
        self.source = source
        self.pid = pid
        self._comm = comm_of(comm_raw)
        self._cmdline: list[str] | None = None
        self._text: bytes | None = None
        self._exe: str | None = None
        self._environ: dict[str, str] | None = None
        self._cgroup: str | None = None
        self.gone = False
        self.denied = False
        self.searches = 0

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, ProcessGone):
            self.gone = True
        else:
            self.denied = True

    def cmdline(self) -> list[str]:
        if self._cmdline is None:
            try:
                self._cmdline = self.source.cmdline(self.pid)
            except (ProcessGone, ProcessAccessDenied) as exc:
                self._failed(exc)
                self._cmdline = []
        return self._cmdline

    def search_cmdline(self, pattern: Pattern) -> bool:
        """Whether ``pattern`` occurs in the command line as cmdline_text() gives it."""
        if self._text is None:
            self._text = cmdline_text(self.cmdline())
        self.searches += 1
        return pattern.search(self._text)

    def name(self) -> str:
        """Like psutil's name(): comm, extended from argv[0] when the kernel truncated it."""
        name = os.fsdecode(self._comm)
        if len(self._comm) >= _COMM_MAX:
            args = self.cmdline()
            if args:
                extended = os.path.basename(args[0])
                if extended.startswith(name):
                    return extended
        return name

    def exe(self) -> str:
        if self._exe is None:
            try:
                self._exe = self.source.exe(self.pid)
            except (ProcessGone, ProcessAccessDenied) as exc:
                self._failed(exc)
                self._exe = ""
        return self._exe

    def environ(self) -> dict[str, str]:
        if self._environ is None:
            try:
                self._environ = self.source.environ(self.pid)
            except (ProcessGone, ProcessAccessDenied) as exc:
                self._failed(exc)
                self._environ = {}
        return self._environ

    def cgroup(self) -> str:
        if self._cgroup is None:
            try:
                self._cgroup = self.source.cgroup(self.pid) or ""
            except (ProcessGone, ProcessAccessDenied) as exc:
                self._failed(exc)
                self._cgroup = ""
        return self._cgroup


def matches_static(compiled: CompiledSpec, facts: ProcessFacts) -> bool:
    """Whether every non-pidfile criterion of the spec holds (AND); cheapest checks first."""
    m = compiled.spec.match
    if m.name is not None and facts.name() != m.name:
        return False
    if compiled.cmdline_re is not None and not facts.search_cmdline(compiled.cmdline_re):
        return False
    if m.exe is not None and facts.exe() != m.exe:
        return False
    if m.cgroup is not None:
        path = facts.cgroup()
        if not path or not fnmatch.fnmatchcase(path, m.cgroup):
            return False
    if compiled.systemd_unit is not None and compiled.systemd_unit not in facts.cgroup().split("/"):
        return False
    if compiled.env_pair is not None:
        key, value = compiled.env_pair
        if facts.environ().get(key) != value:
            return False
    return True


def cmdline_prefilter(
    compiled: tuple[CompiledSpec, ...],
) -> tuple[Pattern | None, frozenset[int]]:
    """One pattern that finds any of the specs' cmdline patterns, and the specs it covers.

    Most new processes match no spec; one search then rules out every covered spec instead
    of one search per spec. With RE2 every pattern can take part (no back-references to
    renumber, inline flags stay in their group); only a union too large for RE2's memory
    budget means no prefilter.
    """
    covered = [i for i, c in enumerate(compiled) if c.cmdline_re is not None]
    if len(covered) < 2:
        return None, frozenset()
    union = compile_union([c.cmdline_re.text for c in compiled if c.cmdline_re is not None])
    if union is None:
        return None, frozenset()
    return union, frozenset(covered)


def label_key(environ: dict[str, str]) -> PluginKey | LabelRejection | None:
    """The plugin a process declares with PLUGINMON_* environment labels: its key, None when
    it declares none, or why its labels are refused (collectors.labels)."""
    return parse_labels(environ, default_environment=DEFAULT_ENVIRONMENT)


def metrics_url_label(environ: dict[str, str]) -> str | LabelRejection | None:
    """The loopback URL of the metrics endpoint a process declares with
    PLUGINMON_METRICS_PORT/PATH, None when it declares none, or why it is refused."""
    return parse_metrics_url(environ)


def read_pidfile(path: str) -> int | None:
    """The pid a pidfile names, or None when it is missing or malformed."""
    try:
        with open(path, "rb") as f:
            return int(f.read(64).split()[0])
    except (OSError, ValueError, IndexError):
        return None
