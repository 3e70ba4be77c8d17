"""One sampling cycle over every plugin's processes into a Snapshot (blocking: run it in a thread).

Over 500 lines on purpose: attribution (matched processes, descendants, pid reuse,
restarts) and CPU-time accounting share one pass over the process table per cycle; splitting
them would add a second pass to the hot path that bench/sampler.py measures.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

from pluginmon.collectors.discovery import (
    CompiledSpec,
    ProcessFacts,
    cmdline_prefilter,
    label_key,
    matches_static,
    metrics_url_label,
    read_pidfile,
)
from pluginmon.collectors.models import PluginKey, PluginSample, PluginSpec, Snapshot
from pluginmon.collectors.patterns import MATCH_BUDGET_PER_CYCLE, Pattern
from pluginmon.collectors.source import (
    FIELD_CTX_SWITCHES,
    FIELD_FDS,
    FIELD_IO,
    FIELD_SWAP,
    FIELD_USS,
    OPTIONAL_FIELDS,
    ProcessAccessDenied,
    ProcessGone,
    ProcessSource,
    StatRow,
)
from pluginmon.collectors.stats import DiscoveryStats

logger = logging.getLogger(__name__)

# The lean default: everything one read of /proc/PID/stat gives. Always collected.
DEFAULT_FIELDS = frozenset({"cpu", "rss", "vms", "threads", "ppid", "start_time"})
ALL_FIELDS = DEFAULT_FIELDS | OPTIONAL_FIELDS
# Cycles a vanished label-discovered plugin is still emitted (up=False) before it is dropped.
LABEL_GRACE_CYCLES = 3
ERROR_KINDS = ("access_denied", "no_such_process", "zombie")


def boot_clock() -> float:
    """Seconds since boot, the timeline of /proc start times (keeps counting across suspend)."""
    if _CLOCK_BOOTTIME is not None:
        return time.clock_gettime(_CLOCK_BOOTTIME)
    # Elsewhere (the psutil path) start times are create_time - boot_time: the same line.
    return time.time() - _psutil_boot_time()


_CLOCK_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def _psutil_boot_time() -> float:
    import psutil

    return float(psutil.boot_time())


def utc_now() -> datetime:
    return datetime.now(UTC)


def default_source(proc_root: str = "/proc") -> ProcessSource:
    """The /proc fast path on Linux, psutil elsewhere."""
    if sys.platform.startswith("linux"):
        from pluginmon.collectors.procfs import ProcfsSource

        return ProcfsSource(proc_root)
    if proc_root != "/proc":
        raise ValueError("proc_root is only supported on Linux")
    from pluginmon.collectors.psutil_source import PsutilSource

    return PsutilSource()


class _PluginState:
    """What the sampler remembers about one plugin between cycles, plus this cycle's sums."""

    __slots__ = (
        "cpu_ticks",
        "ctx_invol_total",
        "ctx_vol_total",
        "cycle",
        "fds",
        "key",
        "last_root",
        "metrics_url",
        "missing_cycles",
        "oldest_cache",
        "oldest_start",
        "origin",
        "pids",
        "read_total",
        "root",
        "rss",
        "swap",
        "threads",
        "uss",
        "vms",
        "write_total",
    )

    def __init__(self, key: PluginKey, origin: str) -> None:
        self.key = key
        self.origin = origin
        # Cumulative counters: sums of per-process deltas, so they only ever grow.
        self.read_total = 0
        self.write_total = 0
        self.ctx_vol_total = 0
        self.ctx_invol_total = 0
        self.last_root: tuple[int, float] | None = None
        self.missing_cycles = 0
        self.oldest_cache: tuple[float, datetime] | None = None
        # The metrics endpoint a label-discovered plugin's processes declare (the latest).
        self.metrics_url: str | None = None
        self.cycle = -1
        self._reset_cycle()

    def _reset_cycle(self) -> None:
        self.cpu_ticks = 0.0
        self.rss = 0
        self.vms = 0
        self.threads = 0
        self.pids: list[int] = []
        self.oldest_start: float | None = None
        self.root: tuple[float, int] | None = None
        self.fds: int | None = None
        self.uss: int | None = None
        self.swap: int | None = None

    def begin_cycle(self, cycle: int) -> None:
        self.cycle = cycle
        self._reset_cycle()


