"""registry.dependency_graph: satisfied per environment, conflicts between dependents, cycles,
dev edges that never gate, and the ERESOLVE-style reasons (pure, no database)."""

from __future__ import annotations

from pluginmon.registry.dependency_graph import (
    DEV,
    RUNTIME,
    Deployment,
    Edge,
    Problem,
    evaluate,
)


def dep(
    plugin: str, env: str, version: str | None, status: str = "installed", enabled: bool = True
) -> Deployment:
    return Deployment(plugin, env, version, status, enabled)


def edge(i: int, a: str, b: str, r: str, kind: str = RUNTIME) -> Edge:
    return Edge(i, a, b, r, kind)


def by(evaluation, edge_id: int, env: str):  # type: ignore[no-untyped-def]
    [found] = [s for s in evaluation.states if s.edge.id == edge_id and s.environment == env]
    return found


def test_satisfied_and_unsatisfied_per_environment() -> None:
    result = evaluate(
        [edge(1, "api", "db", "^2.0.0")],
        [
            dep("api", "production", "1.4.0"),
            dep("api", "staging", "1.5.0"),
            dep("api", "dev", "1.5.0"),
            dep("db", "production", "2.3.1"),
            dep("db", "staging", "1.9.0"),
        ],
    )
    prod, staging, dev = by(result, 1, "production"), by(result, 1, "staging"), by(result, 1, "dev")
    assert (prod.satisfied, prod.conflict, prod.problem) == (True, False, None)
    assert (
        prod.reason
        == 'api@1.4.0 wants db@"^2.0.0" (runtime); found db@2.3.1 in production: satisfied'
    )
    assert (staging.satisfied, staging.problem) == (False, Problem.OUT_OF_RANGE)
    assert staging.reason == 'api@1.5.0 wants db@"^2.0.0" (runtime); found db@1.9.0 in staging'
    assert (dev.satisfied, dev.problem) == (False, Problem.NOT_DEPLOYED)
    assert dev.reason.endswith("found no db in dev")
    assert dict(result.unsatisfied) == {
        ("api", "production"): 0,
        ("api", "staging"): 1,
        ("api", "dev"): 1,
    }
    # only environments where the dependent is deployed are evaluated
    assert {s.environment for s in result.states} == {"production", "staging", "dev"}


def test_disabled_failed_and_versionless_dependencies_are_unsatisfied() -> None:
    edges = [
        edge(1, "a", "x", "*"),
        edge(2, "a", "y", "*"),
        edge(3, "a", "z", ">=1"),
        edge(4, "a", "w", "*"),
    ]
    result = evaluate(
        edges,
        [
            dep("a", "p", "1.0.0"),
            dep("x", "p", "1.0.0", enabled=False),
            dep("y", "p", "1.0.0", status="failed"),
            dep("z", "p", None),
            dep("w", "p", "1.0.0", status="uninstalled"),
        ],
    )
    assert [by(result, i, "p").problem for i in (1, 2, 3, 4)] == [
        Problem.DISABLED,
        Problem.NOT_INSTALLED,
        Problem.NO_VERSION,
        Problem.NOT_DEPLOYED,
    ]
    assert by(result, 1, "p").reason.endswith("found x@1.0.0 in p, disabled")
    assert by(result, 2, "p").reason.endswith("found y@1.0.0 in p with status failed")


def test_two_dependents_whose_ranges_conflict() -> None:
    result = evaluate(
        [
            edge(1, "api", "db", "^1.0.0"),
            edge(2, "web", "db", "^2.0.0"),
            edge(3, "cli", "db", ">=1.2.0"),
        ],
        [
            dep("api", "production", "1.4.0"),
            dep("web", "production", "3.0.0"),
            dep("cli", "production", "0.1.0"),
            dep("db", "production", "1.9.0"),
        ],
    )
    api, web, cli = (by(result, i, "production") for i in (1, 2, 3))
    assert (api.conflict, api.satisfied, api.problem) == (True, False, Problem.CONFLICT)
    assert (web.conflict, web.satisfied) == (True, False)
    # >=1.2.0 is compatible with both: not part of the conflict, and 1.9.0 satisfies it
    assert (cli.conflict, cli.satisfied) == (False, True)
    assert api.reason == (
        'api@1.4.0 wants db@"^1.0.0" (runtime); conflicts with: web@3.0.0 wants db@"^2.0.0"; '
        "no version of db satisfies them together; found db@1.9.0 in production"
    )
    assert [w.dependent for w in web.conflicting] == ["api"]
    assert result.unsatisfied[("api", "production")] == 1


