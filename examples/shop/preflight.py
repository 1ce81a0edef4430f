"""Before the demo starts anything: do PostgreSQL and RabbitMQ answer, quickly?

A service that does not answer within a few seconds is reported with its URL (password
masked) and the commands that start it; one that answers but refuses us is reported with
what to fix. The demo's database is created when the server has no such database yet.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
from aio_pika.exceptions import ProbableAuthenticationError

from postroom.settings import Settings, redact_url

TIMEOUT = 3.0

PG_HINT = (
    "start it from the local packages: "
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n"
    "  or with Docker: docker compose -f deploy/compose.yaml up -d postgres "
    "(then POSTROOM_DATABASE_URL=postgresql+asyncpg://postroom:postroom@127.0.0.1:5432/postroom)"
)
RABBIT_HINT = (
    "start it from the local packages: rabbitmq-server -detached\n"
    "  or with Docker: docker compose -f deploy/compose.yaml up -d rabbitmq "
    "(then POSTROOM_AMQP_URL=amqp://postroom:postroom@127.0.0.1:5672/)"
)


class DemoError(Exception):
    """Something a person must fix; the message says what and how."""


async def check(settings: Settings) -> None:
    """Raise DemoError naming every service that does not answer, and how to start it.

    Both are probed at once and each probe is bounded, so this never hangs.
    """
    problems = await asyncio.gather(_check_postgres(settings), _check_rabbitmq(settings))
    found = [problem for problem in problems if problem]
    if found:
        raise DemoError("\n".join(found))


async def _check_postgres(settings: Settings) -> str | None:
    dsn = settings.asyncpg_dsn
    shown = redact_url(settings.database_url.get_secret_value())
    try:
        await _close(await _connect(dsn))
    except asyncpg.InvalidCatalogNameError:
        try:
            await _create_database(dsn)
        except Exception as exc:
            return (
                f"the database of {shown} does not exist and could not be created "
                f"({_describe(exc, dsn)})"
            )
    except Exception as exc:
        return _explain("PostgreSQL", shown, exc, dsn)
    return None


async def _check_rabbitmq(settings: Settings) -> str | None:
    url = settings.amqp_url.get_secret_value()
    try:
        connection = await asyncio.wait_for(aio_pika.connect(url, timeout=TIMEOUT), TIMEOUT + 1)
        await connection.close()
    except Exception as exc:
        return _explain("RabbitMQ", redact_url(url), exc, url)
    return None


async def _connect(dsn: str) -> asyncpg.Connection[Any]:
    connection: asyncpg.Connection[Any] = await asyncio.wait_for(
        asyncpg.connect(dsn, timeout=TIMEOUT), TIMEOUT + 1
    )
    return connection


async def _close(connection: asyncpg.Connection[Any]) -> None:
    await connection.close(timeout=TIMEOUT)


async def _create_database(dsn: str) -> None:
    """Create the database *dsn* names, through the server's ``postgres`` database."""
    parts = urlsplit(dsn)
    quoted = parts.path.lstrip("/").replace('"', '""')
    admin = await _connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # another run was quicker
            await admin.execute(f'CREATE DATABASE "{quoted}"')
    finally:
        await _close(admin)


def _explain(service: str, shown: str, exc: BaseException, url: str) -> str:
    """Say whether *service* is down (and how to start it) or refused us (and what to fix)."""
    why = _describe(exc, url)
    postgres = service == "PostgreSQL"
    answered = isinstance(exc, asyncpg.PostgresError | ProbableAuthenticationError)
    if answered or not isinstance(exc, OSError | TimeoutError):
        setting = "POSTROOM_DATABASE_URL" if postgres else "POSTROOM_AMQP_URL"
        return (
            f"{service} at {shown} answered but refused the connection ({why}); "
            f"check the user, password and {'database' if postgres else 'vhost'} in {setting}"
        )
    return (
        f"{service} is not reachable at {shown} ({why});\n  {PG_HINT if postgres else RABBIT_HINT}"
    )


def _describe(exc: BaseException, url: str) -> str:
    """``Type: message``, short, with the URL's password masked if the text repeats it."""
    described = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    password = urlsplit(url).password
    if password:
        described = described.replace(password, "***")
    return described[:300]
