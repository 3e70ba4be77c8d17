"""Database passwords are never printed, whatever characters they hold: the URL parser, the
scrubber, the log filter, and the real CLI and daemon against a real PostgreSQL that refuses
a wrong password, a closed port and an unresolvable host."""

from __future__ import annotations

import io
import logging
import random
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
import pytest
from psycopg import sql

from pluginmon.daemon.logs import MAX_MESSAGE_CHARS, configure_logging, redact
from pluginmon.storage.dsn import (
    UNPARSABLE,
    SecretScrubber,
    describe_database_error,
    dsn_secrets,
    redact_urls,
    redacted_dsn,
)
from pluginmon.storage.pool import redact_url
from tests.daemon_helpers import DaemonProcess, run_cli, wait_for
from tests.dbutil import create_database, drop_database

# One special character each, and all of them together; the words around them are what a
# driver that splits the URL at the special character would echo back.
PASSWORDS = {
    "slash": "Alpha/Bravo",
    "at": "Alpha@Bravo",
    "colon": "Alpha:Bravo",
    "hash": "Alpha#Bravo",
    "question": "Alpha?Bravo",
    "percent": "Alpha%Bravo",
    "space": "Alpha Bravo",
    "unicode": "Alphä€Bravo",
    "all": "Sekret/Alpha@Bravo:Charlie#Delta?Echo%Foxtrot Golf€Hotel",
}
ALL = PASSWORDS["all"]


def forbidden(password: str) -> list[str]:
    """The password, its percent-encoded form, and every word of it (4+ letters)."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", password) if len(w) >= 4]
    return [password, quote(password, safe=""), *words]


def assert_no_secret(text: str, password: str, where: str = "output") -> None:
    leaked = [s for s in forbidden(password) if s in text]
    assert not leaked, f"{leaked} of the password in the {where}:\n{text[-3000:]}"


# -- the parser --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoded", [False, True], ids=["raw", "percent-encoded"])
@pytest.mark.parametrize("password", PASSWORDS.values(), ids=PASSWORDS.keys())
def test_redacted_dsn_hides_every_character_a_password_holds(password: str, encoded: bool) -> None:
    written = quote(password, safe="") if encoded else password
    url = f"postgresql://monitor:{written}@db.example:5432/pluginmon?sslmode=require"
    redacted = redacted_dsn(url)
    assert_no_secret(redacted, password)
    # The last '@' ends the userinfo: host, database and options stay readable.
    assert redacted == "postgresql://monitor:***@db.example:5432/pluginmon?sslmode=require"
    assert redact_url(url) == redacted  # the old name, still used by the pool's callers


def test_redacted_dsn_keeps_what_is_not_secret() -> None:
    assert redacted_dsn("postgresql://h/db") == "postgresql://h/db"
    assert redacted_dsn("postgresql://u@h/db") == "postgresql://u@h/db"
    assert (
        redacted_dsn("postgres://u:p@h1:5432,h2:5433/db?password=Kilo1&sslpassword=Lima2&x=1")
        == "postgres://u:***@h1:5432,h2:5433/db?password=***&sslpassword=***&x=1"
    )
    assert redacted_dsn("host=h password='a b\\' c' user=u") == "host=h password=*** user=u"
    assert redacted_dsn("host=h PassWord = Kilo1 dbname=x") == "host=h PassWord=*** dbname=x"
    # An '@' in a query value hides the host too: more than needed, never less.
    assert redacted_dsn("postgresql://u:Kilo1@h/db?application_name=a@b") == (
        "postgresql://u:***@b"
    )
    # A newline cannot start a forged log line.
    assert "\n" not in redacted_dsn("postgresql://u:p@h/db\nERROR forged")


@pytest.mark.parametrize(
    "text",
    ["Kilo1-not-a-dsn", "host='Kilo1 unterminated", "9x://u:Kilo1@h", "=Kilo1", "://u:Kilo1@h"],
)
def test_redacted_dsn_replaces_what_it_cannot_parse(text: str) -> None:
    assert redacted_dsn(text) == UNPARSABLE
    assert "Kilo1" in " ".join(dsn_secrets(text))  # all of it counts as secret


def test_redacted_dsn_never_raises_and_never_leaks_on_random_input() -> None:
    """Seeded fuzz: random passwords of marker words and special characters, in every place
    a password can stand; the markers' letters (K L M O) occur nowhere else."""
    rng = random.Random(15)
    alphabet = "/@:#?%& =';,[]\\\"\n\t\x00éü€\ud800abcXYZ019"
    words = ["Kilo", "Lima", "Mike", "Oscar"]

    def text(length: int, chars: str) -> str:
        return "".join(rng.choice(chars) for _ in range(length))

    for _ in range(3000):
        noise = text(rng.randrange(0, 12), alphabet)
        password = "".join(
            rng.choice(words) if rng.random() < 0.4 else rng.choice(alphabet)
            for _ in range(rng.randrange(1, 10))
        )
        host = text(rng.randrange(1, 8), "abc.-:[]0123")
        plain = password.replace("&", "").replace("=", "").replace("#", "")
        quoted = password.replace("\\", "\\\\").replace("'", "\\'")
        checked = [
            (f"postgresql://user:{password}@{host}/db{noise}", password),
            (f"postgresql://{noise}:{password}@{host}", password),
            (f"postgresql://u@{host}/db?sslmode=require&password={plain}", plain),
            (f"host={host} password='{quoted}' user=u", password),
        ]
        for url, secret in checked:
            redacted = redacted_dsn(url)
            markers = [w for w in words if w in secret]
            assert not [w for w in markers if w in redacted], (url, redacted)
            said = SecretScrubber(dsn_secrets(url)).scrub(f"driver said: {url} ({secret})")
            assert not [w for w in markers if w in said], (url, said)
        assert isinstance(redacted_dsn(noise + password), str)
        assert isinstance(dsn_secrets(noise + password), tuple)


