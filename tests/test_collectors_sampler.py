"""The sampler against real processes (and fake /proc trees built from real /proc files)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pluginmon.collectors.models import PluginKey, PluginSpec, Snapshot
from pluginmon.collectors.psutil_source import PsutilSource
from pluginmon.collectors.sampler import ALL_FIELDS, DEFAULT_FIELDS, Sampler
from pluginmon.collectors.source import OPTIONAL_FIELDS, ProcessGone
from pluginmon.daemon.config_sections import parse_plugin_specs
from tests.collector_helpers import (
    IDLE,
    PY,
    Spawner,
    cmdline_spec,
    fake_proc_entry,
    maybe_sample_of,
    sample_of,
    send,
    unique_tag,
    wait_asleep,
    wait_exec_done,
    wait_for,
)
from tests.cpu_reference import bracketed, share_bounds

MIB = 1024 * 1024


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    s = Spawner()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=["procfs", "psutil"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_sampler(
    specs: list[PluginSpec],
    backend: str = "procfs",
    *,
    label_discovery: bool = True,
    fields: frozenset[str] = DEFAULT_FIELDS,
    label_grace_cycles: int = 3,
) -> Sampler:
    """A Sampler on the /proc fast path or on psutil (both are tested the same way)."""
    return Sampler(
        specs,
        source=PsutilSource() if backend == "psutil" else None,
        label_discovery=label_discovery,
        fields=fields,
        label_grace_cycles=label_grace_cycles,
    )


def errors_of(snapshot: Snapshot) -> dict[str, int]:
    return dict(snapshot.errors)


# --- accuracy -------------------------------------------------------------------------------

# Holds its CPU time at half the wall time since it started (a 50% duty cycle that catches
# up after losing the CPU to other work on a busy host), in slices of ~5 ms. Where allowed it
# raises its priority (and its session's autogroup's: the scheduler shares CPU between
# sessions first), so a loaded test host still grants it the half core it asks for.
BURNER = """
import os, sys, time
try:
    os.nice(-10)
    with open('/proc/self/autogroup', 'w') as f:
        f.write('-10')
except OSError:
    pass
print('ready', flush=True)
t0 = time.perf_counter()
c0 = time.process_time()
while True:
    if time.process_time() - c0 < 0.5 * (time.perf_counter() - t0):
        t = time.perf_counter()
        while time.perf_counter() - t < 0.005:
            pass
    else:
        time.sleep(0.005)
"""


def test_half_core_burner_reads_its_real_cpu_share(spawner: Spawner) -> None:
    """The burner asks for half a core, but on a loaded 2-core machine it gets what the
    scheduler grants, so the reading is checked against the burner's own CPU counters read
    from /proc just before and just after each sample: the sampler's share must lie between
    the least and the most the burner can have used over the sampler's interval."""
    tag = unique_tag()
    spec = cmdline_spec("acme", "burner", tag)
    sampler = Sampler([spec], label_discovery=False)
    child, _ = spawner.python(BURNER, tag)
    _, first = bracketed(child.pid, sampler.sample)
    time.sleep(2.0)
    snapshot, second = bracketed(child.pid, sampler.sample)
    sample = sample_of(snapshot, spec.key)
    assert sample.up
    assert sample.process_count == 1
    low, high = share_bounds(first, second)
    # The burner must have run for the comparison to mean anything; it asks for 50%.
    assert high > 10.0, (low, high)
    # 0.5: float rounding only; the bounds are exact for the counters the sampler reads.
    assert low - 0.5 <= sample.cpu_percent <= high + 0.5, (sample.cpu_percent, low, high)


MEMORY = """
import sys
print('ready', flush=True)
sys.stdin.readline()
block = b'\\x01' * (200 * 1024 * 1024)  # written, so every page is resident
print('allocated', flush=True)
sys.stdin.read()
"""


