"""Run postroom's Alembic migrations from an installed package or a checkout."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from postroom.errors import ConfigError
from postroom.settings import Settings
from postroom.tables import VERSION_TABLE


def migrations_dir() -> Path:
    """Find the migrations: inside the wheel (``postroom/migrations``) or the checkout."""
    packaged = Path(str(resources.files("postroom"))) / "migrations"
    if (packaged / "env.py").is_file():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    raise ConfigError("postroom's migrations are missing from this installation")


def alembic_config(settings: Settings) -> Config:
    """Return an Alembic config aimed at *settings*' database and schema."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["postroom_database"] = settings.database
    config.attributes["postroom_schema"] = settings.schema_name
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Upgrade postroom's schema to *revision*; safe to run again (it is a no-op then)."""
    command.upgrade(alembic_config(settings), revision)


@dataclass(frozen=True, slots=True)
class Migration:
    """What ``postroom migrate`` did: the schema it created, the revisions it applied."""

    schema: str
    created_schema: bool
    applied: tuple[tuple[str, str], ...]
    """(revision, its description), oldest first."""
    at: str | None

    def lines(self) -> list[str]:
        """The report a person reads: what changed, or that nothing needed to."""
        if not self.applied and not self.created_schema:
            return [f"schema {self.schema!r} is already at {self.at}: nothing to do"]
        lines = [f"created schema {self.schema!r}"] if self.created_schema else []
        lines += [f"applied {rev}: {doc}" for rev, doc in self.applied]
        lines.append(f"schema {self.schema!r} is now at {self.at}")
        return lines


def upgrade_reporting(settings: Settings, revision: str = "head") -> Migration:
    """Upgrade like :func:`upgrade` and return what was done."""
    existed = asyncio.run(_schema_exists(settings))
    before = current_revision_sync(settings) if existed else None
    upgrade(settings, revision)
    after = current_revision_sync(settings)
    script = ScriptDirectory(str(migrations_dir()))
    applied: list[tuple[str, str]] = []
    if after is not None and after != before:
        for step in script.iterate_revisions(after, before):
            applied.append((step.revision, (step.doc or "").strip().splitlines()[0]))
    return Migration(
        schema=settings.schema_name,
        created_schema=not existed,
        applied=tuple(reversed(applied)),
        at=after,
    )


async def _schema_exists(settings: Settings) -> bool:
    engine = settings.database.engine(application_name="postroom-migrate")
    try:
        async with engine.connect() as connection:
            return bool(
                await connection.scalar(
                    text("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = :name)"),
                    {"name": settings.schema_name},
                )
            )
    finally:
        await engine.dispose()


async def upgrade_async(settings: Settings, revision: str = "head") -> None:
    """Like :func:`upgrade`, for code already running in an event loop (app start-up)."""
    engine = settings.database.engine(application_name="postroom-migrate")
    try:
        async with engine.begin() as connection:

            def run(sync_connection: object) -> None:
                config = alembic_config(settings)
                config.attributes["connection"] = sync_connection
                command.upgrade(config, revision)

            await connection.run_sync(run)
    finally:
        await engine.dispose()


def head_revision() -> str | None:
    """Return the newest revision this package ships."""
    script = ScriptDirectory(str(migrations_dir()))
    return script.get_current_head()


async def current_revision(settings: Settings) -> str | None:
    """Return the revision the database is at, or None if postroom was never migrated."""
    engine = settings.database.engine(application_name="postroom-migrate")
    try:
        async with engine.connect() as connection:
            exists = await connection.scalar(
                text("SELECT to_regclass(:name) IS NOT NULL"),
                {"name": f'"{settings.schema_name}".{VERSION_TABLE}'},
            )
            if not exists:
                return None

            def _read(sync_connection: object) -> str | None:
                context = MigrationContext.configure(
                    sync_connection,  # type: ignore[arg-type]
                    opts={
                        "version_table": VERSION_TABLE,
                        "version_table_schema": settings.schema_name,
                    },
                )
                return context.get_current_revision()

            return await connection.run_sync(_read)
    finally:
        await engine.dispose()


def current_revision_sync(settings: Settings) -> str | None:
    """Blocking form of :func:`current_revision`, for CLI checks."""
    return asyncio.run(current_revision(settings))