def test_secrets_and_scrubber_cover_what_drivers_echo() -> None:
    url = f"postgresql://monitor:{ALL}@127.0.0.1:1/pluginmon"
    scrubber = SecretScrubber(dsn_secrets(url))
    echoed = [
        # libpq and asyncpg split a raw URL at the first '@' or '/', and say what they got.
        'could not translate host name "Bravo:Charlie#Delta?Echo%Foxtrot Golf€Hotel@127.0.0.1"',
        "invalid literal for int() with base 10: 'Sekret'",
        'missing key/value separator "=" in URI query parameter: "Echo%Foxtrot Golf€Hotel@h"',
        "password " + quote(ALL, safe=""),
        "escaped " + ALL.encode("unicode_escape").decode(),
    ]
    for text in echoed:
        assert_no_secret(scrubber.scrub(text), ALL)
    assert scrubber.scrub("connection refused at 127.0.0.1:1") == (
        "connection refused at 127.0.0.1:1"
    )


def test_a_very_short_password_is_hidden_in_urls_but_not_scrubbed_from_prose() -> None:
    url = "postgresql://u:x@h/db"
    assert redacted_dsn(url) == "postgresql://u:***@h/db"
    assert dsn_secrets(url) == ()  # replacing every "x" would garble every message
    assert SecretScrubber(dsn_secrets(url)).scrub("second SIGINT: exiting now") == (
        "second SIGINT: exiting now"
    )


def test_describe_database_error_names_no_host_or_secret() -> None:
    assert describe_database_error(ConnectionRefusedError(111, "refused")) == "connection refused"
    assert describe_database_error(TimeoutError()) == "no answer in time"
    assert describe_database_error(ValueError("invalid literal 'Sekret'")) == (
        "invalid database URL"
    )

    class AuthError(Exception):
        sqlstate = "28P01"

    assert describe_database_error(AuthError("for user Sekret")) == (
        "authentication failed (SQLSTATE 28P01)"
    )


