"""Check, before the relay or a worker starts, what no amount of waiting would fix.

A database that does not exist, a refused login, a certificate that does not verify, a
schema never migrated or behind the package's head: each is a :class:`ConfigError` with
one line naming the fix, raised before anything is consumed or published. A dependency
that is merely unreachable is not: the process starts and its supervisor waits for it
(a Deployment may well start before its database), with the reason logged here once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import structlog
from alembic.script import ScriptDirectory

from postroom import migrate, rabbit
from postroom.diagnosis import broker_error, database_error
from postroom.errors import ConfigError, SchemaNotReadyError, UnreachableError
from postroom.settings import Settings
from postroom.tables import VERSION_TABLE

log = structlog.get_logger("postroom.preflight")

TIMEOUT = 10.0


async def preflight(settings: Settings, *, name: str) -> None:
    """Raise :class:`ConfigError` if the database, schema or broker is misconfigured."""
    await check_schema(settings, name=name)
    try:
        with _quiet("aiormq.connection"):
            connection = await rabbit.connect(
                settings.broker, name=f"{name}-preflight", timeout=TIMEOUT
            )
    except Exception as exc:  # each failure is mapped to config (raise) or outage (wait)
        _raise_unless_unreachable(broker_error(exc, settings), exc)
    else:
        await connection.close()


async def check_schema(settings: Settings, *, name: str) -> None:
    """Raise :class:`SchemaNotReadyError` unless the schema is at this package's head."""
    database = settings.database
    try:
        connection = await database.connect(application_name=f"{name}-preflight", timeout=TIMEOUT)
    except Exception as exc:  # each failure is mapped to config (raise) or outage (wait)
        _raise_unless_unreachable(database_error(exc, settings), exc)
        return
    try:
        table = f'"{settings.schema_name}".{VERSION_TABLE}'
        exists = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
        current = await connection.fetchval(f"SELECT version_num FROM {table}") if exists else None  # noqa: S608
    finally:
        await connection.close(timeout=2)
    head = migrate.head_revision()
    if current == head:
        return
    known = {
        rev.revision for rev in ScriptDirectory(str(migrate.migrations_dir())).walk_revisions()
    }
    if current is not None and current not in known:
        raise ConfigError(
            f"schema {settings.schema_name!r} is at revision {current}, which this postroom "
            f"does not know (head is {head}): a newer postroom migrated it; upgrade postroom"
        )
    raise SchemaNotReadyError(settings.schema_name, current, head)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a client library's own ERROR line for a failure we answer in one line.

    At DEBUG level nothing is silenced.
    """
    logger = logging.getLogger(logger_name)
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _raise_unless_unreachable(error: Exception, cause: Exception) -> None:
    if isinstance(error, UnreachableError):
        log.warning("preflight.unreachable", error=str(error))
        return
    raise error from cause
