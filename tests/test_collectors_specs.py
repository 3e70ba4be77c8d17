"""Plugin spec parsing and the pure matchers."""

from __future__ import annotations

import pytest

from pluginmon.collectors.discovery import CompiledSpec, ProcessFacts, label_key, matches_static
from pluginmon.collectors.labels import LabelRejection
from pluginmon.collectors.models import Match, PluginKey, PluginSpec
from pluginmon.daemon.config_schema import ConfigError
from pluginmon.daemon.config_sections import parse_plugin_specs


def test_valid_specs_in_order_with_default_environment() -> None:
    specs = parse_plugin_specs(
        [
            {
                "tenant": "acme",
                "name": "image-resizer",
                "match": {"cmdline": r"resizer\s+--port"},
            },
            {
                "tenant": "acme",
                "name": "image-resizer",
                "environment": "staging",
                "match": {"name": "resizer", "env": "ROLE=worker"},
            },
            {"tenant": "globex_2", "name": "db", "match": {"pidfile": "/run/db.pid"}},
        ]
    )
    assert [s.key for s in specs] == [
        PluginKey("acme", "image-resizer", "production"),
        PluginKey("acme", "image-resizer", "staging"),
        PluginKey("globex_2", "db", "production"),
    ]
    assert specs[0].match == Match(cmdline=r"resizer\s+--port")
    assert specs[1].match == Match(name="resizer", env="ROLE=worker")
    assert all(s.origin == "config" for s in specs)


def test_errors_name_plugin_and_field_and_all_are_listed() -> None:
    raw: list[dict[str, object]] = [
        {"tenant": "acme", "name": "ok", "match": {"name": "ok"}},
        {"tenant": "acme", "name": "empty", "match": {}},
        {"tenant": "acme", "name": "image-resizer", "match": {"cmdline": "resizer(["}},
        {"tenant": "acme", "name": "typo", "match": {"cmdlien": "x"}},
        {"tenant": "Acme Corp", "name": "slug", "match": {"name": "x"}},
        {"tenant": "acme", "name": "ok", "match": {"exe": "/usr/bin/ok"}},
        {"tenant": "acme", "name": "env", "match": {"env": "NOEQUALS"}},
        {"tenant": "acme", "name": "nomatch"},
        {"tenant": "acme", "match": {"name": "x"}},
        {"tenant": "acme", "name": "extra", "match": {"name": "x"}, "tenent": "a"},
    ]
    with pytest.raises(ConfigError) as caught:
        parse_plugin_specs(raw)
    problems = dict(caught.value.located)
    assert problems["plugins[1] (acme/empty).match"].startswith("empty")
    assert problems["plugins[2] (acme/image-resizer).match.cmdline"].startswith("invalid regex:")
    assert problems["plugins[3] (acme/typo).match.cmdlien"].startswith("unknown match key")
    assert "not a tenant slug" in problems["plugins[4] (Acme Corp/slug).tenant"]
    assert problems["plugins[5] (acme/ok)"].startswith("duplicate of plugins[0]")
    assert problems["plugins[6] (acme/env).match.env"] == 'must be "KEY=VALUE"'
    assert problems["plugins[7] (acme/nomatch).match"].startswith("required")
    assert problems["plugins[8].name"].startswith("required")
    assert problems["plugins[9] (acme/extra).tenent"].startswith("unknown key")
    assert len(caught.value.located) == 9
    text = str(caught.value)
    for location, message in caught.value.located:
        assert f"{location}: {message}" in text


