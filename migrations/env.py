"""Alembic environment for postroom's schema: its own version table, its own schema.

Settings come from ``config.attributes`` when run by ``postroom migrate`` and from
``POSTROOM_*`` variables when run as ``alembic upgrade head`` in the repo.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from postroom.tables import VERSION_TABLE, metadata

config = context.config


def _target() -> tuple[str, str]:
    url = config.attributes.get("postroom_url")
    schema = config.attributes.get("postroom_schema")
    if url is None or schema is None:
        from postroom.settings import Settings

        settings = Settings.from_env()
        url = settings.database_url.get_secret_value()
        schema = settings.schema_name
    return url, schema


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


async def _run_online(url: str, schema: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_configure, schema)
    finally:
        await engine.dispose()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("postroom migrations run online only (they need the schema name)")
    url, schema = _target()
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection, schema)
    else:
        asyncio.run(_run_online(url, schema))


main()
