"""Hostile process data: refused labels, backtracking patterns, the match budget, and a fuzz.

The processes are real, with real (byte) environments and command lines. Sampling tests that
count exactly read them through a view of /proc holding only the test's own processes
(symlinks to the real /proc/PID directories), so other processes on the shared host cannot
change the counts; one test samples the whole host through psutil as well.
"""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pluginmon.collectors.discovery import CompiledSpec, ProcessFacts, label_key, matches_static
from pluginmon.collectors.labels import (
    LABEL_ENVIRONMENT,
    LABEL_PLUGIN,
    LABEL_TENANT,
    NAME_MAX_CHARS,
    NAME_RULE,
    REJECT_REASONS,
    TENANT_MAX_CHARS,
    TENANT_RULE,
    LabelRejection,
    escaped_preview,
    parse_labels,
)
from pluginmon.collectors.models import Match, PluginKey, PluginSpec
from pluginmon.collectors.patterns import (
    CMDLINE_MATCH_MAX_BYTES,
    ENGINE,
    Pattern,
    cmdline_text,
    compile_pattern,
)
from pluginmon.collectors.psutil_source import PsutilSource
from pluginmon.collectors.sampler import Sampler
from pluginmon.collectors.stats import DISCOVERY_LOG_INTERVAL_SECONDS, DiscoveryStats, LogRateLimit
from pluginmon.daemon.config_schema import ConfigError
from pluginmon.daemon.config_sections import parse_plugin_specs
from tests.collector_helpers import IDLE, PY, cmdline_spec, sample_of, wait_exec_done

# -- real hostile processes ---------------------------------------------------------------------


