"""Dependency health of one tenant, as a pure function: per environment, whether each declared
dependency is satisfied, which ranges conflict, which runtime dependencies form a cycle, and
an ERESOLVE-style account of each problem (who wants what, what is installed).

Definitions (issue 10):

* an edge is evaluated in every environment where its **dependent** is deployed (a
  plugin_environments row that is not ``uninstalled``; a plugin without any such row counts
  as deployed in its catalogue environment with its catalogue version, status and flag);
* **satisfied**: the dependency is deployed there with status ``installed``, enabled, and
  its version is in the range (node-semver rules, registry.semver);
* **conflict**: the runtime ranges that the dependents deployed in the environment ask of
  one plugin admit no common version, or the edge is on a cycle of runtime edges. A
  conflicting edge is never satisfied (the table's CHECK says so too);
* **dev** edges are evaluated for satisfaction and reported, but take no part in conflicts
  or cycles and are never counted as runtime problems (no gating, health or inhibition).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pluginmon.registry.errors import InvalidError
from pluginmon.registry.semver import (
    Range,
    Version,
    have_common_version,
    parse_range,
    try_version,
)

RUNTIME = "runtime"
DEV = "dev"
KINDS = (RUNTIME, DEV)


_VersionOf = Callable[[str], "str | None"]


class Problem(StrEnum):
    NOT_DEPLOYED = "not_deployed"  # the dependency is not in the environment at all
    NOT_INSTALLED = "not_installed"  # there, but failed, installing, ...
    DISABLED = "disabled"
    NO_VERSION = "no_version"  # there, but no (semantic) version recorded
    OUT_OF_RANGE = "out_of_range"
    INVALID_RANGE = "invalid_range"  # written by a writer that bypassed the API
    CONFLICT = "conflict"
    CYCLE = "cycle"


@dataclass(frozen=True, slots=True)
class Deployment:
    """A plugin in one environment."""

    plugin: str
    environment: str
    version: str | None
    status: str
    enabled: bool


@dataclass(frozen=True, slots=True)
class Edge:
    id: int
    dependent: str
    dependency: str
    version_range: str
    kind: str


@dataclass(frozen=True, slots=True)
class Want:
    """One dependent's ask: ``dependent@version`` wants ``dependency@"range"``."""

    dependent: str
    dependent_version: str | None
    version_range: str
    kind: str


@dataclass(frozen=True, slots=True)
class EdgeState:
    """An edge in one environment."""

    edge: Edge
    environment: str
    satisfied: bool
    conflict: bool
    problem: Problem | None
    found: Deployment | None
    dependent_version: str | None
    # The conflict's other wants (empty otherwise) and the cycle's path (dependent first).
    conflicting: tuple[Want, ...] = ()
    cycle: tuple[str, ...] = ()
    conflicting_total: int = 0  # the wants in conflict (``conflicting`` shows the first few)

    @property
    def gating(self) -> bool:
        """A runtime problem: lowers health, fails ``deps check``, raises the alert."""
        return self.edge.kind == RUNTIME and not self.satisfied

    @property
    def want(self) -> Want:
        return Want(
            self.edge.dependent, self.dependent_version, self.edge.version_range, self.edge.kind
        )

    @property
    def reason(self) -> str:
        """One line, in the manner of npm's ERESOLVE report."""
        e = self.edge
        wants = f'{_at(e.dependent, self.dependent_version)} wants {e.dependency}@"{e.version_range}" ({e.kind})'
        found = _found(e.dependency, self.found, self.environment)
        if self.problem is None:
            return f"{wants}; found {found}: satisfied"
        if self.problem == Problem.CYCLE:
            return f"{wants}; runtime dependency cycle in {self.environment}: " + " -> ".join(
                self.cycle
            )
        if self.problem == Problem.CONFLICT:
            others = "; ".join(
                f'{_at(w.dependent, w.dependent_version)} wants {e.dependency}@"{w.version_range}"'
                for w in self.conflicting
            )
            more = self.conflicting_total - len(self.conflicting)
            if more > 0:
                others += f"; and {more} more"
            return (
                f"{wants}; conflicts with: {others}; no version of {e.dependency} satisfies "
                f"them together; found {found}"
            )
        if self.problem == Problem.INVALID_RANGE:
            return f"{wants}; the range is not valid npm semver syntax"
        return f"{wants}; found {found}"


def _at(name: str, version: str | None) -> str:
    return f"{name}@{version}" if version else name


def _found(dependency: str, found: Deployment | None, environment: str) -> str:
    if found is None:
        return f"no {dependency} in {environment}"
    what = f"{_at(dependency, found.version)} in {environment}"
    if found.status != "installed":
        return f"{what} with status {found.status}"
    if not found.enabled:
        return f"{what}, disabled"
    if found.version is None:
        return f"{dependency} in {environment} without a version"
    return what


@dataclass(frozen=True, slots=True)
class Evaluation:
    states: tuple[EdgeState, ...]
    # (dependent, environment) -> runtime edges not satisfied there (zeros included, for
    # every environment where the dependent has runtime edges): the health gauge.
    unsatisfied: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def problems(self, *, environment: str | None = None) -> list[EdgeState]:
        return [
            s
            for s in self.states
            if not s.satisfied and (environment is None or s.environment == environment)
        ]


