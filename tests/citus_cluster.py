"""A throwaway Citus cluster for the tests: a coordinator and workers on loopback ports.

Citus is not in the package registries, so the tests use a Citus build found on the machine:
a PostgreSQL bin directory whose ``pg_config --pkglibdir`` holds ``citus.so`` (from
``PLUGINMON_TEST_CITUS_BIN``, then PATH, then ``/usr/lib/postgresql/*/bin``). Without one,
``find_citus_bin_dir`` returns None and the tests skip with ``CITUS_SKIP_REASON``.

Run as a module it starts a cluster and prints the coordinator's URL until interrupted
(for a manual run of the suite or a benchmark against it):
``python -m tests.citus_cluster /tmp/somewhere``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from tests.dbutil import drop_on_server, with_database
from tests.pg_cluster import SUPERUSER, Cluster

CITUS_BIN_ENV = "PLUGINMON_TEST_CITUS_BIN"
CITUS_SKIP_REASON = (
    "no PostgreSQL with the citus extension found (a bin directory whose pg_config --pkglibdir "
    f"holds citus.so: set {CITUS_BIN_ENV}, or put its bin directory on PATH)"
)


def _has_citus(bin_dir: Path) -> bool:
    pg_config = bin_dir / "pg_config"
    if not (bin_dir / "initdb").exists() or not pg_config.exists():
        return False
    result = subprocess.run(
        [str(pg_config), "--pkglibdir"], capture_output=True, text=True, check=False, timeout=30
    )
    return result.returncode == 0 and (Path(result.stdout.strip()) / "citus.so").exists()


def find_citus_bin_dir() -> Path | None:
    """The first PostgreSQL bin directory whose server has citus.so, or None."""
    candidates: list[Path] = []
    explicit = os.environ.get(CITUS_BIN_ENV)
    if explicit:
        candidates.append(Path(explicit))
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry:
            candidates.append(Path(entry))
    candidates.extend(Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")))
    for candidate in candidates:
        if _has_citus(candidate):
            return candidate
    return None


NODE_SETTINGS = {
    "shared_preload_libraries": "'citus'",
    "max_connections": "200",
    "max_prepared_transactions": "100",
    "wal_level": "'logical'",
    # One connection per shard group is plenty on a 2-core test machine.
    "citus.max_adaptive_executor_pool_size": "4",
}


class CitusCluster:
    """A coordinator and ``workers`` workers, each its own server on 127.0.0.1.

    Nodes trust connections from 127.0.0.1 (the nodes connect to each other without a
    password); they listen on nothing else. ``create_database`` makes a database on every
    node with the extension and the workers registered, which is what a Citus database is.
    """

    def __init__(self, bin_dir: Path, directory: Path, *, workers: int = 2) -> None:
        self.directory = directory
        self.coordinator = Cluster(bin_dir, directory / "coordinator")
        self.workers = [Cluster(bin_dir, directory / f"worker{i}") for i in range(workers)]

    @property
    def nodes(self) -> list[Cluster]:
        return [self.coordinator, *self.workers]

    def start(self) -> CitusCluster:
        for node in self.nodes:
            self._start_node(node)
        return self

    def start_node(self, name: str) -> Cluster:
        """Another node under this cluster's directory, started (not added to any database)."""
        node = Cluster(self.coordinator.bin_dir, self.directory / name)
        self._start_node(node)
        return node

    @staticmethod
    def _start_node(node: Cluster) -> None:
        node.init(settings=NODE_SETTINGS)
        hba = node.pgdata / "pg_hba.conf"
        hba.write_text("host all all 127.0.0.1/32 trust\n")
        node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(mode="immediate")

    def remove(self) -> None:
        for node in self.nodes:
            node.remove()
        shutil.rmtree(self.directory, ignore_errors=True)

    def url(self, database: str = "postgres", *, node: Cluster | None = None) -> str:
        target = node or self.coordinator
        return f"postgresql://{SUPERUSER}@127.0.0.1:{target.port}/{database}"

    def create_database(self, *, prefix: str = "citus") -> str:
        """A new database on every node, Citus-enabled, workers registered; returns its name."""
        name = self.create_plain_database(prefix=prefix)
        self.enable_citus(name)
        return name

    def create_plain_database(self, *, prefix: str = "plain") -> str:
        """A new database on every node without the citus extension (to pluginmon, a plain
        PostgreSQL database until ``enable_citus``); returns its name."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        for node in self.nodes:
            self.create_on(node, name)
        return name

    def create_on(self, node: Cluster, name: str) -> None:
        with psycopg.connect(self.url(node=node), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def enable_citus(self, name: str, *, workers: list[Cluster] | None = None) -> None:
        """The extension in database ``name`` on the coordinator and ``workers`` (default:
        all), and those workers registered with the coordinator; a worker added later gets
        the same call with ``workers=[it]`` (the coordinator's extension exists by then)."""
        added = self.workers if workers is None else workers
        first = workers is None
        for node in [self.coordinator, *added] if first else added:
            with psycopg.connect(self.url(name, node=node), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION citus")
        with psycopg.connect(self.url(name), autocommit=True) as conn:
            if first:
                conn.execute(
                    "SELECT citus_set_coordinator_host('127.0.0.1', %s)", (self.coordinator.port,)
                )
            for worker in added:
                conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (worker.port,))

    def drop_database(self, name: str) -> None:
        for node in self.nodes:
            drop_on_server(self.url(node=node), name)

    @contextmanager
    def database(self, *, prefix: str = "citus") -> Iterator[str]:
        """URL (on the coordinator) of a new Citus database, dropped on every node on exit."""
        name = self.create_database(prefix=prefix)
        try:
            yield with_database(self.url(), name)
        finally:
            self.drop_database(name)


@contextmanager
def running_cluster(prefix: str) -> Iterator[CitusCluster]:
    """A started cluster for a test module, removed after; the test skips (with
    CITUS_SKIP_REASON) where no Citus build is found."""
    import pytest

    bin_dir = find_citus_bin_dir()
    if bin_dir is None:
        pytest.skip(CITUS_SKIP_REASON)
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = CitusCluster(bin_dir, directory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str]) -> int:
    bin_dir = find_citus_bin_dir()
    if bin_dir is None:
        print(CITUS_SKIP_REASON, file=sys.stderr)
        return 2
    directory = (
        Path(argv[1]) if len(argv) > 1 else Path(f"/tmp/pluginmon-citus-{uuid.uuid4().hex[:8]}")
    )
    cluster = CitusCluster(bin_dir, directory).start()
    name = cluster.create_database(prefix="manual")
    print(with_database(cluster.url(), name), flush=True)
    print("workers:", " ".join(cluster.url(name, node=w) for w in cluster.workers), flush=True)
    try:
        sys.stdin.read()  # until EOF / interrupt
    except KeyboardInterrupt:
        pass
    finally:
        cluster.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