class Hostile:
    """Starts real processes with byte environments and arguments; kills them all at the end."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []
        # Our own PLUGINMON_* variables (if the test run has any) must not leak into children.
        self._base = {k: v for k, v in os.environb.items() if not k.startswith(b"PLUGINMON_")}

    def sleeper(self, labels: Mapping[bytes, bytes]) -> subprocess.Popen[bytes]:
        """`sleep` with these environment variables, once /proc shows them."""
        child = subprocess.Popen(
            ["sleep", "600"],
            env={**self._base, **labels},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.children.append(child)
        wait_exec_done(child.pid)
        return child

    def python(self, *args: str | bytes) -> subprocess.Popen[bytes]:
        """An idle Python child with these extra arguments, once it has started."""
        child = subprocess.Popen(
            [PY, "-c", IDLE, *args],
            env=self._base,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        self.children.append(child)
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n", f"child exited with {child.wait()}"
        return child

    def close(self) -> None:
        for child in self.children:
            child.kill()
            child.wait()


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    h = Hostile()
    try:
        yield h
    finally:
        h.close()


def proc_view(tmp_path: Path, children: Sequence[subprocess.Popen[bytes]]) -> str:
    """A /proc holding only these processes: symlinks to their real /proc/PID directories."""
    root = tmp_path / "proc"
    root.mkdir()
    (root / "stat").symlink_to("/proc/stat")
    for child in children:
        (root / str(child.pid)).symlink_to(f"/proc/{child.pid}")
    return str(root)


def labels(tenant: str, plugin: bytes, **more: bytes) -> dict[bytes, bytes]:
    env = {b"PLUGINMON_TENANT": tenant.encode(), b"PLUGINMON_PLUGIN": plugin}
    env.update({f"PLUGINMON_{k.upper()}".encode(): v for k, v in more.items()})
    return env


def unique_tenant() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def _is_valid_key(key: PluginKey) -> bool:
    return (
        re.fullmatch(TENANT_RULE, key.tenant) is not None
        and re.fullmatch(NAME_RULE, key.plugin) is not None
        and re.fullmatch(NAME_RULE, key.environment) is not None
    )


def _rendered(stats: DiscoveryStats) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode("utf-8")
    return {
        s.labels.get("reason", s.name): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pluginmon_discovery_rejected_total"
    }


# -- reproduction 1: a non-UTF-8 label beside a good plugin -------------------------------------


def test_bad_labels_are_refused_and_counted_and_the_good_plugin_is_sampled(
    hostile: Hostile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tenant = unique_tenant()
    good = hostile.sleeper(labels(tenant, b"normal-c"))
    refused = {
        hostile.sleeper(labels(tenant, b"bad\xff")).pid: "not_utf8",
        hostile.sleeper(labels(tenant, b"L" * 100_000)).pid: "too_long",
        hostile.sleeper(labels(tenant, b"forged\nERROR database unreachable")).pid: (
            "bad_characters"
        ),
        hostile.sleeper({b"PLUGINMON_PLUGIN": b"no-tenant"}).pid: "empty",
        hostile.sleeper(labels(tenant, b"ok", environment=b"prod\xc3")).pid: "not_utf8",
    }
    sampler = Sampler([], proc_root=proc_view(tmp_path, hostile.children))

    with caplog.at_level(logging.WARNING, logger="pluginmon.collectors.stats"):
        first = sampler.sample()
    # Only the good plugin is in the snapshot: nothing of the others reaches the writer, the
    # spool, the exporter or the alerts.
    assert [s.key for s in first.samples] == [PluginKey(tenant, "normal-c", "production")]
    assert first.samples[0].up
    assert first.samples[0].pids == (good.pid,)
    assert dict(sampler.stats.rejected) == {
        "bad_characters": 1,
        "empty": 1,
        "not_utf8": 2,
        "too_long": 1,
    }
    # One line for five refusals (rate-limited), escaped: no raw newline, no undecodable byte.
    lines = [r.getMessage() for r in caplog.records if "ignoring the labels" in r.getMessage()]
    assert len(lines) == 1, lines
    (line,) = lines
    assert "\n" not in line
    assert line.isascii()
    assert len(line) < 600
    assert "pluginmon_discovery_rejected_total" in line
    pid = int(re.search(r"process (\d+)", line).group(1))  # type: ignore[union-attr]
    assert f"({refused[pid]}," in line

    # Each process is refused once (its identity is remembered), not once per cycle.
    second = sampler.sample()
    assert [s.key for s in second.samples] == [PluginKey(tenant, "normal-c", "production")]
    assert sum(sampler.stats.rejected.values()) == 5
    assert _rendered(sampler.stats) == {
        "bad_characters": 1.0,
        "empty": 1.0,
        "not_utf8": 2.0,
        "too_long": 1.0,
    }


def test_the_log_line_shows_the_value_escaped(
    hostile: Hostile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tenant = unique_tenant()
    forged = hostile.sleeper(labels(tenant, b"x\nERROR forged line \xff"))
    sampler = Sampler([], proc_root=proc_view(tmp_path, hostile.children))
    with caplog.at_level(logging.WARNING, logger="pluginmon.collectors.stats"):
        sampler.sample()
    (line,) = [r.getMessage() for r in caplog.records if "ignoring the labels" in r.getMessage()]
    assert f"process {forged.pid}: PLUGINMON_PLUGIN" in line
    assert r"b'x\nERROR forged line \xff'" in line  # escaped, as Python writes bytes
    assert "\n" not in line


def test_psutil_source_on_the_whole_host_refuses_the_bad_label(hostile: Hostile) -> None:
    """The portable path, on the real host (other processes may be there: counts are >=)."""
    tenant = unique_tenant()
    good = hostile.sleeper(labels(tenant, b"normal-c"))
    bad = hostile.sleeper(labels(tenant, b"bad\xff"))
    sampler = Sampler([], source=PsutilSource())
    snapshot = sampler.sample()
    assert sample_of(snapshot, PluginKey(tenant, "normal-c")).pids == (good.pid,)
    assert all(_is_valid_key(s.key) for s in snapshot.samples)
    assert not any(bad.pid in s.pids for s in snapshot.samples)
    assert sampler.stats.rejected["not_utf8"] >= 1


# -- reproduction 4: a backtracking cmdline pattern ----------------------------------------------


def test_backtracking_pattern_runs_on_re2_and_the_cycle_completes(
    hostile: Hostile, tmp_path: Path
) -> None:
    tag = f"pmtest-{uuid.uuid4().hex[:12]}"
    # Python's re needs ~2**64 steps to fail "(a+)+$" on 64 a's and a "!": it never returns.
    trap = hostile.python(tag, "a" * 64 + "!")
    victim = hostile.python(tag, "a" * 64)
    spec = cmdline_spec("acme", "backtrack", "(a+)+$")
    assert ENGINE == "re2"
    compiled = CompiledSpec.build(spec)
    assert isinstance(compiled.cmdline_re, Pattern)
    sampler = Sampler([spec], proc_root=proc_view(tmp_path, hostile.children))

    snapshot = sampler.sample()

    sample = sample_of(snapshot, spec.key)
    assert sample.pids == (victim.pid,)
    assert trap.pid not in sample.pids
    # Generous: only a guard against a stall (RE2 takes microseconds here, backtracking
    # would take forever); the loaded shared host makes anything tighter flaky.
    assert snapshot.duration_seconds < 30


def test_re2_refuses_what_it_cannot_run_in_linear_time_with_a_clear_message() -> None:
    for pattern, hint in [
        (r"(x)\1", "backreferences"),
        (r"foo(?=bar)", "lookahead"),
        (r"(?<!a)b", "lookbehind"),
        (r"end\Z", r"use \z"),
        (r"(?P<n>x)(?P=n)", "named backreferences"),
    ]:
        with pytest.raises(ValueError, match="invalid regex") as caught:
            compile_pattern(pattern)
        assert hint in str(caught.value), (pattern, str(caught.value))
        assert "RE2" in str(caught.value)
    with pytest.raises(ConfigError) as caught_spec:
        parse_plugin_specs([{"tenant": "t", "name": "p", "match": {"cmdline": r"(x)\1"}}])
    ((location, problem),) = caught_spec.value.located
    assert location == "plugins[0] (t/p).match.cmdline"
    assert problem.startswith("invalid regex:")
    assert "backreferences" in problem


def test_cmdline_is_matched_on_its_first_4096_bytes_only(hostile: Hostile, tmp_path: Path) -> None:
    tag = f"pmtest-{uuid.uuid4().hex[:12]}"
    long = hostile.python(tag, "x" * 10_000, "FAR-MARKER")
    near = cmdline_spec("acme", "near", f"{tag} x+")
    far = cmdline_spec("acme", "far", "FAR-MARKER")
    sampler = Sampler([near, far], proc_root=proc_view(tmp_path, hostile.children))
    snapshot = sampler.sample()
    assert sample_of(snapshot, near.key).pids == (long.pid,)
    assert sample_of(snapshot, far.key).pids == ()
    assert CMDLINE_MATCH_MAX_BYTES == 4096
    assert len(cmdline_text(["a" * 3000, "b" * 3000])) == 4096


# -- the match budget ----------------------------------------------------------------------------


def test_match_budget_defers_matching_to_later_cycles_and_counts_it(
    hostile: Hostile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tag = f"pmtest-{uuid.uuid4().hex[:12]}"
    children = [hostile.python(tag, str(i)) for i in range(3)]
    spec = cmdline_spec("acme", "budget", tag)
    sampler = Sampler(
        [spec], proc_root=proc_view(tmp_path, hostile.children), match_budget_per_cycle=1
    )
    with caplog.at_level(logging.WARNING, logger="pluginmon.collectors.stats"):
        counts = [sample_of(sampler.sample(), spec.key).process_count for _ in range(4)]
    # One search per cycle: one more process is matched each cycle, none is lost.
    assert counts == [1, 2, 3, 3]
    assert sorted(sample_of(sampler.sample(), spec.key).pids) == sorted(c.pid for c in children)
    assert sampler.stats.budget_exhausted == 2  # cycles 1 and 2 ran out
    assert sampler.stats.deferred == 3  # 2 processes in cycle 1, 1 in cycle 2
    lines = [r.getMessage() for r in caplog.records if "match budget" in r.getMessage()]
    assert len(lines) == 1  # the second exhausted cycle was within the log interval
    assert "1 cmdline searches per cycle" in lines[0]
    with pytest.raises(ValueError, match="match_budget_per_cycle"):
        Sampler([], match_budget_per_cycle=0)


# -- pure pieces ---------------------------------------------------------------------------------


def test_label_rules_and_precedence() -> None:
    def parse(**env: str) -> PluginKey | LabelRejection | None:
        return parse_labels(
            {f"PLUGINMON_{k.upper()}": v for k, v in env.items()}, default_environment="production"
        )

    assert parse(tenant="acme") is None  # no PLUGINMON_PLUGIN: no labels at all
    assert parse(tenant="acme", plugin="image-resizer.v2_1") == PluginKey(
        "acme", "image-resizer.v2_1", "production"
    )
    assert parse(tenant="acme", plugin="x", environment="") == PluginKey("acme", "x", "production")
    assert parse(tenant="a" * TENANT_MAX_CHARS, plugin="p" * NAME_MAX_CHARS) == PluginKey(
        "a" * TENANT_MAX_CHARS, "p" * NAME_MAX_CHARS, "production"
    )

    def reason(**env: str) -> tuple[str, str]:
        found = parse(**env)
        assert isinstance(found, LabelRejection), found
        return found.variable, found.reason

    assert reason(plugin="x") == (LABEL_TENANT, "empty")
    assert reason(tenant="acme", plugin="") == (LABEL_PLUGIN, "empty")
    assert reason(tenant="a" * (TENANT_MAX_CHARS + 1), plugin="x") == (LABEL_TENANT, "too_long")
    assert reason(tenant="acme", plugin="p" * (NAME_MAX_CHARS + 1)) == (LABEL_PLUGIN, "too_long")
    assert reason(tenant="acme", plugin="bad\udcff") == (LABEL_PLUGIN, "not_utf8")
    # Length is checked before anything reads the value: a huge undecodable one is too long.
    assert reason(tenant="acme", plugin="\udcff" * 100_000) == (LABEL_PLUGIN, "too_long")
    assert reason(tenant="acme\n", plugin="x") == (LABEL_TENANT, "bad_characters")  # no $ trap
    assert reason(tenant="Acme", plugin="x") == (LABEL_TENANT, "bad_characters")
    assert reason(tenant="acme", plugin="-x") == (LABEL_PLUGIN, "bad_characters")
    assert reason(tenant="acme", plugin="a/b") == (LABEL_PLUGIN, "bad_characters")
    assert reason(tenant="acme", plugin="caf\u00e9") == (LABEL_PLUGIN, "bad_characters")
    assert reason(tenant="acme", plugin="x", environment='st"g') == (
        LABEL_ENVIRONMENT,
        "bad_characters",
    )
    # The first label at fault is reported.
    assert reason(tenant="BAD", plugin="\udcff") == (LABEL_TENANT, "bad_characters")


def test_escaped_preview_is_short_ascii_and_single_line() -> None:
    assert escaped_preview("bad\udcff") == r"b'bad\xff'"
    assert escaped_preview("a\nb\x1b[31m") == r"b'a\nb\x1b[31m'"
    assert escaped_preview("L" * 100_000) == "b'" + "L" * 64 + "'... (100000 characters)"
    assert escaped_preview("\ud800") == r"'\ud800'"  # not from a decoder: still escaped


def test_log_rate_limit_with_an_injected_clock() -> None:
    limit = LogRateLimit(interval_seconds=60)
    assert limit.allow(1000.0) == 0
    assert limit.allow(1001.0) is None
    assert limit.allow(1059.9) is None
    assert limit.allow(1060.0) == 2  # two lines held back since the previous one
    assert limit.allow(1060.5) is None
    assert limit.allow(2000.0) == 1
    assert DISCOVERY_LOG_INTERVAL_SECONDS == 60


# -- fuzz: random bytes through the label and cmdline paths --------------------------------------

_LABEL_ALPHABET = b"abcxyzABC0189._-_ \n\t/\"\\'\x00\x7f\xc3\xa9\xff\xfe\xed\xa0\x80"


def _random_bytes(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.05:
        return b""
    if kind < 0.1:
        return bytes(rng.choice(b"abc-") for _ in range(rng.randint(60, 400)))
    if kind < 0.4:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    return bytes(rng.choice(_LABEL_ALPHABET) for _ in range(rng.randint(1, 40)))


def _expected_reason(raw: bytes, *, max_chars: int, rule: str) -> str | None:
    """An oracle on the raw bytes, independent of the implementation's str handling."""
    if not raw:
        return "empty"
    if len(raw.decode("utf-8", "surrogateescape")) > max_chars:
        return "too_long"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8"
    if re.fullmatch(rule.encode(), raw) is None:
        return "bad_characters"
    return None


