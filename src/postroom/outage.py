"""Which errors mean "a dependency is away": back off and reconnect, never give up.

Everything else (a missing table, bad credentials, a topology mismatch) is a fault a
person must fix, and crashes the process with a clear message instead of looping.
"""

from __future__ import annotations

import asyncio

import asyncpg
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import InterfaceError as SAInterfaceError

from postroom.rabbit import BrokerError, ChannelGone

_AWAY: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # A backend killed while idle leaves the protocol consuming an error that never
    # ends; the next query raises this. The connection is unusable: reconnect.
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    OperationalError,
    SAInterfaceError,
    BrokerError,
    ChannelGone,
)


def is_outage(exc: BaseException) -> bool:
    """Return True if *exc* means the database or the broker is unreachable for now."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        # SQLAlchemy wraps driver errors it cannot map (e.g. "the database system is not
        # yet accepting connections" during a restart) in a plain DBAPIError: look inside.
        orig = getattr(exc.orig, "__cause__", None) or exc.orig
        if isinstance(orig, BaseException) and orig is not exc and is_outage(orig):
            return True
        if isinstance(exc.__cause__, BaseException) and is_outage(exc.__cause__):
            return True
    return isinstance(exc, _AWAY)
