"""Migrations: the shipped revisions create exactly tables.metadata, from a wheel too."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from postroom.migrate import current_revision, head_revision, upgrade_async
from postroom.settings import Settings
from postroom.tables import metadata

ROOT = Path(__file__).resolve().parents[1]


async def test_migrated_schema_matches_the_metadata(database_url):
    engine = create_async_engine(database_url)

    def diff(connection):
        context = MigrationContext.configure(
            connection,
            opts={
                "include_schemas": True,
                "include_name": lambda n, t, _p: (
                    (t != "schema" or n == "postroom") and n != "postroom_alembic_version"
                ),
            },
        )
        return compare_metadata(context, metadata)

    async with engine.connect() as conn:
        changes = await conn.run_sync(diff)
    await engine.dispose()
    assert changes == [], f"migrations and tables.py drifted apart: {changes}"


async def test_upgrade_is_idempotent_and_reports_head(database_url):
    settings = Settings(database_url=database_url)  # type: ignore[arg-type]
    await upgrade_async(settings)
    assert await current_revision(settings) == head_revision()
    other = Settings(database_url=database_url, schema="elsewhere")  # type: ignore[arg-type]
    assert await current_revision(other) is None


def test_wheel_ships_the_migrations(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("postroom-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "postroom/migrations/env.py" in names
    assert any(n.startswith("postroom/migrations/versions/0001") for n in names)
    # The console's assets ship inside the package: it must work air-gapped.
    for asset in ("static/htmx.min.js", "static/console.css", "templates/base.html"):
        assert f"postroom/console/{asset}" in names, asset
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    probe = "import postroom.migrate as m; print(m.migrations_dir())"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().startswith(str(target))


async def test_a_named_schema_is_migrated_to_head_in_that_schema(database_url):
    """ALTER TABLE revisions must alter the configured schema, not "postroom"."""
    import uuid

    from sqlalchemy import text

    schema = f"named_{uuid.uuid4().hex[:8]}"
    settings = Settings(database_url=database_url, schema=schema)  # type: ignore[arg-type]
    engine = create_async_engine(database_url)
    try:
        await upgrade_async(settings)
        assert await current_revision(settings) == head_revision()
        async with engine.connect() as conn:
            columns = await conn.scalar(
                text(
                    "SELECT array_agg(column_name::text ORDER BY column_name) FROM "
                    "information_schema.columns WHERE table_schema = :s AND table_name = 'audit'"
                ),
                {"s": schema},
            )
        assert "run" in columns
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()