def test_200_mib_allocated_and_touched_shows_in_rss(spawner: Spawner) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "memory", tag)
    sampler = Sampler([spec], label_discovery=False)
    child, _ = spawner.python(MEMORY, tag)
    before = sample_of(sampler.sample(), spec.key).rss_bytes
    assert send(child) == "allocated"
    after = sample_of(sampler.sample(), spec.key)
    assert abs((after.rss_bytes - before) - 200 * MIB) <= 0.05 * 200 * MIB
    # And the same as psutil says, for the whole process.
    assert abs(after.rss_bytes - psutil.Process(child.pid).memory_info().rss) <= 0.01 * 200 * MIB
    assert after.vms_bytes >= after.rss_bytes


SPIKE_PARENT = """
import subprocess, sys
print('ready', flush=True)
for line in sys.stdin:
    # a child that burns 0.4 s of CPU and exits before the next sample
    subprocess.run([sys.executable, '-c',
        'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass'])
    print('done', flush=True)
"""


def test_short_lived_child_between_samples_is_not_lost(spawner: Spawner) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "spiky", tag)
    sampler = Sampler([spec], label_discovery=False)
    parent, _ = spawner.python(SPIKE_PARENT, tag)
    first = sampler.sample()
    started = time.monotonic()
    assert send(parent) == "done"
    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    second = sampler.sample()
    sample = sample_of(second, spec.key)
    # The child was never seen alive; its 0.4 s reach us through the parent's reaped-children
    # CPU time. Allow for the interpreter start-up it also spent. The share is of the
    # sampler's own interval (snapshot to snapshot), which on a loaded machine can be much
    # longer than the test's sleep: one cycle over a busy /proc takes a while.
    interval = (second.timestamp - first.timestamp).total_seconds()
    assert sample.cpu_percent >= 0.35 / interval * 100, (sample.cpu_percent, interval)


EXITING_CHILD = """
import subprocess, sys
print('ready', flush=True)
code = '''
import sys, time
t = time.process_time()
while time.process_time() - t < 0.5:
    pass
print('burned', flush=True)
sys.stdin.readline()
'''
child = subprocess.Popen([sys.executable, '-c', code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
print(child.stdout.readline().decode().strip(), flush=True)
sys.stdin.readline()
child.stdin.write(b'\\n'); child.stdin.flush(); child.wait()
print('reaped', flush=True)
sys.stdin.read()
"""


def test_reaped_child_cpu_is_not_counted_twice(spawner: Spawner) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "reaper", tag)
    sampler = Sampler([spec], label_discovery=False)
    parent, ready = spawner.python(EXITING_CHILD, tag)
    assert ready == "ready"
    assert parent.stdout is not None
    assert parent.stdout.readline().strip() == b"burned"
    snapshot, first = bracketed(parent.pid, sampler.sample, reaped_children=False)
    seen = sample_of(snapshot, spec.key)
    assert seen.process_count == 2
    assert send(parent) == "reaped"
    time.sleep(0.5)
    snapshot, second = bracketed(parent.pid, sampler.sample, reaped_children=False)
    after = sample_of(snapshot, spec.key)
    assert after.process_count == 1
    # The child's 0.5 s were counted while it lived; now the kernel folds them into the
    # parent's children-CPU, which must not be charged again. The parent's own CPU (read
    # from /proc, without its reaped children) is the truth; charging the 0.5 s again would
    # add at least 0.5 s over the longest possible interval, so half of that is the margin,
    # whatever the interval grew to on a loaded machine.
    _, high = share_bounds(first, second)
    longest = second.after.monotonic_seconds - first.before.monotonic_seconds
    double_count = 100.0 * 0.5 / longest
    assert after.cpu_percent < high + double_count / 2, (after.cpu_percent, high, double_count)


# --- attribution ----------------------------------------------------------------------------

# argv: CHILD_ARG GRANDCHILD_ARG ROOT_ARG; each process's command line ends with its argument.
TREE = """
import subprocess, sys
inner = '''
import subprocess, sys
g = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()', sys.argv[1]],
                     stdin=subprocess.PIPE)
print(g.pid, flush=True)
sys.stdin.read()
'''
child = subprocess.Popen([sys.executable, '-c', inner, sys.argv[2], sys.argv[1]],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
grandchild = child.stdout.readline().decode().strip()
print(child.pid, grandchild, flush=True)
sys.stdin.read()
"""