def test_fuzz_labels_never_raise_and_always_accept_or_name_a_known_reason() -> None:
    rng = random.Random(20240615)
    accepted = refused = 0
    for _ in range(3000):
        raw = {
            b"PLUGINMON_TENANT": _random_bytes(rng) if rng.random() < 0.6 else b"acme",
            b"PLUGINMON_PLUGIN": _random_bytes(rng) if rng.random() < 0.7 else b"resizer",
        }
        if rng.random() < 0.5:
            raw[b"PLUGINMON_ENVIRONMENT"] = _random_bytes(rng)
        # As the sources hand them over: decoded with the file-system encoding.
        env = {os.fsdecode(k): os.fsdecode(v) for k, v in raw.items()}
        found = label_key(env)
        expected: tuple[str, str] | None = None
        for variable, max_chars, rule in (
            (LABEL_TENANT, TENANT_MAX_CHARS, TENANT_RULE),
            (LABEL_PLUGIN, NAME_MAX_CHARS, NAME_RULE),
            (LABEL_ENVIRONMENT, NAME_MAX_CHARS, NAME_RULE),
        ):
            value = raw.get(variable.encode()) or (
                b"production" if variable == LABEL_ENVIRONMENT else b""
            )
            reason = _expected_reason(value, max_chars=max_chars, rule=rule)
            if reason is not None:
                expected = (variable, reason)
                break
        if expected is None:
            assert isinstance(found, PluginKey), (raw, found)
            assert _is_valid_key(found)
            assert found.tenant.encode("utf-8") == raw[b"PLUGINMON_TENANT"]
            accepted += 1
        else:
            assert isinstance(found, LabelRejection), (raw, found)
            assert (found.variable, found.reason) == expected, raw
            assert found.reason in REJECT_REASONS
            assert found.preview.isascii()
            assert "\n" not in found.preview
            assert len(found.describe()) < 400
            refused += 1
    # The generator exercises both outcomes (and so the oracle is not vacuous).
    assert accepted > 100
    assert refused > 1000


