"""Three kinds of failure, told apart here, and the one supervisor that rides outages out.

DESIGN.md decision 12. :func:`is_outage` is the only place that decides "a dependency
is away": a connection to the database or the broker that could not be opened or was
lost. :func:`config_error` recognises what a person must fix (postroom's schema or a
table of it missing, a column of a newer revision absent): runtime loops stop on it
and raise :class:`~postroom.errors.ConfigError`. Anything else raised inside postroom
is a bug: the caller logs it at ERROR with its traceback and carries on without
marking anything down.

Why the predicate is narrow: an ``OSError`` or ``TimeoutError`` says nothing about who
raised it (a handler calling a payment provider, a file a programming error failed to
open). Errors from *opening* a connection are made unambiguous where they happen
(:func:`reaching` and :func:`reachable_engine` wrap them in :class:`Unreachable`); a
connection lost while in use is recognised by the driver's own exception types.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from postroom.database import Database
from postroom.errors import ConfigError, PostroomError

DATABASE = "database"
BROKER = "broker"

LONG_SESSION = 10.0
"""Seconds a connected session must last for the next reconnect to start without a pause.

A link that connects and drops at once (a flapping network, a proxy cutting every
connection) must not be reconnected in a tight loop: every cycle returns the worker's
prefetched messages, and the broker counts each return towards ``x-delivery-limit``."""


class Unreachable(PostroomError):
    """A connection to *peer* (database or broker) could not be opened or closed under us.

    Always an outage. *url* is redacted; *error* is what the client reported.
    """

    def __init__(self, peer: str, url: str, error: BaseException) -> None:
        super().__init__(f"{peer} {url}: {describe(error)}")
        self.peer = peer
        self.url = url
        self.error = error


_OPENING: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, no route, name not resolved
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
)

_DATABASE_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    # A backend killed while idle leaves the protocol consuming an error that never
    # ends; the next query raises this. The connection is unusable: reconnect.
    asyncpg.exceptions.InternalClientError,
)

_NOT_MIGRATED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.UndefinedTableError,
    asyncpg.exceptions.InvalidSchemaNameError,
    asyncpg.exceptions.UndefinedColumnError,
)


def is_outage(exc: BaseException) -> bool:
    """Return True if *exc* means a connection to the database or the broker is gone.

    True for :class:`Unreachable`, for a database connection lost in use (the
    driver's connection errors, SQLAlchemy's ``connection_invalidated``) and for the
    AMQP client's connection and channel errors (its reasonless close included),
    looked for in the exception's chain.
    False for everything else, a bare ``OSError`` or ``TimeoutError`` included.
    """
    for current in _chain(exc):
        if isinstance(current, Unreachable):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, _DATABASE_LOST):
            return True
        if isinstance(current, asyncpg.InterfaceError) and "connection is closed" in str(current):
            return True
        if _is_broker_error(current):
            return True
    return False


def config_error(exc: BaseException, *, schema: str) -> ConfigError | None:
    """Return the :class:`ConfigError` *exc* stands for, or None if it is not one.

    A missing schema, table or column of postroom's own means the database was not
    migrated (or is behind head): one line naming the fix, instead of a requeue loop.
    """
    for current in _chain(exc):
        if isinstance(current, _NOT_MIGRATED):
            detail = str(current).splitlines()[0] if str(current) else type(current).__name__
            return ConfigError(
                f"database: {detail}; the postroom schema {schema!r} is missing or behind "
                "head; run `postroom migrate`"
            )
    return None


def peer_of(exc: BaseException) -> str:
    """Return which dependency an outage concerns: ``database`` or ``broker``."""
    for current in _chain(exc):
        if isinstance(current, Unreachable):
            return current.peer
        if _is_broker_error(current):
            return BROKER
    return DATABASE


def describe(exc: BaseException) -> str:
    """One line for a log: the exception's type and the start of its message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


@contextlib.asynccontextmanager
async def reaching(peer: str, url: str) -> AsyncIterator[None]:
    """Turn a failure to open a connection to *peer* into :class:`Unreachable`.

    Wrap only the call that opens the connection (and its first handshake), so an
    ``OSError`` from anywhere else is never taken for an outage. *url* must be redacted.
    """
    try:
        yield
    except _OPENING as exc:
        raise Unreachable(peer, url, exc) from exc
    except Exception as exc:
        if _is_broker_error(exc):
            raise Unreachable(peer, url, exc) from exc
        raise