def test_a_name_with_a_nul_or_a_control_character_is_refused_by_field() -> None:
    # A TOML "\u0000" escape gives a name the database refuses (invalid byte sequence), and
    # a newline would start a log line of its own: refused here, by field, the value escaped.
    # Other names keep working as before (spaces, non-ASCII, long ones).
    raw: list[dict[str, object]] = [
        {"tenant": "acme", "name": "ok.v2_a-b", "match": {"name": "ok"}},
        {"tenant": "acme", "name": "nul\x00name", "match": {"name": "x"}},
        {"tenant": "acme", "name": "has space, ünïcode", "match": {"name": "x"}},
        {"tenant": "acme", "name": "envs", "environment": "prod\x00", "match": {"name": "x"}},
        {"tenant": "acme", "name": "n" * 200, "match": {"name": "x"}},
        {"tenant": "acme", "name": "two\nlines", "match": {"name": "x"}},
    ]
    with pytest.raises(ConfigError) as caught:
        parse_plugin_specs(raw)
    problems = dict(caught.value.located)
    rule = "has a control character; names must be printable"
    assert problems == {
        "plugins[1] (acme/nul\\x00name).name": f"b'nul\\x00name' {rule}",
        "plugins[3] (acme/envs).environment": f"b'prod\\x00' {rule}",
        "plugins[5] (acme/two\\nlines).name": f"b'two\\nlines' {rule}",
    }
    assert "\x00" not in str(caught.value)
    assert "two\nlines" not in str(caught.value)
    fine = [raw[0], raw[2], raw[4]]
    assert [s.key.plugin for s in parse_plugin_specs(fine)] == [
        "ok.v2_a-b",
        "has space, ünïcode",
        "n" * 200,
    ]


@pytest.mark.parametrize(
    ("match", "field", "message"),
    [
        ({"pidfile": "run/x.pid"}, "pidfile", "must be an absolute path"),
        ({"exe": "bin/x"}, "exe", "must be an absolute path"),
        ({"systemd_unit": "/etc/x.service"}, "systemd_unit", "must be a unit name"),
        ({"name": "  "}, "name", "must not be empty"),
        ({"name": 3}, "name", "must be a string"),
    ],
)
def test_bad_match_values(match: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_plugin_specs([{"tenant": "t", "name": "p", "match": match}])
    ((location, problem),) = caught.value.located
    assert location == f"plugins[0] (t/p).match.{field}"
    assert problem.startswith(message)


def test_tenant_slug_limits() -> None:
    ok = "a" + "b" * 62
    assert parse_plugin_specs([{"tenant": ok, "name": "p", "match": {"name": "p"}}])
    for bad in ["a" + "b" * 63, "-a", "_a", "A", "a.b", ""]:
        with pytest.raises(ConfigError):
            parse_plugin_specs([{"tenant": bad, "name": "p", "match": {"name": "p"}}])


class _FakeSource:
    """Metadata for the pure matcher tests (sampling itself is tested on real processes)."""

    ticks_per_second = 100.0

    def __init__(self, cmdline: list[str], exe: str, env: dict[str, str], cgroup: str) -> None:
        self._cmdline, self._exe, self._env, self._cgroup = cmdline, exe, env, cgroup

    def cmdline(self, pid: int) -> list[str]:
        return self._cmdline

    def exe(self, pid: int) -> str:
        return self._exe

    def environ(self, pid: int) -> dict[str, str]:
        return self._env

    def cgroup(self, pid: int) -> str | None:
        return self._cgroup


def _matches(match: Match, source: _FakeSource, comm: bytes = b"resizer") -> bool:
    compiled = CompiledSpec.build(PluginSpec(PluginKey("t", "p"), match))
    facts = ProcessFacts(source, 42, b"42 (" + comm)  # type: ignore[arg-type]
    return matches_static(compiled, facts)


def test_matchers_are_anded() -> None:
    src = _FakeSource(
        ["/opt/resizer/bin/resizer", "--port", "8080"],
        "/opt/resizer/bin/resizer",
        {"ROLE": "worker", "A": "b=c"},
        "/system.slice/resizer.service/workers",
    )
    assert _matches(Match(name="resizer"), src)
    assert _matches(Match(cmdline=r"resizer\s+--port"), src)
    assert _matches(Match(exe="/opt/resizer/bin/resizer"), src)
    assert _matches(Match(env="ROLE=worker"), src)
    assert _matches(Match(env="A=b=c"), src)
    assert _matches(Match(cgroup="/system.slice/resizer.service*"), src)
    assert _matches(Match(systemd_unit="resizer.service"), src)
    assert _matches(Match(systemd_unit="resizer"), src)  # ".service" implied
    assert _matches(Match(name="resizer", cmdline="8080", env="ROLE=worker"), src)
    assert not _matches(Match(name="resizer", cmdline="9090"), src)
    assert not _matches(Match(env="ROLE=web"), src)
    assert not _matches(Match(systemd_unit="resize.service"), src)
    assert not _matches(Match(cgroup="/user.slice/*"), src)
    assert not _matches(Match(exe="/usr/bin/resizer"), src)


def test_name_is_extended_past_the_kernels_15_bytes_like_psutil() -> None:
    src = _FakeSource(["/usr/bin/image-resizer-daemon", "-v"], "/x", {}, "/")
    truncated = b"image-resizer-d"
    assert _matches(Match(name="image-resizer-daemon"), src, comm=truncated)
    assert not _matches(Match(name="image-resizer-d"), src, comm=truncated)


def test_label_key() -> None:
    assert label_key({"PLUGINMON_TENANT": "acme", "PLUGINMON_PLUGIN": "x"}) == PluginKey(
        "acme", "x", "production"
    )
    assert label_key(
        {"PLUGINMON_TENANT": "acme", "PLUGINMON_PLUGIN": "x", "PLUGINMON_ENVIRONMENT": "dev"}
    ) == PluginKey("acme", "x", "dev")
    assert label_key({"PLUGINMON_TENANT": "acme"}) is None
    # Refused labels are no longer a silent None: the reason is counted (collectors.labels).
    assert label_key({"PLUGINMON_TENANT": "Not A Slug", "PLUGINMON_PLUGIN": "x"}) == (
        LabelRejection("PLUGINMON_TENANT", "bad_characters", "b'Not A Slug'")
    )


def test_collectors_import_nothing_from_the_other_layers() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "collectors"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"storage", "alerts", "daemon"}, (path, name)


