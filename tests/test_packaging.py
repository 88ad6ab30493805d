"""The wheel ships the schema files: `taskd migrate` from a plain (non-editable) install applies
them, and a migrate that finds no schema file at all fails loudly instead of "none needed"."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import aiopg
import psycopg2
import pytest

import devtools
from taskd import db
from tests.conftest import PROJECT, admin_execute, with_dbname

SOURCES = ("pyproject.toml", "README.md", "taskd", "sql", "devtools")
SCHEMA_FILES = sorted(path.name for path in (PROJECT / "sql").glob("[0-9][0-9][0-9]_*.sql"))
LIMIT = 120.0  # a bound on a build or a command, not a goal


def pip(*args: str) -> None:
    """Run the test virtualenv's pip offline; its output is shown if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--no-index", "--quiet", "--no-input"],
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of the project, built from a copy of its sources (a build leaves build/ and
    *.egg-info next to them) with the virtualenv's setuptools."""
    work = tmp_path_factory.mktemp("wheel")
    (work / "src").mkdir()
    for name in SOURCES:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(
                source, work / "src" / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(source, work / "src" / name)
    pip(
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--wheel-dir",
        str(work / "dist"),
        str(work / "src"),
    )
    (built,) = (work / "dist").glob("taskd-*.whl")
    return built


def test_the_wheel_ships_every_schema_file(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert SCHEMA_FILES
    assert sorted(n.removeprefix("taskd/sql/") for n in names if n.startswith("taskd/sql/")) == (
        SCHEMA_FILES
    )
    # Nothing beside the package: no sql/, and no dev servers (devtools/ is in the sources).
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"taskd"}


async def run_migrate(site: Path, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """`python -m taskd migrate` with the installed copy first on the path."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskd",
        "migrate",
        env={**os.environ, **env, "PYTHONPATH": str(site)},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), LIMIT)
    assert proc.returncode is not None
    return proc.returncode, output.decode()


async def test_migrate_from_a_plain_install_applies_the_shipped_schema(
    wheel: Path, services: devtools.Services, namespace: str, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    pip("install", "--no-deps", "--target", str(site), str(wheel))
    assert not (site / "sql").exists()
    name = f"taskd_wheel_{uuid.uuid4().hex[:8]}"
    admin_execute(services.postgres_dsn, f"CREATE DATABASE {name}")
    dsn = with_dbname(services.postgres_dsn, name)
    env = {
        "TASKD_POSTGRES_DSN": dsn,
        "TASKD_REDIS_URL": services.redis_url,
        "TASKD_REDIS_NAMESPACE": namespace,  # a new schema clears its namespace: this test's
    }
    try:
        code, output = await run_migrate(site, env, tmp_path)
        assert code == 0, output
        assert f"applied {len(SCHEMA_FILES)} migration(s): {', '.join(SCHEMA_FILES)}" in output
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT name FROM schema_migrations ORDER BY name")
                assert [row[0] for row in cur.fetchall()] == SCHEMA_FILES
        finally:
            conn.close()

        # Without the installed copy's files, it fails (the checkout's sql/ is not read).
        for path in (site / "taskd" / "sql").glob("*.sql"):
            path.unlink()
        code, output = await run_migrate(site, env, tmp_path)
        assert code == 1, output
        assert output.count("\n") == 1, output
        assert output.startswith("taskd: FileNotFoundError: no migration files"), output
    finally:
        admin_execute(services.postgres_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_migrate_with_no_schema_file_fails(database_dsn: str, tmp_path: Path) -> None:
    (tmp_path / "README").write_text("no NNN_*.sql here")
    async with aiopg.connect(dsn=database_dsn) as conn, conn.cursor() as cur:
        with pytest.raises(FileNotFoundError, match="no migration files"):
            await db.migrate(cur, tmp_path)


def test_a_checkout_reads_its_own_sql_directory() -> None:
    """The editable install `make test` uses: the files are the checkout's, not a copy."""
    assert db.SQL_DIR == PROJECT / "sql"
    assert [path.name for path in db.migration_files()] == SCHEMA_FILES
