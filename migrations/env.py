"""Alembic environment for postroom's schema: its own version table, its own schema.

Settings come from ``config.attributes`` when run by ``postroom migrate`` and from
``POSTROOM_*`` variables when run as ``alembic upgrade head`` in the repo.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from postroom.database import Database
from postroom.tables import VERSION_TABLE, metadata

config = context.config


def _target() -> tuple[Database, str]:
    database = config.attributes.get("postroom_database")
    schema = config.attributes.get("postroom_schema")
    if database is None or schema is None:
        from postroom.settings import Settings

        settings = Settings.from_env()
        database = settings.database
        schema = settings.schema_name
    return database, schema


def _configure(connection: Connection, schema: str) -> None:
    translate = None if schema == metadata.schema else {metadata.schema: schema}
    connection = connection.execution_options(schema_translate_map=translate)
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        include_schemas=True,
        include_name=lambda name, type_, _parent: type_ != "schema" or name == schema,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online(database: Database, schema: str) -> None:
    engine = database.engine(application_name="postroom-migrate")
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_configure, schema)
    finally:
        await engine.dispose()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("postroom migrations run online only (they need the schema name)")
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection, config.attributes["postroom_schema"])
    else:
        database, schema = _target()
        asyncio.run(_run_online(database, schema))


main()
