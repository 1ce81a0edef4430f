"""Lanes: a worker's handler slots, each keeping one database connection for its messages.

Why: per message, a pool checkout, reset and return, SQLAlchemy's transaction bookkeeping
and a round trip for ``BEGIN`` cost a worker more than its statements did
(docs/performance.md, "Consumer"). A lane keeps its connection from one message to the
next, and postroom drives the message's transaction on the asyncpg connection beneath
it: ``BEGIN``, the inbox claim, the handler, ``COMMIT``. The SQLAlchemy connection the
handler gets (``ctx.connection``, and ``ctx.session`` bound to it) runs in AUTOCOMMIT,
so SQLAlchemy itself never sends ``BEGIN`` or ``COMMIT`` (its asyncpg adapter starts no
transaction in autocommit): everything the handler writes lands in postroom's
transaction, which commits or rolls back whole.

Chaining: when a delivery already waits for a lane, the transaction ends with
``COMMIT AND CHAIN``, one constant statement that commits and begins the next
transaction in the same round trip, and the lane goes straight to that delivery; a busy
worker thus makes three round trips per message (claim, handler, commit) like a bare
driver loop. A begun transaction that has run no statement holds no snapshot and no
transaction id in READ COMMITTED, so a chained lane blocks no vacuum; still, a lane is
never left idle in a transaction: given back with nobody waiting, it is rolled back
first (DBAs set ``idle_in_transaction_session_timeout``).

Contract: a lane is used by one task at a time (:meth:`Lanes.slot`). A connection that
lost its server, was cancelled mid-statement or could not be rolled back is discarded,
never reused; the lane opens a fresh one at its next use. Per-message state lives in
the message's objects (context, session, SQLAlchemy transaction), never on the lane.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import Transaction
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from postroom.errors import PostroomError
from postroom.outage import is_outage
from postroom.outbox import DRIVEN_TRANSACTION

_BEGIN = "BEGIN"
_COMMIT = "COMMIT"
_COMMIT_AND_CHAIN = "COMMIT AND CHAIN"
_ROLLBACK = "ROLLBACK"


class TransactionAbortedError(PostroomError):
    """COMMIT found the transaction aborted: a statement failed and its error was swallowed.

    PostgreSQL answers such a COMMIT with ROLLBACK and no error; nothing of the message's
    transaction (the inbox row included) was committed, so it must not be acked as done.
    """

    def __init__(self) -> None:
        super().__init__(
            "the transaction was rolled back at COMMIT: a statement in it failed and the "
            "handler caught the database error; let database errors propagate"
        )


class Lane:
    """One handler slot's database connection, opened at first use and kept."""

    __slots__ = ("_driver", "_engine", "_lanes", "connection")

    def __init__(self, engine: AsyncEngine, lanes: Lanes | None = None) -> None:
        self._engine = engine
        self._lanes = lanes
        self._driver: Any = None
        self.connection: AsyncConnection | None = None
        """The SQLAlchemy connection (AUTOCOMMIT) the handler writes through."""

    @property
    def driver(self) -> Any:
        """The asyncpg connection under :attr:`connection`; open the lane first."""
        return self._driver

    @property
    def begun(self) -> bool:
        """True while the connection is inside a transaction (asyncpg's protocol state)."""
        return self._driver is not None and bool(self._driver.is_in_transaction())

    async def open(self) -> AsyncConnection:
        """Return the lane's connection, opening it (a pool checkout) if it has none."""
        if self.connection is not None:
            return self.connection
        connection = await self._engine.connect()
        try:
            await connection.execution_options(
                isolation_level="AUTOCOMMIT", **{DRIVEN_TRANSACTION: True}
            )
            raw = await connection.get_raw_connection()
        except BaseException:
            await connection.close()
            raise
        self._driver = raw.driver_connection
        self.connection = connection
        return connection

    def bookkeeping(self) -> Transaction:
        """Begin SQLAlchemy's transaction for one message on :attr:`connection`.

        Bookkeeping only: in AUTOCOMMIT neither its begin nor its end sends anything
        (the asyncpg adapter holds no transaction of its own), so it is called on the
        sync connection, without a greenlet hop; the caller closes it when the message
        is done, so nothing of it outlives the message. Without it, a handler's first
        statement would autobegin one that stayed open into the next message.
        """
        sync = self.connection.sync_connection if self.connection is not None else None
        if sync is None:
            raise PostroomError("bookkeeping() on a lane that is not open")  # a bug
        return sync.begin()

    async def begin(self) -> None:
        """Begin the message's transaction, unless the last COMMIT already chained one."""
        if not self._driver.is_in_transaction():
            await self._driver.execute(_BEGIN)

    async def commit(self) -> None:
        """Commit; chain the next transaction if a delivery waits for a lane.

        A failed COMMIT (a deferred constraint, a serialization failure) raises and
        leaves no transaction open: PostgreSQL aborted it, chain or not. Raises
        :class:`TransactionAbortedError` when the transaction had already failed.
        """
        lanes = self._lanes
        if lanes is not None and lanes.waiting:
            lanes.chained += 1
            status = await self._driver.execute(_COMMIT_AND_CHAIN)
        else:
            status = await self._driver.execute(_COMMIT)
        if status != _COMMIT:  # "ROLLBACK": an aborted transaction (chained or not)
            raise TransactionAbortedError

    async def rollback(self) -> None:
        """Roll back the open transaction, if any."""
        if self._driver is not None and self._driver.is_in_transaction():
            await self._driver.execute(_ROLLBACK)

    async def abandon(self, exc: BaseException) -> None:
        """Undo the transaction after *exc*; discard the connection if it cannot be trusted.

        Kept: after an ordinary error (the handler's, a constraint), once rolled back.
        Discarded: after an outage (the server is gone or the link cut), a cancellation
        (a statement may still be running on the wire) or a failed rollback.
        """
        if isinstance(exc, Exception) and not is_outage(exc):
            await self.end()
        else:
            await self.discard()

    async def end(self) -> None:
        """Roll back the open transaction, if any; discard the connection if that fails."""
        try:
            await self.rollback()
        except Exception:
            await self.discard()

    async def discard(self) -> None:
        """Drop the connection for good (the pool replaces it); the next use opens another."""
        connection, self.connection, self._driver = self.connection, None, None
        if connection is None:
            return
        with contextlib.suppress(Exception):
            await connection.invalidate()
        with contextlib.suppress(Exception):
            await connection.close()

    async def close(self) -> None:
        """Give the connection back to the pool, rolled back (or discarded if that fails)."""
        await self.end()
        connection, self.connection, self._driver = self.connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()