def test_cmdline_prefilter_covers_every_cmdline_pattern() -> None:
    """With RE2 every pattern combines: groups have no back-references to renumber and
    inline flags stay inside their group (Python's re could not combine either)."""
    from pluginmon.collectors.discovery import cmdline_prefilter

    def compiled(*patterns: str) -> tuple[CompiledSpec, ...]:
        raw = [
            {"tenant": "t", "name": f"p{i}", "match": {"cmdline": p}}
            for i, p in enumerate(patterns)
        ]
        return tuple(CompiledSpec.build(s) for s in parse_plugin_specs(raw))

    pattern, covered = cmdline_prefilter(
        compiled(r"resizer\s+--port", r"(x|y)z", "(?i)worker$", "other")
    )
    assert covered == {0, 1, 2, 3}
    assert pattern is not None
    assert pattern.search(b"/bin/resizer  --port 80")
    assert pattern.search(b"python WORKER")
    assert pattern.search(b"run yz")
    assert not pattern.search(b"python xx")
    assert not pattern.search(b"OTHER")  # (?i) of spec 2 does not leak into spec 3
    assert cmdline_prefilter(compiled("only-one")) == (None, frozenset())


def test_the_schema_knows_every_match_key_and_null_is_no_criterion() -> None:
    from pluginmon.collectors.specs import MATCH_KEYS
    from pluginmon.daemon.config_sections import MatchTable

    assert tuple(MatchTable.model_fields) == MATCH_KEYS
    with pytest.raises(ConfigError) as caught:  # JSON null (PLUGINMON_PLUGINS) matches nothing
        parse_plugin_specs([{"tenant": "t", "name": "p", "match": {"name": None}}])
    assert dict(caught.value.located)["plugins[0] (t/p).match"].startswith("empty")


def test_collectors_and_alerts_keep_their_dataclasses_free_of_pydantic() -> None:
    import ast
    from pathlib import Path

    # The config schema (daemon/) builds these dataclasses; the packages own no schema.
    root = Path(__file__).resolve().parent.parent
    configured = [root / "alerts" / f"{name}.py" for name in ("rules", "health", "matchers")]
    for path in [*(root / "collectors").glob("*.py"), *configured]:
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0].startswith("pydantic") for n in names), (path, names)
