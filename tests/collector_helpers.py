"""Real child processes for the collector tests, and a fake /proc built from real files."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from pluginmon.collectors.models import PluginKey, PluginSample, PluginSpec, Snapshot
from pluginmon.daemon.config_sections import parse_plugin_specs

PY = sys.executable


def unique_tag(prefix: str = "pmtest") -> str:
    """A marker for one test's command lines; other tests (and other people) never use it."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def cmdline_spec(tenant: str, name: str, pattern: str, **extra: object) -> PluginSpec:
    (spec,) = parse_plugin_specs(
        [{"tenant": tenant, "name": name, "match": {"cmdline": pattern}, **extra}]
    )
    return spec


def sample_of(snapshot: Snapshot, key: PluginKey) -> PluginSample:
    for sample in snapshot.samples:
        if sample.key == key:
            return sample
    raise AssertionError(f"{key} not in snapshot: {[s.key for s in snapshot.samples]}")


def maybe_sample_of(snapshot: Snapshot, key: PluginKey) -> PluginSample | None:
    return next((s for s in snapshot.samples if s.key == key), None)


class Spawner:
    """Starts `python -c CODE TAG ...` children in their own sessions; kills them all at the end."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def python(
        self,
        code: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Run CODE; if wait_ready, wait for its first stdout line (returned, stripped)."""
        full_env = dict(os.environ)
        if env is not None:
            full_env.update(env)
        child = subprocess.Popen(
            [PY, "-c", code, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
        self.children.append(child)
        line = b""
        if wait_ready:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line, f"child exited early with {child.wait()}"
        return child, line.decode().strip()

    def kill(self, child: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()

    def close(self) -> None:
        for child in self.children:
            self.kill(child)


def send(child: subprocess.Popen[bytes], line: str = "go") -> str:
    """Write one line to the child's stdin and read its one-line answer."""
    assert child.stdin is not None
    assert child.stdout is not None
    child.stdin.write(line.encode() + b"\n")
    child.stdin.flush()
    return child.stdout.readline().decode().strip()


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def wait_exec_done(pid: int) -> None:
    """Until /proc shows the new program's command line. Popen returns once the exec is past
    its point of no return (the close-on-exec pipe closed), a moment before the kernel sets
    the new image's arguments and environment: /proc/PID/cmdline and environ read empty until
    then (right after Popen, 4% of `sleep` children here, 40% with the cores busy). The
    sampler reads such a process again on its next cycle (Sampler._confirm); a test that
    samples once must wait."""
    wait_for(lambda: Path(f"/proc/{pid}/cmdline").read_bytes() != b"")


def wait_asleep(pid: int) -> None:
    """Until the process sleeps (state S: an IDLE child blocked reading stdin). Its "ready"
    line comes before that read: a child preempted in between has not yet switched out of
    its own accord (ctx_switches_voluntary can still be 0)."""
    wait_for(lambda: Path(f"/proc/{pid}/stat").read_bytes().rpartition(b") ")[2][:1] == b"S")


# A child that prints "ready" and then waits for stdin to close.
IDLE = "import sys; print('ready', flush=True); sys.stdin.read()"


def fake_proc_entry(
    proc_root: Path,
    pid: int,
    *,
    stat_from: int,
    start_ticks: int | None = None,
    cmdline: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cgroup: str | None = None,
) -> None:
    """Write /proc-like files for PID under proc_root, taken from the real process STAT_FROM.

    The stat line is the real one with the pid (and optionally the start time) replaced, so
    the parser reads exactly what the kernel writes.
    """
    real = Path(f"/proc/{stat_from}")
    data = (real / "stat").read_bytes()
    head, _, tail = data.rpartition(b") ")
    comm = head[head.find(b"(") + 1 :]
    fields = tail.split(b" ")
    if start_ticks is not None:
        fields[19] = str(start_ticks).encode()
    entry = proc_root / str(pid)
    entry.mkdir(parents=True, exist_ok=True)
    (entry / "stat").write_bytes(b"%d (%s) " % (pid, comm) + b" ".join(fields))
    args = cmdline if cmdline is not None else [PY, "-c", "pass"]
    (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
    env = environ if environ is not None else {}
    (entry / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
    (entry / "cgroup").write_text(f"0::{cgroup or '/'}\n")