class Lanes:
    """A worker's handler slots: at most *size* messages are handled at a time.

    :meth:`slot` waits for a free lane (first come, first served) and hands out the most
    recently used one first, so a lightly loaded worker keeps few connections open. A
    lane given back goes straight to the longest waiting delivery, with the transaction
    its COMMIT AND CHAIN began; with nobody waiting it is rolled back and parked.
    """

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        self._free = [Lane(engine, self) for _ in range(size)]
        self._all = tuple(self._free)
        self._waiters: collections.deque[tuple[asyncio.Future[Lane], bool]] = collections.deque()
        self.chained = 0
        """How many commits chained the next transaction (for tests and benchmarks)."""

    @property
    def waiting(self) -> bool:
        """True if the next lane given back goes to a delivery that wants a transaction.

        Then a commit chains the next transaction. A slot taken for other work (a batch,
        which opens its own transaction; a broker dead letter) does not count.
        """
        for waiter, transaction in self._waiters:
            if not waiter.done():
                return transaction
        return False

    @contextlib.asynccontextmanager
    async def slot(self, *, transaction: bool = True) -> AsyncIterator[Lane]:
        """Hold a lane for the block; give it back (to a waiter first) afterwards.

        *transaction*: the block runs :func:`~postroom.dispatch.dispatch` on the lane (so
        it may be handed a transaction a commit chained); False for a slot whose work
        runs elsewhere, so no chained transaction sits idle while it works.
        """
        lane = await self._take(transaction)
        try:
            yield lane
        finally:
            await asyncio.shield(self._give(lane))

    async def close(self) -> None:
        """Roll back and return every lane's connection (the worker's session is over)."""
        for lane in self._all:
            await lane.close()

    async def _take(self, transaction: bool) -> Lane:
        if self._free and not self._waiters:
            return self._free.pop()
        waiter: asyncio.Future[Lane] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, transaction))
        try:
            lane = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a lane as we were cancelled
                await asyncio.shield(self._give(waiter.result()))
            else:
                with contextlib.suppress(ValueError):  # _give may have dropped it already
                    self._waiters.remove((waiter, transaction))
            raise
        if lane.begun and not transaction:  # chained for a waiter before us that went away
            await lane.end()
        return lane

    async def _give(self, lane: Lane) -> None:
        if lane.begun and not self.waiting:
            # Nobody to chain into: never leave the connection idle in a transaction.
            await lane.end()
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(lane)
                return
        self._free.append(lane)


@contextlib.asynccontextmanager
async def borrowed(engine: AsyncEngine) -> AsyncIterator[Lane]:
    """A lane of its own for one dispatch outside a worker (tests, the testing helpers)."""
    lane = Lane(engine)
    try:
        yield lane
    finally:
        await lane.close()