# -- the log filter --------------------------------------------------------------------------


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    url = f"postgresql://monitor:{ALL}@db.example/pluginmon"
    configure_logging(log_format="json", log_level="INFO", stream=stream, secrets=dsn_secrets(url))
    try:
        yield stream
    finally:
        configure_logging(log_format="text", log_level="WARNING", stream=io.StringIO())
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def test_log_lines_and_tracebacks_never_hold_the_password(log_stream: io.StringIO) -> None:
    log = logging.getLogger("pluginmon.test_secrets")
    url = f"postgresql://monitor:{ALL}@db.example/pluginmon"
    log.info("opening database pool to %s", url)
    log.warning("resolver: %s", "could not translate host name 'Bravo:Charlie@db.example'")
    log.info("keyword dsn host=db password='%s' user=u", ALL)
    log.info("extras", extra={"dsn": url})
    try:
        raise RuntimeError(f"driver echoed {url} and {ALL.split('#')[1]}")
    except RuntimeError:
        log.exception("pluginmon stopped by an error")
    text = log_stream.getvalue()
    assert text.count("\n") == 5
    assert "Traceback" in text
    assert "opening database pool to postgresql://monitor:***@" in text
    assert_no_secret(text, ALL, "log")
    assert redact(f"x {ALL} y") == "x *** y"  # redact() knows the configured secrets too


def test_long_log_lines_are_cut_after_redaction(log_stream: io.StringIO) -> None:
    log = logging.getLogger("pluginmon.test_secrets")
    log.warning("label %s then postgresql://u:%s@h", "L" * 200_000, "Kilo1")
    (line,) = log_stream.getvalue().splitlines()
    assert len(line) < MAX_MESSAGE_CHARS + 500
    assert "more characters cut" in line
    assert "Kilo1" not in line


def test_redaction_is_linear_in_the_line_length() -> None:
    """The old pattern took 0.37 s at 10k characters and grew with the square (about an
    hour at 1 MB); one linear pass takes well under a second. The bound is 30x loose."""
    size = 1_000_000
    adversarial = [
        "L" * size,
        "a://" * (size // 4),
        "password=" * (size // 9),
        "@:" * (size // 2) + "://",
        "postgresql://u:" + "p" * size + "@h",
        "x" * size + "://" + " " * size,
        "postgresql://u:" + "?" * size + "@h",
        "postgresql://u:" + "?password" * (size // 9) + "@h",
        "://" + "&" * size + "@",
    ]
    started = time.perf_counter()
    for text in adversarial:
        redact_urls(text)
    assert time.perf_counter() - started < 30.0
    assert redact_urls("postgresql://u:" + "p" * size + "@h") == "postgresql://u:***@h"


# -- the real CLI and daemon against a real PostgreSQL ---------------------------------------


@dataclass(frozen=True)
class Role:
    name: str
    password: str
    database: str
    host: str
    port: int

    def url(self, *, encoded: bool = True, password: str | None = None) -> str:
        secret = self.password if password is None else password
        written = quote(secret, safe="") if encoded else secret
        return f"postgresql://{self.name}:{written}@{self.host}:{self.port}/{self.database}"


@pytest.fixture(scope="module")
def roles(pg_admin_url: str) -> Iterator[dict[str, Role]]:
    """A login role for each password, owning its own database, on the test server."""
    parts = urlsplit(pg_admin_url)
    assert parts.hostname
    assert parts.port
    suffix = uuid.uuid4().hex[:8]
    made: dict[str, Role] = {}
    try:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            for key, password in PASSWORDS.items():
                name = f"h6_{key}_{suffix}"
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                        sql.Identifier(name), sql.Literal(password)
                    )
                )
                database = create_database(pg_admin_url, prefix=f"h6{key}")
                conn.execute(
                    sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                        sql.Identifier(database), sql.Identifier(name)
                    )
                )
                made[key] = Role(name, password, database, parts.hostname, parts.port)
        with psycopg.connect(made["all"].url(), connect_timeout=10) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (made["all"].name,)
        try:
            psycopg.connect(made["all"].url(password="wrong-" + ALL), connect_timeout=10).close()
        except psycopg.OperationalError:
            pass
        else:
            pytest.skip("the test server accepts any password (trust auth): nothing to refuse")
        yield made
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            for role in made.values():
                drop_database(pg_admin_url, role.database)
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role.name)))