def test_children_and_grandchildren_are_counted(spawner: Spawner, backend: str) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "tree", f"{tag}$")
    sampler = make_sampler([spec], backend, label_discovery=False)
    root, line = spawner.python(TREE, "child-arg", "grandchild-arg", tag)
    child_pid, grandchild_pid = (int(x) for x in line.split())
    sample = sample_of(sampler.sample(), spec.key)
    assert sample.pids == tuple(sorted([root.pid, child_pid, grandchild_pid]))
    assert sample.process_count == 3
    assert sample.threads >= 3


ORPHANING = """
import subprocess, sys
inner = '''
import subprocess, sys
g = subprocess.Popen(['sleep', '600'])
print(g.pid, flush=True)
sys.stdin.readline()
'''
child = subprocess.Popen([sys.executable, '-c', inner], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
grandchild = child.stdout.readline().decode().strip()
print(child.pid, grandchild, flush=True)
sys.stdin.readline()
child.stdin.write(b'\\n'); child.stdin.flush(); child.wait()
print('orphaned', flush=True)
sys.stdin.read()
"""


def test_orphaned_grandchild_stays_with_its_plugin(spawner: Spawner) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "daemonizing", f"{tag}$")
    sampler = Sampler([spec], label_discovery=False)
    root, line = spawner.python(ORPHANING, tag)
    child_pid, grandchild_pid = (int(x) for x in line.split())
    assert sample_of(sampler.sample(), spec.key).pids == tuple(
        sorted([root.pid, child_pid, grandchild_pid])
    )
    assert send(root) == "orphaned"
    assert psutil.Process(grandchild_pid).ppid() != child_pid  # re-parented
    assert sample_of(sampler.sample(), spec.key).pids == tuple(sorted([root.pid, grandchild_pid]))


def test_descendant_matched_by_another_plugin_belongs_to_it(spawner: Spawner) -> None:
    tag, inner_tag = unique_tag(), unique_tag("pminner")
    outer = cmdline_spec("acme", "outer", f"{tag}$")
    inner = cmdline_spec("acme", "inner", f"{inner_tag}$")
    sampler = Sampler([outer, inner], label_discovery=False)
    root, line = spawner.python(TREE, "child-arg", inner_tag, tag)
    child_pid, grandchild_pid = (int(x) for x in line.split())
    wait_exec_done(grandchild_pid)  # its pid was printed as soon as Popen returned
    snap = sampler.sample()
    cmdlines = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in (child_pid, grandchild_pid)}
    assert sample_of(snap, outer.key).pids == tuple(sorted([root.pid, child_pid])), cmdlines
    assert sample_of(snap, inner.key).pids == (grandchild_pid,)


def test_first_matching_spec_wins(spawner: Spawner) -> None:
    tag = unique_tag()
    first = cmdline_spec("acme", "first", tag)
    second = cmdline_spec("acme", "second", tag)
    sampler = Sampler([first, second], label_discovery=False)
    child, _ = spawner.python(IDLE, tag)
    snap = sampler.sample()
    assert sample_of(snap, first.key).pids == (child.pid,)
    second_sample = sample_of(snap, second.key)
    assert not second_sample.up
    assert second_sample.pids == ()


def test_process_started_after_the_sampler_is_picked_up_next_cycle(
    spawner: Spawner, backend: str
) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "late", tag)
    sampler = make_sampler([spec], backend, label_discovery=False)
    down = sample_of(sampler.sample(), spec.key)
    assert (down.up, down.process_count, down.cpu_percent, down.rss_bytes) == (False, 0, 0.0, 0)
    child, _ = spawner.python(IDLE, tag)
    up = sample_of(sampler.sample(), spec.key)
    assert up.up
    assert up.pids == (child.pid,)
    assert up.rss_bytes > 0
    assert up.oldest_start_time is not None
    expected = psutil.Process(child.pid).create_time()
    assert abs(up.oldest_start_time.timestamp() - expected) < 1.5


