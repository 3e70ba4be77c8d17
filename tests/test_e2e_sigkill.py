"""`pluginmon run` SIGKILLed at random moments: at most the cycle in flight is lost, no row is doubled.

The daemon logs one line per sampling cycle at debug level (the cycle's timestamp and how
many plugin samples it took) before it stores the cycle; the test compares those lines,
run by run, with the rows in plugin_samples once a last run has drained every spool.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from pluginmon.storage.migrate import migrate
from tests.daemon_helpers import DaemonProcess, plugin_processes, wait_for
from tests.dbutil import create_database, drop_database, is_citus, with_database

KILLS = 20
SEED = 1212
INTERVAL_SECONDS = 0.25
# Three more plugins of one idle process each, besides the helpers' burner and sleeper.
IDLE = "import time; time.sleep(3600)"
IDLE_PLUGINS = ("idle-a", "idle-b", "idle-c")

Cycle = tuple[datetime, int]  # (sample timestamp, plugin samples taken)


@pytest.fixture
def e2e_db(pg_admin_url: str) -> Iterator[str]:
    """An empty database on the test server: the daemon migrates it itself.

    On Citus it is migrated first: there the migrations take ~25 s (sql/100 alone ~16 s),
    far longer than a run lives here (a kill within eight 0.25 s cycles), so every run would
    be killed while migrating, each killed migration holding plugin_samples locked until its
    server process finished the statement (~15 s per kill, 20 kills: over the file's
    timeout) and no run would ever write a sample. The kills then land where the test means
    them to: in the spool replay, an id lookup, a COPY or an ack.
    """
    name = create_database(pg_admin_url, prefix="e2e")
    try:
        url = with_database(pg_admin_url, name)
        if is_citus(pg_admin_url):
            migrate(url)
        yield url
    finally:
        drop_database(pg_admin_url, name)


def cycles_of(daemon: DaemonProcess) -> list[Cycle]:
    """The cycles the daemon logged, in order (a line torn by the kill is skipped)."""
    return [
        (datetime.fromisoformat(str(record["cycle_timestamp"])), int(record["cycle_samples"]))
        for record in daemon.log_records()
        if "cycle_timestamp" in record
    ]


def rows_by_timestamp(database_url: str) -> Counter[datetime]:
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        rows = conn.execute(
            'SELECT "timestamp", count(*) FROM plugin_samples GROUP BY "timestamp"'
        ).fetchall()
    return Counter({row[0]: int(row[1]) for row in rows})


def duplicated_rows(database_url: str) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url, connect_timeout=10) as conn:
        return conn.execute(
            'SELECT "timestamp", plugin_id, host, count(*) FROM plugin_samples'
            ' GROUP BY "timestamp", plugin_id, host HAVING count(*) > 1'
        ).fetchall()


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_at_most_the_cycle_in_flight(
    e2e_db: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    data_dir = tmp_path / "data"
    with plugin_processes() as plugins:
        for name in IDLE_PLUGINS:
            plugins.start(name, IDLE)
        config = plugins.config() + "".join(
            f"""
[[plugins]]
tenant = "e2e"
name = "{name}"
environment = "test"
match = {{ cmdline = "{plugins.marker}-{name}$" }}
"""
            for name in IDLE_PLUGINS
        )

        def daemon_run(number: int) -> DaemonProcess:
            return DaemonProcess(
                tmp_path=tmp_path,
                database_url=e2e_db,
                config_text=config,
                data_dir=data_dir,
                interval=INTERVAL_SECONDS,
                extra_env={"PLUGINMON_LOG_LEVEL": "DEBUG"},
                name=f"run-{number}",
            )

        killed: list[DaemonProcess] = []
        for number in range(KILLS):
            daemon = daemon_run(number).start()
            killed.append(daemon)
            try:

                def sampled(daemon: DaemonProcess = daemon) -> bool:
                    daemon.assert_alive()
                    return bool(cycles_of(daemon))

                wait_for("a first sampling cycle", sampled, timeout=120, interval=0.05)
                # A random moment within the next eight cycles: during the start-up replay
                # of both spools, an id lookup, a COPY, an ack, or between them.
                time.sleep(rng.uniform(0.0, 8 * INTERVAL_SECONDS))
            finally:
                daemon.kill()  # SIGKILL
            assert daemon.proc is not None
            assert daemon.proc.returncode == -signal.SIGKILL, daemon.log_text()[-3000:]
            # After each kill nothing is doubled, whatever the next start replays.
            assert duplicated_rows(e2e_db) == []

        final = daemon_run(KILLS).start()
        try:
            final.wait_ready()

            def drained() -> bool:
                # Every spool replayed, and this run has sampled a while.
                return final.metric("pluginmon_spool_samples") == 0 and len(cycles_of(final)) > 8

            wait_for("the spools to drain", drained, timeout=120)
        except BaseException:
            final.kill()
            raise
        final.signal(signal.SIGTERM)
        assert final.wait_exit(timeout=30) == 0, final.log_text()[-3000:]

    counts = final.final_counts()
    assert counts["rows_in_spool"] == 0
    assert counts["rows_dropped"] == 0

    stored = rows_by_timestamp(e2e_db)
    assert duplicated_rows(e2e_db) == []
    taken: dict[datetime, int] = {}
    problems: list[str] = []
    lost_last_cycles = 0
    for number, daemon in enumerate([*killed, final]):
        cycles = cycles_of(daemon)
        if daemon is final:
            assert len(cycles) > 8
        for index, (at, samples) in enumerate(cycles):
            taken[at] = samples
            in_flight = daemon is not final and index == len(cycles) - 1
            if in_flight:
                # The cycle in flight at the kill: all, some or none of its rows.
                if stored[at] > samples:
                    problems.append(f"run {number}: {stored[at]} rows for the last cycle {at}")
                lost_last_cycles += stored[at] < samples
            elif stored[at] != samples:
                problems.append(
                    f"run {number} cycle {index + 1}/{len(cycles)} at {at}: {samples} samples "
                    f"taken, {stored[at]} rows stored"
                )
    assert problems == []
    print(f"{lost_last_cycles} of {KILLS} kills lost (part of) the cycle in flight")
    # Every stored row belongs to a cycle some run logged.
    assert set(stored) <= set(taken)
    assert sum(len(cycles_of(daemon)) for daemon in killed) >= KILLS
    # Only the kills' last cycles may be short, and at most one per kill.
    assert lost_last_cycles <= KILLS