class _FuzzSource:
    ticks_per_second = 100.0

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self._args, self._env = args, env

    def cmdline(self, pid: int) -> list[str]:
        return self._args

    def exe(self, pid: int) -> str:
        return "/bin/x"

    def environ(self, pid: int) -> dict[str, str]:
        return self._env

    def cgroup(self, pid: int) -> str | None:
        return "/"


def test_fuzz_cmdline_matching_never_raises_and_finds_what_is_there() -> None:
    rng = random.Random(4096)
    specs = [
        CompiledSpec.build(PluginSpec(PluginKey("t", f"p{i}"), Match(cmdline=pattern)))
        for i, pattern in enumerate(
            ["(a+)+$", r"MARK-\d+", "(?i)caf\u00e9", r"^\S+ --port \d+", "."]
        )
    ]
    for _ in range(500):
        args = [os.fsdecode(_random_bytes(rng)) for _ in range(rng.randint(0, 6))]
        marker = rng.random() < 0.5
        if marker:  # within the first 4096 bytes: it must be found
            args.insert(rng.randint(0, len(args)), f"MARK-{rng.randint(0, 999)}")
        if rng.random() < 0.05:
            args.append(os.fsdecode(bytes(rng.randrange(256) for _ in range(20_000))))
        text = cmdline_text(args)
        assert len(text) <= CMDLINE_MATCH_MAX_BYTES
        facts = ProcessFacts(_FuzzSource(args, {}), 1, b"1 (x")  # type: ignore[arg-type]
        results = [matches_static(c, facts) for c in specs]
        assert facts.searches == len(specs)
        if marker:
            assert results[1], args
        assert results[4] == bool(text)  # "." matches any character, undecodable bytes too


def test_fuzz_patterns_compile_or_raise_value_error() -> None:
    rng = random.Random(7)
    pieces = [
        "a",
        "(",
        ")",
        "[",
        "]",
        "+",
        "*",
        "?",
        "{2,3}",
        "\\",
        "\\1",
        "|",
        "^",
        "$",
        "(?",
        "=",
        "<",
        "!",
        "P",
        "\u00e9",
        "\udcff",
        "\x00",
    ]
    compiled = refused = 0
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        try:
            pattern: Pattern | None = compile_pattern(text)
        except ValueError as exc:
            pattern, message = None, str(exc)
        if pattern is None:
            assert message.startswith("invalid regex:"), message
            refused += 1
        else:
            assert pattern.text == text
            assert pattern.search(b"aaaa(" * 100) in (True, False)
            compiled += 1
    assert compiled > 100
    assert refused > 100


def test_undecodable_bytes_in_a_cmdline_are_seen_as_one_character() -> None:
    # Arguments come from processes as surrogate-escaped str; the matcher sees bytes only.
    pattern = compile_pattern("bad.x")
    assert pattern.search(cmdline_text(["bad\udcffx"]))
    assert not pattern.search(b"bad")