def deployments_by_environment(
    deployments: Iterable[Deployment],
) -> dict[str, dict[str, Deployment]]:
    """environment -> plugin -> its deployment there (uninstalled ones left out)."""
    out: dict[str, dict[str, Deployment]] = defaultdict(dict)
    for d in deployments:
        if d.status != "uninstalled":
            out[d.environment][d.plugin] = d
    return out


def evaluate(edges: Sequence[Edge], deployments: Iterable[Deployment]) -> Evaluation:
    """Every edge in every environment where its dependent is deployed."""
    by_env = deployments_by_environment(deployments)
    ranges: dict[str, Range | None] = {}
    for e in edges:
        if e.version_range not in ranges:
            try:
                ranges[e.version_range] = parse_range(e.version_range)
            except InvalidError:
                ranges[e.version_range] = None
    by_dependent: dict[str, list[Edge]] = defaultdict(list)
    for e in edges:
        by_dependent[e.dependent].append(e)
    states: list[EdgeState] = []
    unsatisfied: dict[tuple[str, str], int] = {}
    for environment in sorted(by_env):
        deployed = by_env[environment]
        active = sorted((e for d in deployed for e in by_dependent.get(d, ())), key=lambda e: e.id)
        states.extend(_evaluate_environment(environment, active, deployed, ranges))
    for s in states:
        if s.edge.kind == RUNTIME:
            key = (s.edge.dependent, s.environment)
            unsatisfied[key] = unsatisfied.get(key, 0) + (0 if s.satisfied else 1)
    return Evaluation(states=tuple(states), unsatisfied=unsatisfied)


def _evaluate_environment(
    environment: str,
    edges: Sequence[Edge],
    deployed: Mapping[str, Deployment],
    ranges: Mapping[str, Range | None],
) -> list[EdgeState]:
    # Each version read and parsed once per environment, not once per edge.
    versions = {p: d.version for p, d in deployed.items()}
    parsed: dict[str, Version | None] = {}
    version_of = versions.get

    def installed_version(plugin: str) -> Version | None:
        if plugin not in parsed:
            parsed[plugin] = try_version(versions.get(plugin))
        return parsed[plugin]

    # 1. each edge on its own
    base: dict[int, tuple[Problem | None, Deployment | None]] = {}
    for e in edges:
        found = deployed.get(e.dependency)
        problem = _problem(ranges[e.version_range], found)
        if problem is None:
            version = installed_version(e.dependency)
            range_ = ranges[e.version_range]
            if version is None:
                problem = Problem.NO_VERSION
            elif range_ is not None and not range_.satisfied_by(version):
                problem = Problem.OUT_OF_RANGE
        base[e.id] = (problem, found)

    # 2. runtime ranges of one plugin that no version satisfies together
    conflicts: dict[int, tuple[tuple[Want, ...], int]] = {}
    by_dependency: dict[str, list[Edge]] = defaultdict(list)
    for e in edges:
        if e.kind == RUNTIME and ranges[e.version_range] is not None:
            by_dependency[e.dependency].append(e)
    for dependency, asks in by_dependency.items():
        distinct = {a.version_range for a in asks}
        if len(asks) < 2 or len(distinct) < 2:
            continue
        texts = tuple(sorted(distinct))
        installed = installed_version(dependency)
        # The common case: what is installed satisfies everyone.
        if installed is not None and all(
            r is not None and r.satisfied_by(installed) for t in texts if (r := ranges[t])
        ):
            continue
        if have_common_version(texts):
            continue
        conflicts.update(_conflicting(asks, ranges, version_of))

    # 3. cycles of runtime edges
    cycles = _cycles([e for e in edges if e.kind == RUNTIME])

    out: list[EdgeState] = []
    for e in edges:
        problem, found = base[e.id]
        conflicting: tuple[Want, ...] = ()
        conflicting_total = 0
        cycle: tuple[str, ...] = ()
        if e.id in cycles:
            problem, cycle = Problem.CYCLE, cycles[e.id]
        elif e.id in conflicts:
            problem = Problem.CONFLICT
            conflicting, conflicting_total = conflicts[e.id]
        out.append(
            EdgeState(
                edge=e,
                environment=environment,
                satisfied=problem is None,
                conflict=problem in (Problem.CYCLE, Problem.CONFLICT),
                problem=problem,
                found=found,
                dependent_version=version_of(e.dependent),
                conflicting=conflicting,
                conflicting_total=conflicting_total,
                cycle=cycle,
            )
        )
    return out


def _problem(range_: Range | None, found: Deployment | None) -> Problem | None:
    """What is wrong before the version is looked at (None: compare the version)."""
    if range_ is None:
        return Problem.INVALID_RANGE
    if found is None:
        return Problem.NOT_DEPLOYED
    if found.status != "installed":
        return Problem.NOT_INSTALLED
    if not found.enabled:
        return Problem.DISABLED
    return None


# A conflict's reason names at most this many of the other dependents ("and N more").
MAX_WANTS_SHOWN = 5


