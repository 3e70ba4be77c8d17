"""check-config refuses what run would fail on at start, and run refuses it the same way.

Every case goes through the real CLI (`python -m pluginmon.daemon.cli`): check-config and run
both exit 2 naming the field, never with a traceback; a port in use at run is one line, exit 1.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon_helpers import REPO, run_cli, self_signed_certificate

# Nothing listens on port 1: a run that got as far as the database would fail there, exit 1.
UNREACHABLE_DB = {"PLUGINMON_DATABASE_URL": "postgresql://u@127.0.0.1:1/x?connect_timeout=1"}


def _second_certificate(tmp_path: Path) -> tuple[Path, Path]:
    other = tmp_path / "other"
    other.mkdir()
    return self_signed_certificate(other)


def _tls(tmp_path: Path, *, cert: str = "good", key: str = "good") -> str:
    good_cert, good_key = self_signed_certificate(tmp_path)
    files = {"good": (good_cert, good_key), "garbage": (tmp_path / "garbage.pem",) * 2}
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    if "other" in (cert, key):
        files["other"] = _second_certificate(tmp_path)
    files["missing"] = (tmp_path / "missing.pem",) * 2
    return f'http_tls_cert_file = "{files[cert][0]}"\nhttp_tls_key_file = "{files[key][1]}"\n'


def _file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    return f'data_dir = "{tmp_path / "a-file"}"\n'


def _under_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    return f'data_dir = "{tmp_path / "a-file" / "state"}"\n'


# (the config text, or a function of tmp_path making it; the line check-config must print)
CASES: dict[str, tuple[str | Callable[[Path], str], str]] = {
    "interval inf": (
        "sample_interval_seconds = inf",
        "sample_interval_seconds: must be a finite number",
    ),
    "interval nan": (
        "flush_interval_seconds = nan",
        "flush_interval_seconds: must be a finite number",
    ),
    "interval 1e308": (
        "sample_interval_seconds = 1e308",
        "sample_interval_seconds: must be <= 3600",
    ),
    "interval boolean": (
        "sample_interval_seconds = true",
        "sample_interval_seconds: must be a number",
    ),
    "port boolean": ("http_port = true", "http_port: must be an integer"),
    "port as text": ('http_port = "9464"', "http_port: must be an integer"),
    "pool size": ("database_pool_max_size = 100000", "database_pool_max_size: must be <= 100"),
    "batch size": ("flush_max_rows = 1000000000", "flush_max_rows: must be <= 1000000"),
    "queue size": (
        "writer_queue_max_rows = 10000000000",
        "writer_queue_max_rows: must be <= 10000000",
    ),
    "spool size": ("spool_max_bytes = 1e308", "spool_max_bytes: must be an integer"),
    "spool size int": ("spool_max_bytes = 1_000_000_000_000_000", "spool_max_bytes: must be <= "),
    "grace 1e308": ("plugin_grace_seconds = 1e308", "plugin_grace_seconds: must be <= 604800"),
    "retention 1e308": ("[retention]\naudit = 1e308", "retention.audit: must be at most 36500d"),
    # An integer too large for a float (TOML integers are unbounded) was an OverflowError.
    "retention huge integer": (
        f"[retention]\naudit = {10**400}",
        "retention.audit: must be at most 36500d",
    ),
    "approval expiry huge integer": (
        f"[[approvals.policies]]\nexpires_after_seconds = {10**400}",
        "expires_after_seconds: must be <= 31536000",
    ),
    "approval expiry inf": (
        "[[approvals.policies]]\nexpires_after_seconds = inf",
        "expires_after_seconds: must be <= 31536000",
    ),
    "approvals count": (
        "[[approvals.policies]]\nrequired_approvals = 1000000000000",
        "required_approvals: must be <= 100",
    ),
    "webhook timeout": (
        '[[alerts.webhooks]]\nurl = "http://127.0.0.1:9/x"\ntimeout_seconds = 1e308',
        "alerts.webhooks[0].timeout_seconds: must be a number <= 3600",
    ),
    "health weight boolean": (
        "[health.weights]\ncpu = true",
        "health.weights.cpu: must be a number >= 0",
    ),
    "rule threshold inf": (
        '[[alerts.rules]]\nname = "R"\nmetric = "cpu_percent"\nop = ">"\nthreshold = inf',
        "alerts.rules[0] (R).threshold: must be a finite number",
    ),
    "host not an address": (
        'http_host = "999.1.1.1"',
        "http_host: '999.1.1.1' is not an IP address or a host name",
    ),
    "host empty": ('http_host = ""', "http_host: must not be empty"),
    "host unresolvable": (
        'http_host = "no-such-host.invalid"',
        "http_host: 'no-such-host.invalid' does not resolve",
    ),
    # TEST-NET-1 (RFC 5737): a valid address that is no address of this machine.
    "host not local": ('http_host = "192.0.2.1"', "http_host: cannot listen on 192.0.2.1"),
    "data_dir empty": ('data_dir = ""', "data_dir: must not be empty"),
    "data_dir a file": (_file, "data_dir: "),
    "data_dir under a file": (_under_file, "data_dir: cannot be created: "),
    "data_dir not writable": ('data_dir = "/proc/self/pluginmon"', "data_dir: cannot create"),
    "proc_root missing": ('proc_root = "/no/such/proc"', "proc_root: no such directory"),
    "tls garbage cert": (lambda p: _tls(p, cert="garbage"), "http_tls_cert_file: "),
    "tls garbage key": (lambda p: _tls(p, key="garbage"), "http_tls_key_file: "),
    "tls mismatched key": (
        lambda p: _tls(p, key="other"),
        "http_tls_key_file: ",
    ),
    "tls missing key": (lambda p: _tls(p, key="missing"), "http_tls_key_file: cannot read"),
    "secret_keys_file missing": (
        'secret_keys_file = "/no/such/secret-keys.json"',
        "secret_keys_file: no readable file /no/such/secret-keys.json (create it with",
    ),
    "vulnerability_db missing": (
        'vulnerability_db = "/no/such/osv"',
        "vulnerability_db: no such directory or readable file: /no/such/osv",
    ),
    "sftp private_key_file missing": (
        '[backups.providers.sftp]\nallowed_hosts = ["backup.example"]\n'
        'private_key_file = "/no/such/id_ed25519"',
        "backups.providers.sftp.private_key_file: no readable file /no/such/id_ed25519",
    ),
    "sftp known_hosts_file missing": (
        '[backups.providers.sftp]\nallowed_hosts = ["backup.example"]\n'
        'known_hosts_file = "/no/such/known_hosts"',
        "backups.providers.sftp.known_hosts_file: no readable file /no/such/known_hosts",
    ),
}
MESSAGES_MORE = {
    "data_dir a file": "is not a directory",
    "tls garbage cert": "holds no PEM certificate",
    "tls garbage key": "holds no usable PEM private key",
    "tls mismatched key": "does not match the certificate",
}


def _write(tmp_path: Path, text: str | Callable[[Path], str]) -> Path:
    body = text(tmp_path) if callable(text) else text
    path = tmp_path / "pluginmon.toml"
    # A data_dir of its own, so that only the case under test can be wrong.
    data_dir = "" if "data_dir" in body else f'data_dir = "{tmp_path / "state"}"\n'
    path.write_text(data_dir + body + "\n")
    return path


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_exit_2_naming_the_field(tmp_path: Path, case: str, command: str) -> None:
    text, expected = CASES[case]
    path = _write(tmp_path, text)
    result = run_cli(command, "--config", str(path), env=UNREACHABLE_DB)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "invalid configuration" in result.stderr
    assert expected in result.stderr
    assert MESSAGES_MORE.get(case, "") in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_non_utf8_file_is_named_not_a_traceback(tmp_path: Path, command: str) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"sample_interval_seconds = 10\n# caf\xe9\n")
    result = run_cli(command, "--config", str(path))
    assert result.returncode == 2
    assert f"--config: {path}: not UTF-8 (byte 0xe9 at offset 34)" in result.stderr
    assert "Traceback" not in result.stderr


def test_environment_numbers_are_converted_and_checked_too(tmp_path: Path) -> None:
    env = {"PLUGINMON_DATA_DIR": str(tmp_path / "state")}
    result = run_cli("check-config", env={**env, "PLUGINMON_HTTP_PORT": "9500"})
    assert result.returncode == 0, result.stderr
    assert "HTTP 0.0.0.0:9500" in result.stdout
    result = run_cli("check-config", env={**env, "PLUGINMON_SAMPLE_INTERVAL_SECONDS": "inf"})
    assert result.returncode == 2
    assert "sample_interval_seconds: must be a finite number" in result.stderr
    result = run_cli("check-config", env={**env, "PLUGINMON_DATA_DIR": ""})
    assert result.returncode == 2
    assert "data_dir: must not be empty" in result.stderr


def test_what_passes_check_config_passes_run_preflight(tmp_path: Path) -> None:
    """The positive controls: a good TLS pair and a data_dir yet to be created pass."""
    path = _write(tmp_path, _tls(tmp_path) + 'http_host = "127.0.0.1"\n')
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "HTTP 127.0.0.1:9464" in result.stdout
    assert not (tmp_path / "state").exists()  # checked, not created


def test_configured_files_that_exist_pass_and_a_disabled_provider_is_not_checked(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text("{}")
    osv = tmp_path / "osv"
    osv.mkdir()
    known = tmp_path / "known_hosts"
    known.write_text("")
    path = _write(
        tmp_path,
        f'secret_keys_file = "{keys}"\nvulnerability_db = "{osv}"\n'
        f'[backups.providers.sftp]\nallowed_hosts = ["b.example"]\nknown_hosts_file = "{known}"\n',
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    # PLUGINMON_SECRET_KEYS wins over secret_keys_file: a missing file is then not used.
    unused = _write(tmp_path, 'secret_keys_file = "/no/such/secret-keys.json"\n')
    inline = {"PLUGINMON_SECRET_KEYS": "k1:" + "A" * 43 + "="}
    result = run_cli("check-config", "--config", str(unused), env=inline)
    assert result.returncode == 0, result.stderr
    disabled = _write(
        tmp_path,
        '[backups.providers.sftp]\nenabled = false\nprivate_key_file = "/no/such/id_ed25519"\n',
    )
    result = run_cli("check-config", "--config", str(disabled))
    assert result.returncode == 0, result.stderr


def test_a_missing_backup_root_is_a_warning_not_a_refusal(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        f'[backups.providers.local]\nroots = ["/no/such/backups", "/srv/{{tenant}}", "{tmp_path}"]\n',
    )
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert (
        "warning: backups.providers.local.roots[0]: no such directory /no/such/backups (yet)"
        in result.stderr
    )
    assert "roots[1]" not in result.stderr  # a {tenant} entry is not checked
    assert "roots[2]" not in result.stderr


def test_the_example_config_passes() -> None:
    result = run_cli("check-config", "--config", str(REPO / "examples" / "pluginmon.toml"))
    assert result.returncode == 0, result.stderr
    assert "HTTP 127.0.0.1:9464" in result.stdout


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = _write(tmp_path, f'http_host = "127.0.0.1"\nhttp_port = {port}\n')
        check = run_cli("check-config", "--config", str(path), env=UNREACHABLE_DB)
        run = run_cli("run", "--config", str(path), env=UNREACHABLE_DB)
    # Whether the port is free when run starts is for run to find out, not check-config.
    assert check.returncode == 0, check.stderr
    assert run.returncode == 1, run.stderr
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, run.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in errors[0]
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode 0500 directory")
def test_a_read_only_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "ro"
    data_dir.mkdir(mode=0o500)
    path = tmp_path / "c.toml"
    path.write_text(f'data_dir = "{data_dir}"\n')
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert f"data_dir: cannot write to {data_dir}" in result.stderr
