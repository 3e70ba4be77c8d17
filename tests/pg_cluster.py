"""Throwaway PostgreSQL clusters the tests build themselves: any server package, primaries and streaming standbys."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg

from tests.net_helpers import free_port

SUPERUSER = "postgres"


def system_postgres_bin_dir(major: str = "*") -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin that has initdb, or None."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/{major}/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def throwaway_cluster(bin_dir: Path) -> Iterator[str]:
    """The superuser URL of a new cluster of the server in ``bin_dir``, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="pluginmon-test-pg-"))
    server = Cluster(bin_dir, directory / "cluster").init().start()
    try:
        yield server.url()
    finally:
        server.remove()
        shutil.rmtree(directory, ignore_errors=True)


def extension_control_file(bin_dir: Path, name: str) -> Path | None:
    """``<sharedir>/extension/<name>.control`` of the server in ``bin_dir``, if installed."""
    pg_config = bin_dir / "pg_config"
    if not pg_config.exists():
        return None
    result = subprocess.run(
        [str(pg_config), "--sharedir"], capture_output=True, text=True, check=False, timeout=30
    )
    if result.returncode != 0:
        return None
    control = Path(result.stdout.strip()) / "extension" / f"{name}.control"
    return control if control.exists() else None


class Cluster:
    """One cluster in ``directory``, listening on 127.0.0.1 only, with a generated superuser
    password (scram-sha-256). PostgreSQL refuses to run as root: when we are root, every
    server binary runs as ``run_as_when_root`` (storage/embedded.py does the same)."""

    def __init__(
        self,
        bin_dir: Path,
        directory: Path,
        *,
        run_as_when_root: str = "postgres",
        port: int | None = None,
    ) -> None:
        self.bin_dir = bin_dir
        self.directory = directory
        self.pgdata = directory / "data"
        self.log_file = directory / "server.log"
        self.port = port or free_port()
        self.password = secrets.token_urlsafe(18)
        self._run_as = run_as_when_root if os.geteuid() == 0 else None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._give_to_server_user(self.directory)
        # The server user must reach the directory through its parents.
        for parent in self.directory.parents:
            with contextlib.suppress(OSError):
                parent.chmod(parent.stat().st_mode | 0o001)

    # -- set-up ------------------------------------------------------------------------------

    def init(self, *, settings: dict[str, str] | None = None) -> Cluster:
        """initdb, then ``settings`` (name -> SQL literal) into postgresql.auto.conf."""
        pwfile = self.directory / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._give_to_server_user(pwfile)
        self._run(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-instructions",
        )
        pwfile.unlink()
        self.configure(settings or {})
        return self

    def configure(self, settings: dict[str, str]) -> None:
        base = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": "''",
            "fsync": "off",  # a throwaway cluster: speed over durability
            "max_connections": "50",
            "shared_buffers": "'32MB'",
        }
        lines = "".join(f"{k} = {v}\n" for k, v in {**base, **settings}.items())
        with (self.pgdata / "postgresql.auto.conf").open("a") as conf:
            conf.write(lines)

    def standby_of(self, primary: Cluster) -> Cluster:
        """A streaming standby of ``primary``: pg_basebackup -R, then its own port."""
        self.password = primary.password
        self._run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            SUPERUSER,
            "-D",
            str(self.pgdata),
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",
            env={"PGPASSWORD": primary.password},
        )
        self.configure({})
        return self

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Cluster:
        result = self._run(
            "pg_ctl", "-D", str(self.pgdata), "-l", str(self.log_file), "-w", "-t", "60", "start",
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{self.log_tail()}")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "60", "stop",
                      check=False)  # fmt: skip

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-t", "60", "promote")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- connecting --------------------------------------------------------------------------

    def url(
        self, database: str = "postgres", *, user: str = SUPERUSER, password: str | None = None
    ) -> str:
        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql://{user}:{secret}@127.0.0.1:{self.port}/{database}"

    def wait_accepting(self, *, database: str = "postgres", timeout_seconds: float = 30) -> None:
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                with psycopg.connect(self.url(database), connect_timeout=3):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # -- internals ---------------------------------------------------------------------------

    def _give_to_server_user(self, path: Path) -> None:
        if self._run_as is not None:
            entry = pwd.getpwnam(self._run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(
        self, program: str, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        if self._run_as:
            # The server's own libpq connections (Citus between its nodes) look for client
            # certificates under HOME: ours (/root, mode 0700) fails them with EACCES.
            base["HOME"] = str(self.directory)
        result = subprocess.run(
            [str(self.bin_dir / program), *args],
            user=self._run_as,
            group=self._run_as,
            extra_groups=[] if self._run_as else None,
            env={**base, "LC_ALL": "C", "LANG": "C", **(env or {})},
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{program} failed ({result.returncode}): {result.stderr.strip()}\n"
                f"{self.log_tail()}"
            )
        return result

    def remove(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.directory, ignore_errors=True)