def cli_output(*args: str, url: str, tmp_path: Path) -> tuple[int, str]:
    result = run_cli(
        *args,
        env={"PLUGINMON_DATABASE_URL": url, "PLUGINMON_DATA_DIR": str(tmp_path / "data")},
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("failure", ["closed-port", "unresolvable", "wrong-password", "none"])
def test_cli_never_prints_the_password(
    failure: str, roles: dict[str, Role], tmp_path: Path
) -> None:
    role = roles["all"]
    url = {
        "closed-port": role.url().replace(f":{role.port}/", ":1/"),
        "unresolvable": role.url().replace(f"@{role.host}:", "@pluginmon-db.invalid:"),
        "wrong-password": role.url(password=ALL + "-wrong"),
        "none": role.url(),
    }[failure]
    expected = {
        "closed-port": "Connection refused",
        "unresolvable": "pluginmon-db.invalid",
        "wrong-password": "password authentication failed",
        "none": "",
    }[failure]
    code, out = cli_output("check-config", url=url, tmp_path=tmp_path)
    assert code == 0, out
    assert_no_secret(out, ALL, "check-config output")
    for command in ("migrate", "status"):
        code, out = cli_output(command, url=url, tmp_path=tmp_path)
        assert code == (0 if failure == "none" else 1), out
        assert expected in out
        assert_no_secret(out, ALL + "-wrong" if failure == "wrong-password" else ALL, command)


@pytest.mark.parametrize("key", PASSWORDS.keys())
def test_cli_with_a_raw_password_in_the_url_never_prints_it(
    key: str, roles: dict[str, Role], tmp_path: Path
) -> None:
    """Not percent-encoded: drivers split the URL at the special character and say what they
    made of it; whatever they say (or if the URL works), the password is not printed."""
    role = roles[key]
    for command in ("check-config", "migrate", "status"):
        code, out = cli_output(command, url=role.url(encoded=False), tmp_path=tmp_path)
        assert code in (0, 1), out
        assert out.strip(), command  # it said something: success or why not
        assert_no_secret(out, role.password, f"{command} output")


# The management commands connect to the same database with the same URL (they printed
# "invalid literal for int() with base 10: 'Sekret'" or "failed to resolve host
# 'Bravo:Charlie#...'"): what a driver echoes of a mis-parsed URL is scrubbed there too.
MANAGEMENT_COMMANDS = (
    ("token", "list"),
    ("audit", "verify"),
    ("config", "list", "--tenant", "acme", "resizer"),
    ("deps", "list", "--tenant", "acme", "resizer"),
    ("vulns", "list", "--tenant", "acme", "--plugin", "resizer"),
)


@pytest.mark.parametrize("key", ["at", "space", "all"])
def test_management_commands_with_a_raw_password_in_the_url_never_print_it(
    key: str, roles: dict[str, Role], tmp_path: Path
) -> None:
    role = roles[key]
    urls = {
        "as given": role.url(encoded=False),
        "unresolvable": role.url(encoded=False).replace(f"@{role.host}:", "@pluginmon-db.invalid:"),
    }
    for what, url in urls.items():
        # `pluginmon api` serves until stopped when its URL works: only the one that cannot.
        serving = (("api",),) if what == "unresolvable" else ()
        for command in (*MANAGEMENT_COMMANDS, *serving):
            code, out = cli_output(*command, url=url, tmp_path=tmp_path)
            assert code in (0, 1), out
            assert out.strip(), command  # it said something: success or why not
            assert_no_secret(out, role.password, f"{' '.join(command)} ({what}) output")


def start_daemon(tmp_path: Path, name: str, url: str) -> DaemonProcess:
    return DaemonProcess(
        tmp_path=tmp_path,
        database_url=url,
        config_text="",
        data_dir=tmp_path / f"data-{name}",
        name=name,
    ).start()


def stop_daemon(daemon: DaemonProcess) -> str:
    assert daemon.proc is not None
    if daemon.proc.poll() is None:
        daemon.signal(signal.SIGTERM)
    daemon.wait_exit(timeout=60)
    return daemon.log_text()


def test_run_never_prints_the_password(roles: dict[str, Role], tmp_path: Path) -> None:
    """``pluginmon run`` with each failure, and with raw special characters, side by side."""
    role = roles["all"]
    cases = {
        "right": (role.url(), ALL),
        "wrong": (role.url(password=ALL + "-wrong"), ALL + "-wrong"),
        "closed": (role.url().replace(f":{role.port}/", ":1/"), ALL),
        "unresolvable": (role.url().replace(f"@{role.host}:", "@pluginmon-db.invalid:"), ALL),
        **{
            f"raw-{key}": (roles[key].url(encoded=False), PASSWORDS[key])
            for key in ("at", "slash", "space", "hash", "all")
        },
    }
    daemons = {name: start_daemon(tmp_path, name, url) for name, (url, _) in cases.items()}
    try:
        wait_for(
            "the daemon with the right password to be ready",
            lambda: daemons["right"].get("/readyz")[0] == 200,
            timeout=90,
        )
        for name, daemon in daemons.items():
            # Each has opened its pool (and logged where to) or has already given up.
            wait_for(
                f"{name}: the pool-opening line or an exit",
                lambda d=daemon: (
                    "opening database pool" in d.log_text()  # type: ignore[misc]
                    or (d.proc is not None and d.proc.poll() is not None)
                ),
                timeout=60,
            )
            status, body = daemon.get("/readyz")
            assert status in (0, 200, 503), (name, status, body)
            assert_no_secret(body, cases[name][1], f"{name} /readyz")
        for name in ("wrong", "closed", "unresolvable"):
            wait_for(
                f"{name}: the start-up retry to be logged",
                # "database unreachable at start-up (unreachable)", "database login refused at
                # start-up (authentication_failed)": the named condition, logged with its retry.
                lambda d=daemons[name]: "at start-up (" in d.log_text(),  # type: ignore[misc]
                timeout=60,
            )
    finally:
        logs = {name: stop_daemon(daemon) for name, daemon in daemons.items()}
    for name, log in logs.items():
        assert_no_secret(log, cases[name][1], f"log of the {name!r} daemon")
    assert f"opening database pool to postgresql://{role.name}:***@{role.host}:" in logs["right"]
    assert "password authentication failed" in logs["wrong"]


def test_readyz_says_why_when_the_password_is_refused(
    roles: dict[str, Role], tmp_path: Path
) -> None:
    role = roles["all"]
    daemon = start_daemon(tmp_path, "refused", role.url(password=ALL + "-wrong"))
    try:

        def answer() -> tuple[int, str] | None:
            status, body = daemon.get("/readyz")
            return (status, body) if status else None  # 0: not listening yet

        answers = [wait_for("/readyz to answer", answer, timeout=60) for _ in range(5)]
        assert daemon.get("/healthz")[0] == 200
    finally:
        log = stop_daemon(daemon)
    for status, body in answers:
        assert status == 503, body
        assert "database authentication_failed: password authentication failed" in body
        assert_no_secret(body, ALL + "-wrong", "/readyz")
    assert "Traceback" not in log
    assert_no_secret(log, ALL + "-wrong", "log")
