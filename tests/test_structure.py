"""The shape of the tree: one docstring line per module, no large module without a reason, and CI
running the README's test command."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("daemon", "collectors", "storage", "alerts", "registry")
# "No production module over about 500 lines without a reason written at its top."
LINES_WITHOUT_A_REASON = 520
REASON = "Over 500 lines on purpose"


def production_modules() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        if (REPO_ROOT / package).is_dir()
        for path in (REPO_ROOT / package).glob("*.py")
    )


def test_every_module_starts_with_a_docstring_saying_what_it_owns() -> None:
    missing = [
        str(path.relative_to(REPO_ROOT))
        for path in production_modules()
        if path.name != "__init__.py" and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert missing == []


def test_large_modules_say_why_at_their_top() -> None:
    modules = production_modules()
    assert len(modules) > 40  # the glob really found the tree
    unexplained = []
    for path in modules:
        text = path.read_text()
        lines = text.count("\n")
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if lines > LINES_WITHOUT_A_REASON and REASON not in docstring:
            unexplained.append(f"{path.relative_to(REPO_ROOT)} ({lines} lines)")
    assert unexplained == []


def test_the_collectors_contract_forbids_every_collectors_module_but_models() -> None:
    """import-linter's "use only collectors.models" contract lists the forbidden modules one
    by one (a forbidden package would take models with it): a new collectors module must be
    added there, or storage, alerts and registry could import it unchecked."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    (contract,) = [
        c
        for c in pyproject["tool"]["importlinter"]["contracts"]
        if c["name"].endswith("use only collectors.models from collectors")
    ]
    assert set(contract["source_modules"]) >= {
        f"pluginmon.{p}" for p in ("storage", "alerts", "registry")
    }
    modules = {
        f"pluginmon.collectors.{path.stem}"
        for path in (REPO_ROOT / "collectors").glob("*.py")
        if path.stem not in ("__init__", "models")
    }
    assert len(modules) > 5  # the glob really found the package
    assert sorted(modules - set(contract["forbidden_modules"])) == []


def test_ci_runs_the_readmes_test_command() -> None:
    """The README's second command is what .ci/run runs (its set-up line, then its pytest
    line), word for word."""
    readme = (REPO_ROOT / "README.md").read_text().splitlines()
    fence = readme.index("```sh")
    commands = [
        line for line in readme[fence + 1 : readme.index("```", fence + 1)] if line[:1] != "#"
    ]
    assert len(commands) == 2, commands
    setup, readme_pytest = commands[1].rsplit(" && ", 1)
    assert setup == "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'", setup
    assert readme_pytest.startswith(".venv/bin/pytest "), readme_pytest
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert setup in ci_lines
    assert [line for line in ci_lines if line.startswith(".venv/bin/pytest")] == [readme_pytest]