def test_vanished_configured_plugin_reports_down_with_zero_usage(spawner: Spawner) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "gone", tag)
    sampler = Sampler([spec], label_discovery=False)
    child, _ = spawner.python(IDLE, tag)
    assert sample_of(sampler.sample(), spec.key).up
    spawner.kill(child)
    for _ in range(3):  # configured plugins are always emitted
        down = sample_of(sampler.sample(), spec.key)
        assert not down.up
        assert (down.process_count, down.cpu_percent, down.rss_bytes, down.threads) == (
            0,
            0.0,
            0,
            0,
        )


def test_restart_is_counted_once(spawner: Spawner) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "restarting", tag)
    sampler = Sampler([spec], label_discovery=False)
    first, _ = spawner.python(IDLE, tag)
    assert sample_of(sampler.sample(), spec.key).restarts == 0
    spawner.kill(first)
    spawner.python(IDLE, tag)
    assert sample_of(sampler.sample(), spec.key).restarts == 1
    assert sample_of(sampler.sample(), spec.key).restarts == 0


def test_label_discovery_then_grace_then_drop(spawner: Spawner, backend: str) -> None:
    tenant = "t" + unique_tag("")[1:]  # a fresh tenant slug
    key = PluginKey(tenant, "labelled", "staging")
    sampler = make_sampler([], backend, label_grace_cycles=2)
    child, _ = spawner.python(
        IDLE,
        env={
            "PLUGINMON_TENANT": tenant,
            "PLUGINMON_PLUGIN": "labelled",
            "PLUGINMON_ENVIRONMENT": "staging",
        },
    )
    sample = sample_of(sampler.sample(), key)
    assert sample.up
    assert sample.pids == (child.pid,)
    spawner.kill(child)
    for _ in range(2):
        assert not sample_of(sampler.sample(), key).up
    assert maybe_sample_of(sampler.sample(), key) is None

    off = make_sampler([], backend, label_discovery=False)
    spawner.python(IDLE, env={"PLUGINMON_TENANT": tenant, "PLUGINMON_PLUGIN": "labelled"})
    assert not [s for s in off.sample().samples if s.key.tenant == tenant]


def test_config_wins_over_labels_and_label_keys_merge(spawner: Spawner) -> None:
    tag = unique_tag()
    tenant = "t" + unique_tag("")[1:]
    spec = cmdline_spec(tenant, "configured", tag)
    sampler = Sampler([spec])
    labels = {"PLUGINMON_TENANT": tenant, "PLUGINMON_PLUGIN": "other"}
    configured, _ = spawner.python(IDLE, tag, env=labels)
    labelled, _ = spawner.python(IDLE, env=labels)
    snap = sampler.sample()
    assert sample_of(snap, spec.key).pids == (configured.pid,)
    assert sample_of(snap, PluginKey(tenant, "other")).pids == (labelled.pid,)


