"""The migrations runner against a real server, with its own small migration directories."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from pluginmon.storage.migrate import Backend, MigrationError, discover, migrate


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def test_applies_in_order_once(fresh_db: str, tmp_path: Path) -> None:
    sql_dir = _write(
        tmp_path / "sql",
        {
            "001_a.sql": "CREATE TABLE a (id int PRIMARY KEY);",
            "002_b.sql": "CREATE TABLE b (a_id int REFERENCES a (id)); INSERT INTO a VALUES (1);",
        },
    )
    first = migrate(fresh_db, sql_dir=sql_dir, backend=Backend.POSTGRES)
    assert first.applied == ("001_a.sql", "002_b.sql")
    second = migrate(fresh_db, sql_dir=sql_dir)
    assert second.applied == ()
    assert second.already_applied == 2
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT count(*) FROM a").fetchone() == (1,)
        rows = conn.execute("SELECT version, backend FROM schema_migrations ORDER BY 1").fetchall()
    assert rows == [(1, "postgres"), (2, "postgres")]


def test_changed_applied_file_is_refused_by_name(fresh_db: str, tmp_path: Path) -> None:
    sql_dir = _write(tmp_path / "sql", {"001_a.sql": "CREATE TABLE a (id int);"})
    migrate(fresh_db, sql_dir=sql_dir, backend=Backend.POSTGRES)
    (sql_dir / "001_a.sql").write_text("CREATE TABLE a (id bigint);")
    (sql_dir / "002_b.sql").write_text("CREATE TABLE b (id int);")
    with pytest.raises(MigrationError, match=r"001_a\.sql: changed after it was applied"):
        migrate(fresh_db, sql_dir=sql_dir)
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regclass('b')").fetchone() == (None,)


def test_failed_migration_rolls_back_and_names_file(fresh_db: str, tmp_path: Path) -> None:
    sql_dir = _write(
        tmp_path / "sql",
        {
            "001_a.sql": "CREATE TABLE a (id int);",
            "002_bad.sql": "CREATE TABLE c (x int); SELEC 1;",
        },
    )
    with pytest.raises(MigrationError, match=r"002_bad\.sql"):
        migrate(fresh_db, sql_dir=sql_dir, backend=Backend.POSTGRES)
    with psycopg.connect(fresh_db) as conn:
        assert conn.execute("SELECT to_regclass('c')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (1,)


def test_backend_variants_pick_the_backend(tmp_path: Path) -> None:
    sql_dir = _write(
        tmp_path / "sql",
        {
            "001_core.sql": "SELECT 1;",
            "002_ts.postgres.sql": "SELECT 2;",
            "002_ts.timescaledb.sql": "SELECT 3;",
        },
    )
    assert [m.filename for m in discover(sql_dir, Backend.POSTGRES)] == [
        "001_core.sql",
        "002_ts.postgres.sql",
    ]
    assert [m.filename for m in discover(sql_dir, Backend.TIMESCALEDB)][
        1
    ] == "002_ts.timescaledb.sql"
    (sql_dir / "003_x.postgres.sql").write_text("SELECT 4;")
    with pytest.raises(MigrationError, match="version 003 has no file for backend timescaledb"):
        discover(sql_dir, Backend.TIMESCALEDB)


def test_concurrent_runners_apply_each_file_once(fresh_db: str, tmp_path: Path) -> None:
    sql_dir = _write(
        tmp_path / "sql",
        {
            "001_a.sql": "CREATE TABLE a (id int); SELECT pg_sleep(0.5);",
            "002_b.sql": "CREATE TABLE b (id int);",
        },
    )
    results: list[tuple[str, ...]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(fresh_db, sql_dir=sql_dir, backend=Backend.POSTGRES).applied)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(results, key=len) == [(), (), (), ("001_a.sql", "002_b.sql")]