class _Proc:
    """One process identity (pid, start time) as the sampler tracks it."""

    __slots__ = (
        "base",
        "base_row",
        "cmdline",
        "comm",
        "config_matches",
        "cpu_cycle",
        "credit_cpu",
        "credit_read",
        "credit_write",
        "ctx_invol",
        "ctx_vol",
        "deferred",
        "direct",
        "owner",
        "pid",
        "read",
        "recheck",
        "row",
        "seen",
        "stamp",
        "start",
        "sticky",
        "write",
    )

    def __init__(self, row: StatRow) -> None:
        self.pid = row[0]
        self.start = row[2]
        self.comm = b""
        self.cmdline: list[str] | None = None
        self.row = row
        self.seen = -1
        self.recheck = True
        self.deferred = False  # not matched yet: the cycle's match budget ran out first
        # Matching: `direct` = plugin this process itself matches (None: inherits from ancestors).
        self.config_matches: tuple[int, ...] = ()
        self.base: _PluginState | None = (
            None  # static match result (first non-pidfile spec or label)
        )
        self.direct: _PluginState | None = None
        self.owner: _PluginState | None = None
        self.sticky: _PluginState | None = None  # inherited owner, kept if orphaned
        self.stamp = -1
        # Baselines for deltas.
        self.cpu_cycle = -1
        self.base_row: StatRow | None = None  # row of the last cycle it was attributed
        self.credit_cpu = 0.0
        self.read: int | None = None
        self.write: int | None = None
        self.credit_read = 0
        self.credit_write = 0
        self.ctx_vol: int | None = None
        self.ctx_invol: int | None = None


def _opt_add(total: int | None, value: int | None) -> int | None:
    if value is None:
        return total
    return value if total is None else total + value


def _counter_delta(previous: int | None, current: int, credit: int) -> tuple[int, int]:
    """(added, credit used): what a cumulative per-process counter adds to its plugin.

    A process seen for the first time contributes everything it counted since it started.
    `credit` is what its reaped children already contributed, which the kernel has now
    folded into this process's own counter.
    """
    if previous is None:
        return current, 0
    delta = current - previous
    if delta <= 0:
        return 0, 0
    used = min(credit, delta)
    return delta - used, used