def test_pidfile_env_exe_and_name_matchers_on_real_processes(
    spawner: Spawner, tmp_path: Path
) -> None:
    tag = unique_tag()
    by_pidfile, _ = spawner.python(IDLE, "a")
    by_env, _ = spawner.python(IDLE, "b", env={"PM_ROLE": tag})
    by_exe, _ = spawner.python(IDLE, tag, "c")
    by_name, _ = spawner.python(IDLE, tag, "d")
    pidfile = tmp_path / "plugin.pid"
    pidfile.write_text(f"{by_pidfile.pid}\n")
    comm = psutil.Process(by_name.pid).name()
    specs = parse_plugin_specs(
        [
            {"tenant": "t", "name": "pidfile", "match": {"pidfile": str(pidfile)}},
            {"tenant": "t", "name": "env", "match": {"env": f"PM_ROLE={tag}"}},
            {
                "tenant": "t",
                "name": "exe",
                "match": {"exe": os.path.realpath(PY), "cmdline": f"{tag} c$"},
            },
            {"tenant": "t", "name": "name", "match": {"name": comm, "cmdline": f"{tag} d$"}},
        ]
    )
    sampler = Sampler(specs, label_discovery=False)
    snap = sampler.sample()
    got = {s.key.plugin: s.pids for s in snap.samples}
    assert got == {
        "pidfile": (by_pidfile.pid,),
        "env": (by_env.pid,),
        "exe": (by_exe.pid,),
        "name": (by_name.pid,),
    }
    # The pidfile is re-read every cycle: point it at another process.
    pidfile.write_text(f"{by_env.pid}\n")
    got = {s.key.plugin: s.pids for s in sampler.sample().samples}
    assert got["pidfile"] == (by_env.pid,)
    assert got["env"] == ()


def test_update_specs_applies_on_next_cycle(spawner: Spawner) -> None:
    tag_a, tag_b = unique_tag(), unique_tag()
    spec_a = cmdline_spec("acme", "a", tag_a)
    spec_b = cmdline_spec("acme", "b", tag_b)
    sampler = Sampler([spec_a], label_discovery=False)
    spawner.python(IDLE, tag_a)
    b, _ = spawner.python(IDLE, tag_b)
    assert [s.key for s in sampler.sample().samples] == [spec_a.key]
    sampler.update_specs([spec_b])
    snap = sampler.sample()
    assert [s.key for s in snap.samples] == [spec_b.key]
    assert snap.samples[0].pids == (b.pid,)


# --- counters and opt-in fields ---------------------------------------------------------------

WRITER_PARENT = """
import subprocess, sys
print('ready', flush=True)
code = '''
import os, sys
with open(sys.argv[1], 'wb') as f:
    f.write(b'x' * (4 << 20)); f.flush(); os.fsync(f.fileno())
print('written', flush=True)
sys.stdin.readline()
'''
sys.stdin.readline()
child = subprocess.Popen([sys.executable, '-c', code, sys.argv[2]],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
print(child.stdout.readline().decode().strip(), flush=True)
sys.stdin.readline()
child.stdin.write(b'\\n'); child.stdin.flush(); child.wait()
print('reaped', flush=True)
sys.stdin.read()
"""


def test_counters_stay_monotonic_when_a_child_exits(spawner: Spawner, tmp_path: Path) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "writer", tag)
    sampler = Sampler([spec], label_discovery=False, fields=DEFAULT_FIELDS | {"io", "ctx_switches"})
    parent, _ = spawner.python(WRITER_PARENT, tag, str(tmp_path / "out.bin"))
    first = sample_of(sampler.sample(), spec.key)
    assert send(parent) == "written"
    during = sample_of(sampler.sample(), spec.key)
    assert during.process_count == 2
    assert first.write_bytes is not None
    assert during.write_bytes is not None
    assert during.write_bytes >= first.write_bytes + 4 * MIB
    assert send(parent) == "reaped"
    after = sample_of(sampler.sample(), spec.key)
    assert after.process_count == 1
    assert after.write_bytes is not None
    # Never backwards, and the child's 4 MiB, now folded into the parent's counter by the
    # kernel, are not counted a second time.
    assert during.write_bytes <= after.write_bytes < during.write_bytes + MIB
    for name in ("read_bytes", "ctx_switches_voluntary", "ctx_switches_involuntary"):
        before_value, after_value = getattr(during, name), getattr(after, name)
        assert before_value is not None
        assert after_value is not None
        assert after_value >= before_value, name


