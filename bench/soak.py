"""Chaos soak: `pluginmon run` against a database that is stopped, started and frozen at random.

For DURATION seconds (10 minutes by default) a real daemon samples 200 real processes in 50
plugins every second, while this script, from one seeded random schedule:

  churns   kills a random plugin process every few seconds and starts a replacement; a few
           times, kills all processes of one plugin for 45-60 s (a PluginDown alert, for 30 s,
           must fire and then resolve)
  database stops the embedded PostgreSQL (fast shutdown) for 5-20 s, or freezes every one of
           its processes with SIGSTOP for 5-15 s (connections hang, COPYs time out, a commit
           may land after the client gave up), then brings it back
  receiver a signing webhook receiver flaps: up (200), failing (503) or not listening

At the end the chaos stops, the daemon drains its spools and outbox and is stopped with
SIGTERM, and the script compares:

  rows     plugin samples the daemon took (its final counts) with the rows in plugin_samples,
           and looks for any (timestamp, plugin, host) stored twice
  alerts   every plugin taken down long enough has a PluginDown alert instance started
           during its down time
  webhooks every notification the outbox recorded as delivered reached the receiver at least
           once (by its Idempotency-Key), every key the receiver saw is recorded once in
           alert_notifications_sent, and nothing is left pending
  memory   the daemon's RSS, sampled every 5 s: the peak of the second half against the first

Run: .venv/bin/python bench/soak.py [--duration 600] [--seed 7]
Last line: soak_rows_missing=<n> (samples taken minus rows stored; target 0).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pluginmon.storage.embedded import EmbeddedPostgres  # noqa: E402

PLUGINS = 50
PROCESSES_PER_PLUGIN = 4
IDLE = "import time\nwhile True:\n    time.sleep(1)\n"
DOWN_SECONDS = (45.0, 60.0)  # a plugin taken down this long: PluginDown (30 s) must fire
WEBHOOK_SECRET = "soak-webhook-secret"  # noqa: S105  (a throwaway receiver)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- plugin processes ------------------------------------------------------------------------


class Plugins:
    """50 plugins of 4 idle processes each, found by a cmdline marker."""

    def __init__(self) -> None:
        self.marker = f"pluginmon-soak-{uuid.uuid4().hex[:8]}"
        self.procs: dict[int, list[subprocess.Popen[bytes]]] = {i: [] for i in range(PLUGINS)}
        self.down: set[int] = set()

    def name(self, index: int) -> str:
        return f"p{index:02d}"

    def config(self) -> str:
        return "".join(
            f"""
[[plugins]]
tenant = "soak"
name = "{self.name(i)}"
environment = "test"
match = {{ cmdline = "{self.marker}-{self.name(i)}$" }}
"""
            for i in range(PLUGINS)
        )

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", IDLE, f"{self.marker}-{self.name(index)}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def start_all(self) -> None:
        for index in range(PLUGINS):
            self.fill(index)

    def fill(self, index: int) -> None:
        alive = [p for p in self.procs[index] if p.poll() is None]
        while len(alive) < PROCESSES_PER_PLUGIN:
            alive.append(self._spawn(index))
        self.procs[index] = alive

    def churn_one(self, rng: random.Random) -> None:
        index = rng.choice([i for i in range(PLUGINS) if i not in self.down])
        victim = rng.choice(self.procs[index])
        victim.kill()
        victim.wait()
        self.fill(index)

    def take_down(self, index: int) -> None:
        self.down.add(index)
        for proc in self.procs[index]:
            proc.kill()
            proc.wait()
        self.procs[index] = []

    def bring_up(self, index: int) -> None:
        self.down.discard(index)
        self.fill(index)

    def stop(self) -> None:
        for procs in self.procs.values():
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()


# -- the webhook receiver ----------------------------------------------------------------------


class Receiver:
    """A webhook receiver that records each POST's Idempotency-Key; it flaps between up,
    failing (503) and not listening."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "up"
        self.received: list[tuple[str, str]] = []  # (idempotency key, status of the payload)
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.mode != "up":
                    self.send_response(503)
                    self.end_headers()
                    return
                status = str(json.loads(body).get("status", ""))
                with receiver._lock:
                    receiver.received.append((self.headers.get("Idempotency-Key", ""), status))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        return Handler

    def listen(self) -> None:
        if self._server is not None:
            return
        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None

    def flap(self, mode: str) -> None:
        self.mode = mode
        if mode == "down":
            self.close()
        else:
            self.listen()


# -- the database ----------------------------------------------------------------------------


class Database:
    """The embedded PostgreSQL the daemon writes to: stopped, started, frozen, thawed."""

    def __init__(self, directory: Path) -> None:
        self.server = EmbeddedPostgres(directory)
        self.frozen: list[int] = []

    def start(self) -> str:
        return self.server.start()

    def stop(self) -> None:
        self.server.stop(mode="fast")

    def _pids(self) -> list[int]:
        postmaster = int((self.server.pgdata / "postmaster.pid").read_text().split()[0])
        pids = [postmaster]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == postmaster:
                    pids.append(int(entry.name))
        return pids

    def freeze(self) -> None:
        self.frozen = self._pids()
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []


# -- the daemon ------------------------------------------------------------------------------


class Daemon:
    def __init__(self, *, data_dir: Path, url: str, config: str) -> None:
        self.port = free_port()
        self.log_path = data_dir / "daemon.log"
        config_path = data_dir / "soak.toml"
        config_path.write_text(config)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLUGINMON_")}
        env.update(
            PLUGINMON_DATABASE_URL=url,
            PLUGINMON_DATA_DIR=str(data_dir / "state"),
            PLUGINMON_HTTP_HOST="127.0.0.1",
            PLUGINMON_HTTP_PORT=str(self.port),
            PLUGINMON_LOG_FORMAT="json",
            PLUGINMON_SAMPLE_INTERVAL_SECONDS="1",
            PLUGINMON_LABEL_DISCOVERY="false",
            PLUGINMON_OUTBOX_INTERVAL_SECONDS="1",
            PLUGINMON_SHUTDOWN_DEADLINE_SECONDS="30",
        )
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pluginmon.daemon.cli", "run", "--config", str(config_path)],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def metrics(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/metrics", timeout=10
        ) as response:
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        return values

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=120)
        self._log.close()
        return code

    def final_counts(self) -> dict[str, Any]:
        for line in reversed(self.log_path.read_text(errors="replace").splitlines()):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and "samples_taken" in record:
                    return record
        raise RuntimeError("no final counts in the daemon's log")


