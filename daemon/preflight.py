"""Checks of the machine against valid settings: what ``run`` would fail on at start.

The schema says whether a value is well formed; these say whether this machine can use it:
``http_host`` resolves to an address of this machine, the TLS certificate and key load and
belong together, ``data_dir`` is (or can be made) a writable directory, ``proc_root`` exists,
and the files named in the config that are only read at first use exist (the secret keyring,
the offline vulnerability database, SFTP key and known_hosts files): a configured file that is
missing is almost always a mistake, better told at start than at the first secret or scan.
``check-config`` and ``run`` both call ``preflight``, so a configuration that check-config passes
does not fail at start for one of these reasons, and ``run`` refuses it with exit 2, not a
traceback. They touch nothing: the probe file in ``data_dir`` is anonymous and gone at once.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
from pathlib import Path

from pluginmon.daemon.runtime import uvloop_installed
from pluginmon.daemon.settings import Settings


def preflight(settings: Settings) -> list[tuple[str, str]]:
    """Every problem found, as ``(field, problem)``; empty when ``run`` can start."""
    problems: list[tuple[str, str]] = []
    host = _host_problem(settings.http_host)
    if host is not None:
        problems.append(("http_host", host))
    if settings.http_tls_cert_file is not None and settings.http_tls_key_file is not None:
        problems += _tls_problems(settings.http_tls_cert_file, settings.http_tls_key_file)
    data_dir = _writable_dir_problem(settings.data_dir)
    if data_dir is not None:
        problems.append(("data_dir", data_dir))
    if not _is_dir(settings.proc_root):
        problems.append(("proc_root", f"no such directory: {settings.proc_root}"))
    problems += _missing_files(settings)
    if settings.event_loop == "uvloop" and not uvloop_installed():
        problems.append(
            ("event_loop", "uvloop is not installed (pip install uvloop, or use auto or asyncio)")
        )
    return problems


def _missing_files(settings: Settings) -> list[tuple[str, str]]:
    """The configured files read only at first use that are not there (or not readable)."""
    problems: list[tuple[str, str]] = []
    keys = settings.secret_keys_file
    # PLUGINMON_SECRET_KEYS wins over the file when set (and settings checked it already).
    from_environment = settings.secret_keys is not None and bool(
        settings.secret_keys.get_secret_value().strip()
    )
    if keys is not None and not from_environment and not _is_readable_file(keys):
        # Only the embedded default is created at first start; a named file is not.
        problems.append(
            (
                "secret_keys_file",
                f"no readable file {keys} (create it with `pluginmon secrets rotate`)",
            )
        )
    osv = settings.vulnerability_db
    if osv is not None and not (_is_dir(osv) or _is_readable_file(osv)):
        problems.append(("vulnerability_db", f"no such directory or readable file: {osv}"))
    for name, provider in settings.backups.providers.items():
        if not provider.enabled:
            continue
        for field in ("private_key_file", "known_hosts_file"):
            path = getattr(provider, field)
            if path is not None and not _is_readable_file(path):
                problems.append((f"backups.providers.{name}.{field}", f"no readable file {path}"))
    return problems


def preflight_warnings(settings: Settings) -> list[tuple[str, str]]:
    """What ``run`` can start with but an operator should hear about, as ``(field, warning)``:
    backup ``roots`` that are not directories (yet). Not refused: roots are an allow-list, an
    NFS mount may appear after start, and a ``{tenant}`` entry is not checked at all."""
    warnings: list[tuple[str, str]] = []
    for name, provider in settings.backups.providers.items():
        if not provider.enabled:
            continue
        for i, root in enumerate(provider.roots):
            if "{" not in str(root) and not _is_dir(root):
                warnings.append(
                    (
                        f"backups.providers.{name}.roots[{i}]",
                        f"no such directory {root} (yet): backups under it cannot be read",
                    )
                )
    return warnings


def _is_readable_file(path: Path) -> bool:
    try:
        with path.open("rb"):
            return path.is_file()
    except OSError:
        return False


def _host_problem(host: str) -> str | None:
    """Why the HTTP server could not listen on ``host`` (any port), or None.

    Binds port 0 on every address the name resolves to, as asyncio's create_server binds
    them all; a port in use is a runtime matter, reported when ``run`` binds the real port.
    """
    try:
        infos = socket.getaddrinfo(
            host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
        )
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        return f"{host!r} does not resolve ({reason})"
    for family, kind, proto, _, address in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue  # an address family this machine lacks; asyncio skips it too
        with sock:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address[0], 0, *address[2:]))
            except OSError as exc:
                return f"cannot listen on {address[0]} ({exc.strerror})"
    return None


def _tls_problems(cert_file: Path, key_file: Path) -> list[tuple[str, str]]:
    """The certificate and key as daemon.http loads them, each failure named by its file."""
    for field, path in (("http_tls_cert_file", cert_file), ("http_tls_key_file", key_file)):
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            return [(field, f"cannot read {path}: {exc.strerror}")]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=str(cert_file))
    except ssl.SSLError:
        return [("http_tls_cert_file", f"{cert_file} holds no PEM certificate")]
    try:
        # A key with a passphrase would make OpenSSL prompt on the terminal: refuse it instead.
        context.load_cert_chain(str(cert_file), str(key_file), password=_no_passphrase)
    except _EncryptedKeyError:
        return [
            ("http_tls_key_file", f"{key_file} is encrypted; give the key without a passphrase")
        ]
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return [
                ("http_tls_key_file", f"{key_file} does not match the certificate in {cert_file}")
            ]
        return [
            (
                "http_tls_key_file",
                f"{key_file} holds no usable PEM private key (unencrypted, matching the certificate)",
            )
        ]
    return []


class _EncryptedKeyError(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _EncryptedKeyError


def _writable_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not, and cannot become, a directory pluginmon writes to; or None."""
    existing = path
    try:
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
        if not existing.is_dir():
            if existing == path:
                return f"{path} is not a directory"
            return f"cannot be created: {existing} is not a directory"
        # Creating a file is the only true test (a read-only mount, an ACL, root or not).
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        verb = "cannot write to" if existing == path else f"cannot create {path}: cannot write to"
        return f"{verb} {existing} ({exc.strerror})"
    return None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False