class Sampler:
    """Finds every plugin's processes and samples them; one `sample()` call = one Snapshot.

    Cheap per cycle: one read of /proc/PID/stat per process; processes are matched against
    specs only when first seen as a (pid, start time) identity, again on their second cycle
    (to see through fork-then-exec) and whenever their comm changes (exec). Opt-in fields
    are read only for processes that belong to a plugin.

    A plugin is its matched processes plus their descendants that no other spec matches
    (first matching spec wins; config specs before env labels); a descendant orphaned by
    its parent's exit stays with the plugin it was seen under.

    cpu_percent is CPU time used since the previous sample over the wall time between them:
    deltas for processes seen at both; everything for processes born in between; children
    that lived and died in between through their parent's reaped-children time (minus what
    was already counted for them). CPU a process used between the last sample and its exit
    is lost when its parent is not in the plugin (nothing can be read after the exit). The
    first cycle reports each process's lifetime-average rate.

    Configured plugins are always in the snapshot (up=False, zero usage, counters kept when
    nothing runs); label-discovered ones for `label_grace_cycles` cycles after their last
    process vanished, then dropped.

    Untrusted process data is bounded: PLUGINMON_* labels are checked before use
    (collectors.labels; a refused process is skipped and counted in `stats`), cmdline
    patterns run on RE2 over at most the first 4096 bytes (collectors.patterns), and one
    cycle makes at most `match_budget_per_cycle` regex searches: processes left when it runs
    out are matched on a later cycle (counted in `stats` too).
    """

    def __init__(
        self,
        specs: Sequence[PluginSpec],
        *,
        proc_root: str = "/proc",
        label_discovery: bool = True,
        fields: frozenset[str] = DEFAULT_FIELDS,
        host: str | None = None,
        clock: Callable[[], float] = boot_clock,
        wall_clock: Callable[[], datetime] = utc_now,
        source: ProcessSource | None = None,
        label_grace_cycles: int = LABEL_GRACE_CYCLES,
        optional_every_cycles: int = 1,
        match_budget_per_cycle: int = MATCH_BUDGET_PER_CYCLE,
    ) -> None:
        unknown = set(fields) - ALL_FIELDS
        if unknown:
            raise ValueError(
                f"unknown sample fields {sorted(unknown)}; known: {', '.join(sorted(ALL_FIELDS))}"
            )
        self._source = source if source is not None else default_source(proc_root)
        self._label_discovery = label_discovery
        self._optional = frozenset(fields) & OPTIONAL_FIELDS
        self._host = host if host is not None else socket.gethostname()
        self._clock = clock
        self._wall_clock = wall_clock
        self._label_grace = label_grace_cycles
        if optional_every_cycles < 1:
            raise ValueError("optional_every_cycles must be >= 1")
        # Opt-in fields can be read on every Nth cycle only; in the others they are None.
        self._optional_every = optional_every_cycles
        if match_budget_per_cycle < 1:
            raise ValueError("match_budget_per_cycle must be >= 1")
        self._match_budget = match_budget_per_cycle
        self._budget_left = match_budget_per_cycle
        self._deferred_this_cycle = 0
        # Exported by the daemon (a prometheus-client Collector); read from any thread.
        self.stats = DiscoveryStats()
        self._tps = float(self._source.ticks_per_second)
        self._boot_wall = self._source.boot_time()
        self._lock = threading.Lock()
        self._pending_specs: tuple[PluginSpec, ...] | None = None
        self._compiled: tuple[CompiledSpec, ...] = ()
        self._prefilter: Pattern | None = None
        self._prefiltered: frozenset[int] = frozenset()
        self._config_states: list[_PluginState] = []
        self._states_by_key: dict[PluginKey, _PluginState] = {}
        self._label_states: dict[PluginKey, _PluginState] = {}
        # Published whole at the end of each cycle: read from other threads without a lock.
        self._metrics_endpoints: tuple[tuple[PluginKey, str], ...] = ()
        self._known: dict[int, _Proc] = {}
        self._cycle = 0
        self._prev_now: float | None = None
        self._install_specs(tuple(specs))

    @property
    def fields(self) -> frozenset[str]:
        return DEFAULT_FIELDS | self._optional

    @property
    def metrics_endpoints(self) -> tuple[tuple[PluginKey, str], ...]:
        """(plugin, loopback URL) of the metrics endpoints that label-discovered plugins
        declare (PLUGINMON_METRICS_PORT/PATH), as of the last cycle; safe from any thread."""
        return self._metrics_endpoints

    def update_specs(self, specs: Sequence[PluginSpec]) -> None:
        """Replace the plugin specs (config reload); applied at the start of the next sample().

        Safe to call from another thread while a sample is running. Every known process is
        re-matched on the next cycle; counters of plugins that stay are kept.
        """
        self._pending_specs = tuple(specs)

    def _install_specs(self, specs: tuple[PluginSpec, ...]) -> None:
        old = {**self._label_states, **self._states_by_key}
        self._compiled = tuple(CompiledSpec.build(s) for s in specs)
        self._states_by_key = {}
        self._config_states = []
        for spec in specs:
            state = self._states_by_key.get(spec.key)
            if state is None:
                state = old.pop(spec.key, None) or _PluginState(spec.key, spec.origin)
                state.origin = spec.origin
                self._states_by_key[spec.key] = state
            self._config_states.append(state)
        # Label-discovered plugins that are now configured become config plugins.
        self._label_states = {
            k: s for k, s in self._label_states.items() if k not in self._states_by_key
        }
        self._has_pidfile = any(c.spec.match.pidfile is not None for c in self._compiled)
        self._prefilter, self._prefiltered = cmdline_prefilter(self._compiled)
        for proc in self._known.values():
            proc.recheck = True
            proc.cmdline = None  # forces a full re-match (see _confirm)
            proc.sticky = None

    # -- matching ---------------------------------------------------------------------------

    def _label_state(self, key: PluginKey) -> _PluginState:
        state = self._states_by_key.get(key) or self._label_states.get(key)
        if state is None:
            state = _PluginState(key, "label")
            self._label_states[key] = state
            logger.info(
                "discovered plugin %s/%s (%s) from process labels",
                key.tenant,
                key.plugin,
                key.environment,
            )
        return state

    def _match(self, proc: _Proc, row: StatRow, is_new: bool, errors: dict[str, int]) -> None:
        if self._budget_left <= 0:
            # Out of regex searches for this cycle: matched on a later one. Until then a new
            # process belongs to no plugin (or inherits its parent's); an exec'd one keeps
            # its old attribution.
            proc.deferred = True
            self._deferred_this_cycle += 1
            return
        proc.deferred = False
        facts = ProcessFacts(self._source, proc.pid, row[8])
        first: _PluginState | None = None
        matches: list[int] = []
        ruled_out: frozenset[int] = frozenset()
        if self._prefilter is not None and not facts.search_cmdline(self._prefilter):
            ruled_out = self._prefiltered
        for index, compiled in enumerate(self._compiled):
            if not compiled.has_static_criteria or index in ruled_out:
                continue  # pidfile-only (decided per cycle from the file), or cannot match
            if matches_static(compiled, facts):
                if compiled.spec.match.pidfile is not None:
                    matches.append(index)
                    continue
                matches.append(index)
                first = self._config_states[index]
                break  # a spec without pidfile always matches: later specs cannot win
        label: _PluginState | None = None
        if first is None and self._label_discovery:
            found = label_key(facts.environ())
            if isinstance(found, PluginKey):
                label = self._label_state(found)
                endpoint = metrics_url_label(facts.environ())
                if isinstance(endpoint, str):
                    label.metrics_url = endpoint
                elif endpoint is not None:  # the plugin is sampled; only its endpoint is refused
                    self.stats.report_rejection(proc.pid, endpoint, now=self._clock())
            elif found is not None:
                self.stats.report_rejection(proc.pid, found, now=self._clock())
        self._budget_left -= facts.searches
        proc.cmdline = facts.cmdline()  # kept to notice an exec on the second sighting
        proc.config_matches = tuple(matches)
        proc.base = proc.direct = first if first is not None else label
        proc.comm = row[8]
        proc.recheck = is_new
        if facts.gone:
            errors["no_such_process"] += 1
        if facts.denied:
            errors["access_denied"] += 1

    def _confirm(self, proc: _Proc, row: StatRow, errors: dict[str, int]) -> None:
        """Second sighting: re-match only if the command line changed since the first.

        A process first seen between fork and exec still shows its parent's program; exec
        almost always changes comm (checked every cycle) or the command line (checked here).
        """
        proc.recheck = False
        try:
            cmdline = self._source.cmdline(proc.pid)
        except ProcessGone:
            errors["no_such_process"] += 1
            return
        except ProcessAccessDenied:
            cmdline = None
        if cmdline is None or cmdline != proc.cmdline:
            self._match(proc, row, False, errors)

    def _pidfile_targets(self) -> dict[int, list[int]]:
        targets: dict[int, list[int]] = {}
        for index, compiled in enumerate(self._compiled):
            path = compiled.spec.match.pidfile
            if path is not None:
                pid = read_pidfile(path)
                if pid is not None:
                    targets.setdefault(pid, []).append(index)
        return targets

    def _pidfile_direct(self, proc: _Proc, targets: dict[int, list[int]]) -> _PluginState | None:
        """First spec that claims the process this cycle, pidfile specs included, in order."""
        claimed = targets.get(proc.pid, ())
        candidates = sorted(
            {i for i in proc.config_matches}
            | {i for i in claimed if not self._compiled[i].has_static_criteria}
        )
        for index in candidates:
            pidfile = self._compiled[index].spec.match.pidfile
            if pidfile is None or index in claimed:
                return self._config_states[index]
        # Not claimed by a config spec this cycle: its env labels (if any) decide.
        return proc.base if proc.base is not None and proc.base.origin == "label" else None

    # -- the cycle --------------------------------------------------------------------------

    def sample(self) -> Snapshot:
        """Sample every plugin once. BLOCKING (reads /proc): the daemon runs it through
        `asyncio.to_thread`. Never raises for one bad process: failures are counted per kind
        in `Snapshot.errors`. Not re-entrant; concurrent calls are serialised.
        """
        with self._lock:
            return self._sample()

    def _sample(self) -> Snapshot:
        pending = self._pending_specs
        if pending is not None:
            self._pending_specs = None
            self._install_specs(pending)
        started = time.perf_counter()
        wall = self._wall_clock()
        now = self._clock()
        scan = self._source.scan()
        self._cycle += 1
        cycle = self._cycle
        errors = {"access_denied": scan.denied, "no_such_process": scan.gone, "zombie": 0}
        self._budget_left = self._match_budget
        self._deferred_this_cycle = 0

        # 1. Identities: reuse what we know about (pid, start); match new ones.
        old = self._known
        new: dict[int, _Proc] = {}
        zombies = 0
        for row in scan.rows:
            if row[9] == b"Z":
                zombies += 1  # dead, waiting to be reaped: no longer uses anything
                continue
            pid = row[0]
            proc = old.get(pid)
            if proc is None or proc.start != row[2]:
                proc = _Proc(row)
                self._match(proc, row, True, errors)
            elif proc.deferred:
                self._match(proc, row, True, errors)
            elif proc.comm != row[8]:
                self._match(proc, row, False, errors)  # exec'd into another program
            elif proc.recheck:
                self._confirm(proc, row, errors)
            proc.row = row
            proc.seen = cycle
            new[pid] = proc
        errors["zombie"] = zombies
        if self._deferred_this_cycle:
            self.stats.report_budget_exhausted(
                deferred=self._deferred_this_cycle, budget=self._match_budget, now=self._clock()
            )

        # 2. Vanished processes: what they last showed was already counted; when their
        # parent reaps them the kernel adds their totals to the parent's children-cpu and
        # io counters, so that part is subtracted there instead of counted twice.
        for proc in old.values():
            if proc.seen == cycle or proc.owner is None:
                continue
            parent = new.get(proc.row[1])
            if parent is None or parent is not old.get(proc.row[1]):
                continue
            if proc.cpu_cycle == cycle - 1 and proc.base_row is not None:
                parent.credit_cpu += proc.base_row[3] + proc.base_row[4]
            if proc.read is not None:
                parent.credit_read += proc.read
            if proc.write is not None:
                parent.credit_write += proc.write

        # 3. Attribution: own match, else nearest ancestor's plugin, else (orphaned) the
        # plugin it was inherited from before.
        if self._has_pidfile:
            targets = self._pidfile_targets()
            for proc in new.values():
                if proc.config_matches or proc.pid in targets:
                    proc.direct = self._pidfile_direct(proc, targets)
                else:
                    proc.direct = proc.base
        for proc in new.values():
            if proc.stamp == cycle:
                continue
            chain: list[_Proc] = []
            p = proc
            top: _PluginState | None
            while True:
                if p.direct is not None:
                    top = p.owner = p.direct
                    p.stamp = cycle
                    break
                if p.stamp == cycle:
                    top = p.owner
                    break
                chain.append(p)
                parent = new.get(p.row[1])
                if parent is None or parent is p or len(chain) > 4096:
                    top = None
                    break
                p = parent
            for c in reversed(chain):
                if top is None:
                    top = c.sticky
                else:
                    c.sticky = top
                c.owner = top
                c.stamp = cycle

        # 4. Per-plugin sums.
        prev_now = self._prev_now
        interval = (now - prev_now) if prev_now is not None else 1.0
        if interval <= 0:
            interval = 1e-9
        tps = self._tps
        one_tick = 1.0 / tps
        previous_cycle = cycle - 1
        active: list[_PluginState] = []
        owned: list[_Proc] = []
        for proc in new.values():
            st = proc.owner
            if st is None:
                continue
            if st.cycle != cycle:
                st.begin_cycle(cycle)
                active.append(st)
            row = proc.row
            base = proc.base_row
            if proc.cpu_cycle == previous_cycle and base is not None:
                if row is not base:  # the scan hands back the same row when nothing changed
                    delta_kids = row[4] - base[4]
                    if proc.credit_cpu and delta_kids > 0:
                        used = min(proc.credit_cpu, delta_kids)
                        proc.credit_cpu -= used
                        delta_kids -= used
                    delta = row[3] - base[3] + delta_kids
                    if delta > 0:
                        st.cpu_ticks += delta
            else:
                start_s = row[2] / tps
                if prev_now is not None and start_s >= prev_now - one_tick:
                    st.cpu_ticks += row[3] + row[4]  # born during the interval: all of it is new
                else:
                    # Existed before but no baseline (first cycle, or newly attributed):
                    # assume it ran at its lifetime-average rate.
                    age = max(now - start_s, one_tick)
                    st.cpu_ticks += (row[3] + row[4]) * interval / age
                proc.credit_cpu = 0.0
            proc.base_row = row
            proc.cpu_cycle = cycle
            st.rss += row[7]
            st.vms += row[6]
            st.threads += row[5]
            st.pids.append(proc.pid)
            start = row[2]
            if st.oldest_start is None or start < st.oldest_start:
                st.oldest_start = start
            if proc.direct is st:  # roots are matched processes whose parent is not ours
                parent = new.get(row[1])
                if parent is None or parent.owner is not st:
                    candidate = (start, proc.pid)
                    if st.root is None or candidate < st.root:
                        st.root = candidate
            owned.append(proc)

        optional = self._optional if (cycle - 1) % self._optional_every == 0 else frozenset()
        if optional:
            self._sample_extras(owned, optional, errors)

        # 5. Samples: every configured plugin, plus label-discovered ones (kept for a grace
        # number of cycles after their processes vanish).
        samples: list[PluginSample] = []
        cpu_scale = 100.0 / tps / interval
        make = self._plugin_sample
        for state in self._states_by_key.values():
            samples.append(make(state, state.cycle == cycle, wall, cpu_scale, optional))
        # Label-discovered plugins come after the configured ones, in discovery order.
        for key, state in list(self._label_states.items()):
            if state.cycle == cycle:
                state.missing_cycles = 0
            else:
                state.missing_cycles += 1
                if state.missing_cycles > self._label_grace:
                    del self._label_states[key]
                    logger.info(
                        "dropping vanished plugin %s/%s (%s)",
                        key.tenant,
                        key.plugin,
                        key.environment,
                    )
                    continue
            samples.append(make(state, state.cycle == cycle, wall, cpu_scale, optional))
        self._metrics_endpoints = tuple(
            (key, state.metrics_url)
            for key, state in self._label_states.items()
            if state.metrics_url is not None
        )

        self._known = new
        self._prev_now = now
        return Snapshot(
            timestamp=wall,
            host=self._host,
            samples=tuple(samples),
            duration_seconds=time.perf_counter() - started,
            processes_seen=len(new),
            errors=tuple((kind, errors[kind]) for kind in ERROR_KINDS),
        )

    def _sample_extras(
        self, owned: Iterable[_Proc], fields: frozenset[str], errors: dict[str, int]
    ) -> None:
        want_io = FIELD_IO in fields
        want_ctx = FIELD_CTX_SWITCHES in fields
        for proc in owned:
            st = proc.owner
            assert st is not None
            extras = self._source.extras(proc.pid, fields)
            if extras.gone:
                errors["no_such_process"] += 1
            if extras.denied:
                errors["access_denied"] += 1
            st.fds = _opt_add(st.fds, extras.fds)
            st.uss = _opt_add(st.uss, extras.uss_bytes)
            st.swap = _opt_add(st.swap, extras.swap_bytes)
            if want_io:
                if extras.read_bytes is not None:
                    added, used = _counter_delta(proc.read, extras.read_bytes, proc.credit_read)
                    st.read_total += added
                    proc.credit_read -= used
                    proc.read = extras.read_bytes
                if extras.write_bytes is not None:
                    added, used = _counter_delta(proc.write, extras.write_bytes, proc.credit_write)
                    st.write_total += added
                    proc.credit_write -= used
                    proc.write = extras.write_bytes
            if want_ctx:
                # Context switches are not folded into the parent when a child is reaped.
                if extras.ctx_switches_voluntary is not None:
                    st.ctx_vol_total += _counter_delta(
                        proc.ctx_vol, extras.ctx_switches_voluntary, 0
                    )[0]
                    proc.ctx_vol = extras.ctx_switches_voluntary
                if extras.ctx_switches_involuntary is not None:
                    st.ctx_invol_total += _counter_delta(
                        proc.ctx_invol, extras.ctx_switches_involuntary, 0
                    )[0]
                    proc.ctx_invol = extras.ctx_switches_involuntary

    def _plugin_sample(
        self,
        state: _PluginState,
        up: bool,
        wall: datetime,
        cpu_scale: float,
        fields: frozenset[str],
    ) -> PluginSample:
        # Runs once per plugin per cycle: with many small plugins it is a visible share of
        # the cycle, hence the cached datetime and no per-call helpers.
        if not up:
            state.begin_cycle(state.cycle)  # zero usage; counters keep their totals
        restarts = 0
        if up and state.root is not None:
            root = (state.root[1], state.root[0])
            if state.last_root is not None and state.last_root != root:
                restarts = 1
            state.last_root = root
        oldest = None
        start = state.oldest_start
        if start is not None:
            cached = state.oldest_cache
            if cached is not None and cached[0] == start:
                oldest = cached[1]
            else:
                oldest = datetime.fromtimestamp(self._boot_wall + start / self._tps, UTC)
                state.oldest_cache = (start, oldest)
        uss = swap = fds = read = write = vol = invol = None
        if fields:
            if FIELD_USS in fields:
                uss = state.uss if up else 0
            if FIELD_SWAP in fields:
                swap = state.swap if up else 0
            if FIELD_FDS in fields:
                fds = state.fds if up else 0
            if FIELD_IO in fields:
                read, write = state.read_total, state.write_total
            if FIELD_CTX_SWITCHES in fields:
                vol, invol = state.ctx_vol_total, state.ctx_invol_total
        pids = state.pids
        pids.sort()
        return PluginSample(
            key=state.key,
            timestamp=wall,
            up=up,
            process_count=len(pids),
            cpu_percent=state.cpu_ticks * cpu_scale,
            rss_bytes=state.rss,
            vms_bytes=state.vms,
            threads=state.threads,
            restarts=restarts,
            oldest_start_time=oldest,
            uss_bytes=uss,
            swap_bytes=swap,
            fds=fds,
            read_bytes=read,
            write_bytes=write,
            ctx_switches_voluntary=vol,
            ctx_switches_involuntary=invol,
            pids=tuple(pids),
        )
