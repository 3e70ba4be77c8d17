"""The built wheel owns one import name, ``pluginmon``, and installs beside python-daemon."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

# The top-level folders that install as pluginmon.<folder> (pyproject.toml package-dir).
PACKAGE_FOLDERS = ("daemon", "collectors", "storage", "alerts", "registry", "sql")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of what the wheel is made of: an in-tree build reuses build/lib, whose
    # leftovers (a module since deleted, a package since dropped from the list) would ship.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for folder in ("pluginmon", *PACKAGE_FOLDERS):
        shutil.copytree(
            REPO_ROOT / folder,
            source / folder,
            symlinks=True,  # pluginmon/<folder> -> ../<folder>, as in the repository
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("pluginmon-*.whl")
    return built


def test_wheel_holds_only_the_pluginmon_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/", 1)[0] for name in archive.namelist()}
        names = set(archive.namelist())
    dist_info = {top for top in tops if top.endswith(".dist-info")}
    assert tops - dist_info == {"pluginmon"}
    assert "pluginmon/daemon/cli.py" in names
    assert "pluginmon/sql/001_core.sql" in names
    assert "pluginmon/storage/writer.py" in names
    # Every module of every folder (registry/ and any sub-package too) and every migration:
    # a folder missing from [tool.setuptools] packages would otherwise ship without notice.
    shipped = {
        f"pluginmon/{path.relative_to(REPO_ROOT)}"
        for folder in PACKAGE_FOLDERS
        for pattern in ("*.py", "*.sql")
        for path in (REPO_ROOT / folder).rglob(pattern)
        if "__pycache__" not in path.parts
    }
    assert len(shipped) > 100  # the globs really found the tree
    assert sorted(shipped - names) == []


def test_wheel_installs_beside_python_daemon(wheel: Path, tmp_path: Path) -> None:
    # Nothing from this checkout may leak in through the environment.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # python-daemon (and its one dependency) really installed from the index; pluginmon's own
    # dependencies are borrowed from the test environment through a path entry, which puts
    # them after the new venv's site-packages and does not run that environment's .pth hooks
    # (so the editable install of this checkout is not what gets imported).
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "python-daemon"],
        check=True,
        timeout=300,
        env=clean,
    )
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
        env=clean,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "_pluginmon_test_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import daemon, daemon.pidfile, pluginmon.daemon.cli, pluginmon.storage.writer;"
            "from pluginmon.storage.migrate import default_sql_dir;"
            "print(daemon.DaemonContext.__module__);"
            "print(pluginmon.daemon.cli.__file__);"
            "print(default_sql_dir())",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean,
        timeout=120,
    )
    daemon_module, cli_file, sql_dir = probe.stdout.split()
    assert daemon_module == "daemon.daemon"  # python-daemon's, untouched by pluginmon
    assert Path(cli_file).is_relative_to(site / "pluginmon")
    # The migrations ship inside the package and are found there, not in a checkout.
    assert Path(sql_dir) == site / "pluginmon" / "sql"
    assert (Path(sql_dir) / "001_core.sql").is_file()

    version = subprocess.run(
        [str(env_dir / "bin" / "pluginmon"), "--version"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean,
        timeout=120,
    )
    assert version.stdout.strip().startswith("pluginmon 0.")
    record = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m;"
            "print('\\n'.join(sorted({str(f).split('/')[0] for f in m.files('pluginmon')})))",
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean,
        timeout=120,
    )
    installed_tops = set(record.stdout.split()) - {"..", "../.."}
    assert {top for top in installed_tops if not top.endswith(".dist-info")} == {"pluginmon"}