def test_optional_fields_only_when_asked(spawner: Spawner, backend: str) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "fields", tag)
    child, _ = spawner.python(IDLE, tag)
    wait_asleep(child.pid)  # blocked on stdin: at least one voluntary switch, counted below
    lean = sample_of(make_sampler([spec], backend, label_discovery=False).sample(), spec.key)
    assert (lean.fds, lean.uss_bytes, lean.swap_bytes, lean.read_bytes) == (None,) * 4
    assert lean.ctx_switches_voluntary is None
    full = sample_of(
        make_sampler([spec], backend, label_discovery=False, fields=ALL_FIELDS).sample(),
        spec.key,
    )
    assert full.fds is not None
    assert full.fds >= 3
    assert full.uss_bytes is not None
    assert 0 < full.uss_bytes <= full.rss_bytes
    assert full.swap_bytes is not None
    assert full.read_bytes is not None
    assert full.ctx_switches_voluntary is not None
    assert full.ctx_switches_voluntary >= 1
    with pytest.raises(ValueError, match="unknown sample fields"):
        Sampler([spec], fields=frozenset({"cpu", "gpu"}))
    assert frozenset({"fds", "io", "ctx_switches", "uss", "swap"}) == OPTIONAL_FIELDS


# --- robustness -------------------------------------------------------------------------------

ZOMBIE_PARENT = """
import subprocess, sys, time
z = subprocess.Popen([sys.executable, '-c', 'pass'])
while open(f'/proc/{z.pid}/stat').read().rpartition(') ')[2][0] != 'Z':
    time.sleep(0.01)
print(z.pid, flush=True)  # never waited for: a zombie until we exit
sys.stdin.read()
"""


def test_zombies_are_counted_not_sampled(spawner: Spawner) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "zombie-maker", tag)
    sampler = Sampler([spec], label_discovery=False)
    parent, zombie = spawner.python(ZOMBIE_PARENT, tag)
    snap = sampler.sample()
    assert sample_of(snap, spec.key).pids == (parent.pid,)
    assert errors_of(snap)["zombie"] >= 1
    assert set(errors_of(snap)) == {"access_denied", "no_such_process", "zombie"}
    assert int(zombie) not in sample_of(snap, spec.key).pids


def test_process_gone_between_listing_and_reading(spawner: Spawner, tmp_path: Path) -> None:
    """A /proc whose listing still shows processes that are gone when read.

    The tree links real /proc entries: one live plugin process, one process that has exited
    and been reaped (listed, but its files are gone), and copies of a plugin process's stat
    and cmdline without its other files (it "exits" between stat and the opt-in reads).
    """
    tag = unique_tag()
    spec = cmdline_spec("acme", "racy", tag)
    live, _ = spawner.python(IDLE, tag)
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    proc_root = tmp_path / "proc"
    proc_root.mkdir()
    (proc_root / str(live.pid)).symlink_to(f"/proc/{live.pid}")
    (proc_root / str(dead.pid)).symlink_to(f"/proc/{dead.pid}")
    (proc_root / "self").symlink_to("/proc/self")  # not a pid: ignored
    fake_pid = 4_000_000  # above pid_max: cannot collide with a real process
    fake_proc_entry(proc_root, fake_pid, stat_from=live.pid, cmdline=[PY, "-c", "x", tag])
    (proc_root / str(fake_pid) / "environ").unlink()
    no_cmdline_pid = fake_pid + 1
    fake_proc_entry(proc_root, no_cmdline_pid, stat_from=live.pid)
    (proc_root / str(no_cmdline_pid) / "cmdline").unlink()

    sampler = Sampler([spec], proc_root=str(proc_root), fields=ALL_FIELDS)
    snap = sampler.sample()
    sample = sample_of(snap, spec.key)
    assert sample.pids == (live.pid, fake_pid)
    assert snap.processes_seen == 3
    # dead: stat gone; fake: fd/io/status/smaps gone; no_cmdline: cmdline gone
    assert errors_of(snap)["no_such_process"] >= 3
    assert sample.fds is not None  # from the live process
    assert sample.fds >= 3


def test_psutil_source_reports_gone_processes(spawner: Spawner) -> None:
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    source = PsutilSource()
    with pytest.raises(ProcessGone):
        source.cmdline(dead.pid)
    assert source.extras(dead.pid, ALL_FIELDS).gone