def reachable_engine(database: Database, *, url: str, **options: Any) -> AsyncEngine:
    """Return *database*'s engine whose pool raises :class:`Unreachable` when it cannot connect.

    A pool reconnects lazily, at the checkout after a connection was lost, so without
    this a dispatch during a database restart would raise a bare ``OSError``. *options*
    go to ``create_async_engine`` (pool size, ``application_name`` for the connections).
    """
    application_name = options.pop("application_name", None)

    async def creator() -> Any:
        async with reaching(DATABASE, url):
            return await database.connect(application_name=application_name)

    return create_async_engine("postgresql+asyncpg://", async_creator=creator, **options)


class Supervisor:
    """Connect, run, and on an outage back off and reconnect, until *stop* is set.

    The one place relay and worker wait for their dependencies. Each session is
    ``connect()`` then ``work()``; ``close()`` runs after every session. An outage
    (see :func:`is_outage`) in either is retried with tenacity's capped, jittered
    exponential backoff, every wait logged with the dependency, its redacted URL and
    the error. A session that ran :data:`LONG_SESSION` seconds resets the backoff, so
    a short-lived one (a flapping link) backs off like a failed connect. Any other
    exception (a :class:`ConfigError`, a bug) propagates after ``close()``.
    *on_outage* is called for every outage (to count reconnects).
    """

    def __init__(
        self,
        component: str,
        *,
        urls: Mapping[str, str],
        stop: asyncio.Event,
        max_wait: float = 5.0,
        on_outage: Callable[[], None] | None = None,
    ) -> None:
        self._component = component
        self._urls = dict(urls)
        self._stop = stop
        self._max_wait = max_wait
        self._log = structlog.get_logger(f"postroom.{component}")
        self._on_outage = on_outage

    async def run(
        self,
        *,
        connect: Callable[[], Awaitable[None]],
        work: Callable[[], Awaitable[None]],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        stop = self._stop
        while not stop.is_set():
            retrying = AsyncRetrying(
                retry=retry_if_exception(lambda exc: is_outage(exc) and not stop.is_set()),
                wait=wait_random_exponential(multiplier=0.2, max=self._max_wait),
                sleep=self._sleep,
                before_sleep=self._explain,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._session(connect, work, close)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                return  # an outage while stopping: nothing left to wait for

    async def _session(
        self,
        connect: Callable[[], Awaitable[None]],
        work: Callable[[], Awaitable[None]],
        close: Callable[[], Awaitable[None]],
    ) -> None:
        started = time.monotonic()
        try:
            await connect()
            if self._stop.is_set():
                return
            started = time.monotonic()
            await work()
        except Exception as exc:
            if not is_outage(exc):
                raise
            if self._on_outage is not None:
                self._on_outage()
            if time.monotonic() - started < LONG_SESSION:
                raise  # short-lived: back off like a failed connect
            self._log.warning(
                f"{self._component}.outage",
                dependency=peer_of(exc),
                url=self._urls.get(peer_of(exc)),
                error=describe(exc),
            )
        finally:
            await close()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _explain(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return
        peer = peer_of(exc)
        cause = exc.error if isinstance(exc, Unreachable) else exc
        self._log.warning(
            f"{self._component}.waiting_for_{peer}",
            dependency=peer,
            url=self._urls.get(peer),
            error=describe(cause),
            attempt=state.attempt_number,
            retry_in_seconds=round(state.upcoming_sleep, 2),
        )


def _chain(exc: BaseException) -> list[BaseException]:
    """*exc*, the driver errors it wraps and its causes and contexts, each once."""
    found: list[BaseException] = []
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        found.append(current)
        if isinstance(current, DBAPIError) and isinstance(current.orig, BaseException):
            todo.append(current.orig)
        if current.__cause__ is not None:
            todo.append(current.__cause__)
        if current.__context__ is not None and not current.__suppress_context__:
            todo.append(current.__context__)
    return found


def _is_broker_error(exc: BaseException) -> bool:
    # Looked up, not imported: only rabbit imports the AMQP client (``import postroom``
    # loads none), and an aiormq exception cannot exist unless aiormq was imported.
    aiormq = sys.modules.get("aiormq")
    if aiormq is None:
        return False
    errors = aiormq.exceptions
    return isinstance(exc, errors.AMQPError | errors.ChannelInvalidStateError) or (
        _reasonless_close(exc)
    )


def _reasonless_close(exc: BaseException) -> bool:
    """aiormq closed its connection without a reason and failed a pending request.

    Its reader ends without an error when the stream ends between two frames (a TLS
    connection cut inside a record: the partial record is dropped, the rest is a clean
    end of stream); every request in flight then fails with a bare ``Exception`` raised
    by aiormq itself. Recognised by exactly that: the type, no arguments, and the
    innermost frame in aiormq, so a handler's own ``Exception`` never matches.
    """
    if type(exc) is not Exception or exc.args:
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("aiormq.")