def wait_for(what: str, probe: Callable[[], bool], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if probe():
                return
        time.sleep(1)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


# -- the chaos schedule ----------------------------------------------------------------------


@dataclass
class Outcomes:
    down_episodes: list[tuple[str, float, float]] = field(default_factory=list)  # plugin, from, to
    database_actions: list[str] = field(default_factory=list)
    rss_mib: list[tuple[float, float]] = field(default_factory=list)


def chaos(
    *,
    rng: random.Random,
    duration: float,
    plugins: Plugins,
    database: Database,
    receiver: Receiver,
    daemon: Daemon,
) -> Outcomes:
    outcomes = Outcomes()
    start = time.monotonic()
    next_churn = start + 2
    next_database = start + rng.uniform(20, 40)
    database_back_at: float | None = None
    next_flap = start + rng.uniform(5, 15)
    next_rss = start
    down: dict[int, tuple[float, float]] = {}  # plugin -> (down since, up again at)
    # A few plugins go down for good stretches, spread over the run (not in its last 90 s).
    down_starts = sorted(rng.uniform(10, max(11.0, duration - 90)) for _ in range(4))
    while (now := time.monotonic()) - start < duration:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {daemon.proc.returncode}")
        if now >= next_churn:
            plugins.churn_one(rng)
            next_churn = now + rng.uniform(1, 4)
        if down_starts and now - start >= down_starts[0]:
            down_starts.pop(0)
            index = rng.choice([i for i in range(PLUGINS) if i not in plugins.down])
            plugins.take_down(index)
            down[index] = (time.time(), now + rng.uniform(*DOWN_SECONDS))
            log(f"plugin {plugins.name(index)} down")
        for index, (since, until) in list(down.items()):
            if now >= until:
                plugins.bring_up(index)
                outcomes.down_episodes.append((plugins.name(index), since, time.time()))
                del down[index]
                log(f"plugin {plugins.name(index)} up again")
        if database_back_at is None and now >= next_database:
            if rng.random() < 0.5:
                database.stop()
                action = "stopped"
                database_back_at = now + rng.uniform(5, 20)
            else:
                database.freeze()
                action = "frozen (SIGSTOP)"
                database_back_at = now + rng.uniform(5, 15)
            outcomes.database_actions.append(action)
            log(f"database {action}")
        if database_back_at is not None and now >= database_back_at:
            if database.frozen:
                database.thaw()
            else:
                database.start()
            database_back_at = None
            next_database = time.monotonic() + rng.uniform(20, 50)
            log("database back")
        if now >= next_flap:
            mode = rng.choice(["up", "up", "failing", "down"])
            receiver.flap(mode)
            next_flap = now + rng.uniform(5, 15)
        if now >= next_rss:
            outcomes.rss_mib.append((now - start, daemon.rss_mib()))
            next_rss = now + 5
        time.sleep(0.2)
    for index in list(down):
        plugins.bring_up(index)
        outcomes.down_episodes.append((plugins.name(index), down[index][0], time.time()))
    if database.frozen:
        database.thaw()
    elif not database.server.is_running():
        database.start()
    receiver.flap("up")
    return outcomes


# -- the checks ------------------------------------------------------------------------------


def check(
    url: str, daemon: Daemon, receiver: Receiver, outcomes: Outcomes
) -> tuple[int, list[str]]:
    counts = daemon.final_counts()
    lines: list[str] = []
    with psycopg.connect(url) as conn:
        stored = int(conn.execute("SELECT count(*) FROM plugin_samples").fetchone()[0])  # type: ignore[index]
        doubled = int(
            conn.execute(
                "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM plugin_samples"
                ' GROUP BY "timestamp", plugin_id, host HAVING count(*) > 1) AS d'
            ).fetchone()[0]  # type: ignore[index]
        )
        ledger_batches = conn.execute("SELECT count(*) FROM ingest_ledger").fetchone()[0]  # type: ignore[index]
        alerts = conn.execute(
            "SELECT p.name, a.started_at FROM plugin_alerts a JOIN plugins p ON p.id = a.plugin_id"
            " WHERE a.rule_name = 'PluginDown' AND a.fired_at IS NOT NULL"
        ).fetchall()
        outbox = conn.execute("SELECT idempotency_key, status FROM notification_outbox").fetchall()
        sent = [
            row[0] for row in conn.execute("SELECT idempotency_key FROM alert_notifications_sent")
        ]
    taken = int(counts["samples_taken"])
    missing = taken - stored + doubled
    lines.append(
        f"rows: {taken} samples taken, {stored} rows stored, {doubled} stored twice, "
        f"{counts['rows_in_spool']} left in the spools, {counts['rows_dropped']} dropped; "
        f"{ledger_batches} batches in the ingest ledger"
    )

    lost_alerts = []
    for plugin, since, until in outcomes.down_episodes:
        if until - since < 40:
            continue
        fired = [
            started
            for name, started in alerts
            if name == plugin and since - 5 <= started.timestamp() <= until + 5
        ]
        if not fired:
            lost_alerts.append(plugin)
    lines.append(
        f"alerts: {len(outcomes.down_episodes)} plugins taken down, {len(alerts)} PluginDown "
        f"instances, lost: {lost_alerts or 'none'}"
    )

    received_keys = {key for key, _status in receiver.received}
    delivered = [key for key, status in outbox if status == "delivered"]
    not_received = [key for key in delivered if key not in received_keys]
    unrecorded = sorted(received_keys - set(sent))
    recorded_twice = len(sent) - len(set(sent))
    pending = sum(1 for _key, status in outbox if status != "delivered")
    lines.append(
        f"webhooks: {len(outbox)} notifications in the outbox ({pending} not delivered), "
        f"{len(receiver.received)} POSTs received ({len(received_keys)} keys), delivered but "
        f"never received: {len(not_received)}, received but not recorded: {len(unrecorded)}, "
        f"recorded twice: {recorded_twice}"
    )

    half = len(outcomes.rss_mib) // 2
    first = max((rss for _t, rss in outcomes.rss_mib[:half]), default=0.0)
    second = max((rss for _t, rss in outcomes.rss_mib[half:]), default=0.0)
    lines.append(
        f"memory: daemon RSS peak {first:.1f} MiB in the first half, {second:.1f} MiB in the "
        f"second ({len(outcomes.rss_mib)} samples)"
    )
    lines.append(
        f"chaos: database {', '.join(outcomes.database_actions) or 'untouched'}; "
        f"{len(receiver.received)} webhook POSTs accepted"
    )
    return missing, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="pluginmon-soak-") as directory:
        root = Path(directory)
        database = Database(root / "pg")
        url = database.start()
        plugins = Plugins()
        receiver = Receiver()
        receiver.listen()
        rules = f"""
[[alerts.webhooks]]
name = "soak"
url = "{receiver.url}"
secret = "{WEBHOOK_SECRET}"
"""
        plugins.start_all()
        daemon = Daemon(data_dir=root, url=url, config=plugins.config() + rules)
        try:
            wait_for("the daemon to answer", lambda: bool(daemon.metrics()), timeout=120)
            log(
                f"soak: {PLUGINS * PROCESSES_PER_PLUGIN} processes in {PLUGINS} plugins, "
                f"{args.duration:g} s, seed {args.seed}"
            )
            outcomes = chaos(
                rng=rng,
                duration=args.duration,
                plugins=plugins,
                database=database,
                receiver=receiver,
                daemon=daemon,
            )
            log("chaos over; waiting for the spools and the outbox to drain")

            def drained() -> bool:
                values = daemon.metrics()
                return (
                    values.get("pluginmon_spool_samples", 1) == 0
                    and values.get("pluginmon_database_up", 0) == 1
                )

            wait_for("the spools to drain", drained, timeout=600)
            time.sleep(10)  # the last notifications
            code = daemon.stop()
            log(f"daemon stopped with exit code {code}")
            missing, lines = check(url, daemon, receiver, outcomes)
        finally:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
            plugins.stop()
            receiver.close()
            with contextlib.suppress(Exception):
                database.thaw()
                database.stop()
    for line in lines:
        print(line)
    print(f"soak_rows_missing={missing}")


if __name__ == "__main__":
    main()