def test_pid_reuse_is_never_charged_to_the_old_plugin(spawner: Spawner, tmp_path: Path) -> None:
    """Same pid, new start time: a new process, matched afresh (simulated in a /proc copy)."""
    tag = unique_tag()
    spec = cmdline_spec("acme", "old-owner", tag)
    real, _ = spawner.python(BURNER, tag)
    time.sleep(0.3)  # let it accumulate CPU time
    stat = Path(f"/proc/{real.pid}/stat").read_bytes().rpartition(b") ")[2].split()
    real_start = int(stat[19])
    proc_root = tmp_path / "proc"
    pid = 4_000_000

    fake_proc_entry(
        proc_root, pid, stat_from=real.pid, start_ticks=real_start - 500, cmdline=[PY, tag]
    )
    sampler = Sampler([spec], proc_root=str(proc_root), label_discovery=False)
    assert sample_of(sampler.sample(), spec.key).pids == (pid,)

    # The pid is reused by an unrelated program (same comm, so only the start time tells).
    fake_proc_entry(
        proc_root, pid, stat_from=real.pid, start_ticks=real_start, cmdline=[PY, "unrelated"]
    )
    reused = sample_of(sampler.sample(), spec.key)
    assert not reused.up
    assert reused.pids == ()

    # Reused again, by a process that does match: a new process, so a restart, and its CPU
    # is not a delta against the old process's counters.
    fake_proc_entry(proc_root, pid, stat_from=real.pid, start_ticks=real_start, cmdline=[PY, tag])
    sampler2 = Sampler([spec], proc_root=str(proc_root), label_discovery=False)
    fake_proc_entry(
        proc_root, pid, stat_from=real.pid, start_ticks=real_start - 500, cmdline=[PY, tag]
    )
    sampler2.sample()
    fake_proc_entry(proc_root, pid, stat_from=real.pid, start_ticks=real_start, cmdline=[PY, tag])
    again = sample_of(sampler2.sample(), spec.key)
    assert again.up
    assert again.restarts == 1
    assert 0.0 <= again.cpu_percent <= 100.0


def test_systemd_unit_and_cgroup_from_proc(spawner: Spawner, tmp_path: Path) -> None:
    proc_root = tmp_path / "proc"
    me = os.getpid()
    fake_proc_entry(proc_root, 100, stat_from=me, cgroup="/system.slice/resizer.service")
    fake_proc_entry(proc_root, 101, stat_from=me, cgroup="/system.slice/other.service")
    fake_proc_entry(proc_root, 102, stat_from=me, cgroup="/tenants/acme/jobs/7")
    specs = parse_plugin_specs(
        [
            {"tenant": "t", "name": "unit", "match": {"systemd_unit": "resizer"}},
            {"tenant": "t", "name": "glob", "match": {"cgroup": "/tenants/acme/*"}},
        ]
    )
    snap = Sampler(specs, proc_root=str(proc_root), label_discovery=False).sample()
    assert {s.key.plugin: s.pids for s in snap.samples} == {"unit": (100,), "glob": (102,)}


CHURNER = """
import os, subprocess, sys
print('ready', flush=True)
sys.stdin.readline()
pids = []
batches = 0
# At least the given number of batches, then on until the test has seen enough (the stop
# file): on a loaded machine one sampling cycle can outlast a fixed number of batches.
while batches < int(sys.argv[2]) or not os.path.exists(sys.argv[3]):
    batch = [subprocess.Popen(['sleep', '0.02']) for _ in range(10)]
    pids += [p.pid for p in batch]
    for p in batch:
        p.wait()
    batches += 1
with open(sys.argv[1], 'w') as f:
    f.write(' '.join(map(str, pids)))
print('done', flush=True)
sys.stdin.read()
"""