def test_compatible_ranges_do_not_conflict_even_when_unsatisfied() -> None:
    result = evaluate(
        [edge(1, "api", "db", "^1.2.0"), edge(2, "web", "db", "~1.4.0")],
        [dep("api", "p", "1.0.0"), dep("web", "p", "1.0.0"), dep("db", "p", "1.3.0")],
    )
    assert [(s.conflict, s.problem) for s in result.states] == [
        (False, None),
        (False, Problem.OUT_OF_RANGE),
    ]


def test_a_runtime_cycle_conflicts_and_names_its_path() -> None:
    result = evaluate(
        [
            edge(1, "a", "b", "*"),
            edge(2, "b", "c", "*"),
            edge(3, "c", "a", "*"),
            edge(4, "c", "d", "*"),
            edge(5, "d", "a", "*", kind=DEV),
        ],
        [dep(n, "p", "1.0.0") for n in "abcd"],
    )
    assert [by(result, i, "p").problem for i in (1, 2, 3)] == [Problem.CYCLE] * 3
    assert by(result, 1, "p").cycle == ("a", "b", "c", "a")
    assert by(result, 3, "p").cycle == ("c", "a", "b", "c")
    assert by(result, 1, "p").reason.endswith("runtime dependency cycle in p: a -> b -> c -> a")
    # c -> d leaves the cycle; the dev edge d -> a would close one, but dev edges never do
    assert by(result, 4, "p").satisfied
    assert by(result, 5, "p").satisfied


def test_dev_edges_are_reported_but_never_gate_conflict_or_count() -> None:
    result = evaluate(
        [
            edge(1, "api", "db", "^1.0.0"),
            edge(2, "web", "db", "^2.0.0", kind=DEV),
            edge(3, "api", "lint", "^9", kind=DEV),
        ],
        [dep("api", "p", "1.0.0"), dep("web", "p", "1.0.0"), dep("db", "p", "1.5.0")],
    )
    runtime, dev_conflicting, dev_missing = (by(result, i, "p") for i in (1, 2, 3))
    assert runtime.satisfied
    assert not runtime.conflict
    assert (dev_conflicting.satisfied, dev_conflicting.conflict, dev_conflicting.gating) == (
        False,
        False,
        False,
    )
    assert (dev_missing.problem, dev_missing.gating) == (Problem.NOT_DEPLOYED, False)
    assert "(dev)" in dev_missing.reason
    assert dict(result.unsatisfied) == {("api", "p"): 0}
    assert [s.edge.id for s in result.problems()] == [2, 3]


def test_a_range_stored_by_another_writer_that_does_not_parse_is_a_problem() -> None:
    result = evaluate(
        [edge(1, "a", "b", "not a range")], [dep("a", "p", "1.0.0"), dep("b", "p", "1.0.0")]
    )
    assert by(result, 1, "p").problem == Problem.INVALID_RANGE
    assert by(result, 1, "p").reason.endswith("the range is not valid npm semver syntax")


def test_a_long_chain_does_not_recurse() -> None:
    n = 5000
    edges = [edge(i, f"p{i}", f"p{i + 1}", "*") for i in range(n)] + [edge(n, f"p{n}", "p0", "*")]
    result = evaluate(edges, [dep(f"p{i}", "p", "1.0.0") for i in range(n + 1)])
    assert all(s.problem == Problem.CYCLE for s in result.states)
    cycle = by(result, 0, "p").cycle
    assert (len(cycle), cycle[:3], cycle[-2:]) == (12, ("p0", "p1", "p2"), ("…", "p0"))


def test_a_conflict_with_many_dependents_names_the_first_few() -> None:
    edges = [edge(i, f"app{i:02d}", "db", "^1.0.0") for i in range(8)]
    edges.append(edge(99, "new", "db", "^2.0.0"))
    deployments = [dep(e.dependent, "p", "1.0.0") for e in edges] + [dep("db", "p", "1.2.0")]
    result = evaluate(edges, deployments)
    new = by(result, 99, "p")
    assert (new.problem, new.conflicting_total, len(new.conflicting)) == (Problem.CONFLICT, 8, 5)
    assert new.reason.endswith(
        'app04@1.0.0 wants db@"^1.0.0"; and 3 more; no version of db satisfies them together; '
        "found db@1.2.0 in p"
    )
    assert [w.dependent for w in by(result, 0, "p").conflicting] == ["new"]