def _conflicting(
    asks: Sequence[Edge],
    ranges: Mapping[str, Range | None],
    version_of: _VersionOf,
) -> dict[int, tuple[tuple[Want, ...], int]]:
    """Edge id -> (the first wants it cannot be satisfied together with, how many there are).
    Pairs of distinct ranges first (the usual ERESOLVE case, two dependents); when every pair
    is compatible but all together are not, every edge conflicts with all the others.
    Compared by range text: fifty dependents asking for three ranges cost three pairs."""
    by_text: dict[str, list[Edge]] = defaultdict(list)
    for a in asks:
        by_text[a.version_range].append(a)
    texts = sorted(by_text)
    disjoint: dict[str, list[str]] = defaultdict(list)
    for i, ta in enumerate(texts):
        for tb in texts[i + 1 :]:
            if not have_common_version((ta, tb)):
                disjoint[ta].append(tb)
                disjoint[tb].append(ta)

    def want(b: Edge) -> Want:
        return Want(b.dependent, version_of(b.dependent), b.version_range, b.kind)

    out: dict[int, tuple[tuple[Want, ...], int]] = {}
    for a in asks:
        if disjoint:
            if a.version_range not in disjoint:
                continue
            others: Iterable[Edge] = (b for t in disjoint[a.version_range] for b in by_text[t])
            total = sum(len(by_text[t]) for t in disjoint[a.version_range])
        else:
            others = (b for b in asks if b.id != a.id)
            total = len(asks) - 1
        out[a.id] = (tuple(want(b) for b in itertools.islice(others, MAX_WANTS_SHOWN)), total)
    return out


def _cycles(edges: Sequence[Edge]) -> dict[int, tuple[str, ...]]:
    """Edge id -> a cycle through it (``a -> b -> a``) for every edge inside a strongly
    connected component of more than one plugin (Tarjan, iterative: chains of 10,000
    plugins must not hit the recursion limit)."""
    graph: dict[str, list[Edge]] = defaultdict(list)
    for e in edges:
        graph[e.dependent].append(e)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    component_of: dict[str, int] = {}
    components: list[list[str]] = []
    counter = 0
    for root in list(graph):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, i = work[-1]
            out = graph.get(node, ())
            if i < len(out):
                work[-1] = (node, i + 1)
                nxt = out[i].dependency
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                members: list[str] = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    members.append(top)
                    if top == node:
                        break
                if len(members) > 1:
                    for m in members:
                        component_of[m] = len(components)
                    components.append(members)
    walks = [_Walks(graph, members) for members in components]
    result: dict[int, tuple[str, ...]] = {}
    for e in edges:
        c = component_of.get(e.dependent)
        if c is None or component_of.get(e.dependency) != c:
            continue
        result[e.id] = walks[c].through(e.dependent, e.dependency)
    return result


# Longer cycles are shown as their first names, an ellipsis and the closing name.
MAX_CYCLE_NAMES = 10


class _Walks:
    """Closed walks through the edges of one strongly connected component, from two
    breadth-first trees of a root (to it and from it): ``u -> v ⇝ root ⇝ u``, built only as
    far as it is shown, so a ring of 10,000 plugins costs O(edges), not O(edges²)."""

    def __init__(self, graph: Mapping[str, Sequence[Edge]], members: Sequence[str]) -> None:
        inside = set(members)
        self.root = root = members[0]
        reverse: dict[str, list[str]] = defaultdict(list)
        for m in members:
            for e in graph.get(m, ()):
                if e.dependency in inside:
                    reverse[e.dependency].append(m)
        # forward tree: parent on the shortest path root ⇝ x
        self.parent: dict[str, str] = {root: root}
        self.depth: dict[str, int] = {root: 0}
        queue = [root]
        for node in queue:
            for e in graph.get(node, ()):
                nxt = e.dependency
                if nxt in inside and nxt not in self.parent:
                    self.parent[nxt] = node
                    self.depth[nxt] = self.depth[node] + 1
                    queue.append(nxt)
        # reverse tree: next hop on the shortest path x ⇝ root
        self.next_hop: dict[str, str] = {root: root}
        self.to_root: dict[str, int] = {root: 0}
        queue = [root]
        for node in queue:
            for prev in reverse.get(node, ()):
                if prev not in self.next_hop:
                    self.next_hop[prev] = node
                    self.to_root[prev] = self.to_root[node] + 1
                    queue.append(prev)

    def through(self, u: str, v: str) -> tuple[str, ...]:
        length = 1 + self.to_root[v] + self.depth[u]  # edges of the closed walk
        names = [u]
        x = v
        while len(names) < MAX_CYCLE_NAMES and x != self.root:
            names.append(x)
            x = self.next_hop[x]
        if len(names) < MAX_CYCLE_NAMES and u != self.root:
            down = [u]
            while down[-1] != self.root:
                down.append(self.parent[down[-1]])
            down.reverse()  # root ... u
            names.extend(down[:-1][: MAX_CYCLE_NAMES - len(names)])
        if len(names) < length:
            names.append("…")
        names.append(u)
        return tuple(names)