def test_churn_of_short_lived_processes_is_attributed_correctly(
    spawner: Spawner, tmp_path: Path
) -> None:
    tag_a, tag_b = unique_tag(), unique_tag()
    spec_a = cmdline_spec("acme", "churn-a", tag_a)
    spec_b = cmdline_spec("acme", "churn-b", tag_b)
    sampler = Sampler([spec_a, spec_b], label_discovery=True)
    batches = "25"  # at least 250 children each, 750 in all
    stop = tmp_path / "stop"
    a, _ = spawner.python(CHURNER, str(tmp_path / "a"), batches, str(stop), tag_a)
    b, _ = spawner.python(CHURNER, str(tmp_path / "b"), batches, str(stop), tag_b)
    unrelated, _ = spawner.python(CHURNER, str(tmp_path / "u"), batches, str(stop))
    for child in (a, b, unrelated):
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
    snapshots: list[Snapshot] = []

    def done() -> bool:
        return all((tmp_path / n).exists() for n in "abu")

    def children_seen(snap: Snapshot) -> int:
        return len(sample_of(snap, spec_a.key).pids) + len(sample_of(snap, spec_b.key).pids) - 2

    # Sample until at least 5 cycles saw the churn and one of them a child (bounded), then
    # let the churners finish; every snapshot is checked below.
    deadline = time.monotonic() + 120
    while len(snapshots) < 5 or not any(children_seen(snap) for snap in snapshots):
        assert time.monotonic() < deadline, "the sampler never saw a churning child in 120 s"
        snapshots.append(sampler.sample())
        time.sleep(0.01)
    stop.touch()
    while not done():
        snapshots.append(sampler.sample())
        time.sleep(0.01)
    wait_for(done)
    children = {n: {int(x) for x in (tmp_path / n).read_text().split()} for n in "abu"}
    allowed_a = children["a"] | {a.pid}
    allowed_b = children["b"] | {b.pid}
    seen_children = 0
    cpu_series = []
    for snap in snapshots:
        pids_a = set(sample_of(snap, spec_a.key).pids)
        pids_b = set(sample_of(snap, spec_b.key).pids)
        assert a.pid in pids_a
        assert b.pid in pids_b
        assert pids_a <= allowed_a
        assert pids_b <= allowed_b
        assert not pids_a & pids_b
        seen_children += len(pids_a) + len(pids_b) - 2
        cpu_series.append(sample_of(snap, spec_a.key).cpu_percent)
    assert len(snapshots) >= 5
    assert seen_children > 0, "no child was ever seen: the test did not exercise churn"
    assert all(0.0 <= c < 400.0 for c in cpu_series)


def test_optional_fields_every_nth_cycle(spawner: Spawner) -> None:
    tag = unique_tag()
    spec = cmdline_spec("acme", "sparse", tag)
    spawner.python(IDLE, tag)
    sampler = Sampler(
        [spec],
        label_discovery=False,
        fields=DEFAULT_FIELDS | {"fds", "io"},
        optional_every_cycles=2,
    )
    got = [sample_of(sampler.sample(), spec.key) for _ in range(3)]
    assert [s.fds is not None for s in got] == [True, False, True]
    assert [s.read_bytes is not None for s in got] == [True, False, True]
    assert all(s.rss_bytes > 0 for s in got)
    with pytest.raises(ValueError, match="optional_every_cycles"):
        Sampler([spec], optional_every_cycles=0)


async def test_sampling_off_the_loop_with_a_reload_in_between(spawner: Spawner) -> None:
    tag_a, tag_b = unique_tag(), unique_tag()
    spec_a = cmdline_spec("acme", "a", tag_a)
    spec_b = cmdline_spec("acme", "b", tag_b)
    spawner.python(IDLE, tag_a)
    b, _ = spawner.python(IDLE, tag_b)
    sampler = Sampler([spec_a], label_discovery=False)
    running = asyncio.create_task(asyncio.to_thread(sampler.sample))
    sampler.update_specs([spec_a, spec_b])  # from the loop, while a sample may be running
    first = await running
    assert sample_of(first, spec_a.key).up
    second = await asyncio.to_thread(sampler.sample)
    assert sample_of(second, spec_b.key).pids == (b.pid,)
