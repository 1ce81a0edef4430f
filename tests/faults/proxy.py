"""An in-process, fault-injecting asyncio TCP proxy (a small toxiproxy) for tests.

Put it between a client and PostgreSQL or RabbitMQ, point the client at ``proxy.host`` and
``proxy.port`` and inject faults while the test runs::

    async with FaultProxy("127.0.0.1", 5672) as proxy:
        conn = await aio_pika.connect(proxy.url("amqp", "guest:guest", "/"))
        proxy.blackhole(True)      # partition: bytes held in both directions
        proxy.heal()               # held bytes flow again, like TCP retransmission
        await proxy.reset_all()    # RST every live connection

Fault semantics are chosen to look like the network, not like a protocol bug: a blackhole
*holds* bytes (and does not open new upstream connections) instead of dropping them, because a
partition that heals delivers TCP's retransmissions late rather than corrupting the stream;
bytes are never altered or reordered. Toxics apply to live connections immediately and to new
ones. Every connection is owned by a task the proxy tracks, so closing the proxy (or leaving
the ``async with``) tears down every connection and leaves no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal, Self

__all__ = ["FaultProxy", "ProxyStats"]

_CHUNK: Final = 64 * 1024
"""Largest chunk read at once; also the per-stream reader limit and write high-water mark."""
_QUEUE_CHUNKS: Final = 4
"""Chunks in flight per direction between its reader and writer (bounds memory per link)."""
_UPSTREAM_CONNECT_TIMEOUT: Final = 5.0

Direction = Literal["up", "down"]
_ChunkQueue = asyncio.Queue[tuple[float, bytes | None]]
"""(arrival time, chunk): b"" is EOF, None is a reset/error on the reading side."""


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """A snapshot of the proxy's counters, for assertions."""

    accepted: int
    """Client connections accepted while not refusing (whether or not upstream answered)."""
    active: int
    """Client connections currently open through the proxy."""
    refused: int
    """Client connections closed at once because ``refuse(True)`` was set."""
    upstream_failed: int
    """Accepted connections closed because the upstream connect failed or timed out."""
    reset: int
    """Connections killed with RST by ``reset_all()``."""
    cut: int
    """Connections closed by the ``cut_after()`` budget."""
    bytes_up: int
    """Bytes forwarded client → upstream."""
    bytes_down: int
    """Bytes forwarded upstream → client."""


class _Abort(Exception):
    """A side reset or failed: propagate it as an RST to the other side."""


class _Cut(Exception):
    """The ``cut_after`` budget is spent: close both sides."""


_EOF: Final = b""


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _hard_close(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0) so the peer sees "connection reset", not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: two directions, each a reader task and a writer task."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._proxy = proxy
        self._client = client
        self._upstream = upstream
        self.forwarded = 0
        self._closed = False
        self.budget: int | None = None
        """Close once ``forwarded`` reaches this absolute count (None: no limit)."""

    async def run(self) -> None:
        """Forward until both directions end or a fault stops the link; then close both sides."""
        up_q: _ChunkQueue = asyncio.Queue(_QUEUE_CHUNKS)
        down_q: _ChunkQueue = asyncio.Queue(_QUEUE_CHUNKS)
        outcome: Literal["clean", "abort", "cut"] = "clean"
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read(self._client[0], up_q))
                tg.create_task(self._write(up_q, self._upstream[1], "up"))
                tg.create_task(self._read(self._upstream[0], down_q))
                tg.create_task(self._write(down_q, self._client[1], "down"))
        except* _Cut:
            outcome = "cut"
        except* _Abort:
            outcome = "abort"
        if outcome == "cut":
            self._proxy._cuts += 1
        self.close(rst=outcome == "abort" or (outcome == "cut" and self._proxy._cut_rst))

    def close(self, *, rst: bool) -> None:
        """Close both sides, with RST if ``rst`` else with FIN (flushing). First call wins."""
        if self._closed:
            return
        self._closed = True
        for _, writer in (self._client, self._upstream):
            if rst:
                _hard_close(writer)
            else:
                writer.close()

    async def _read(self, src: asyncio.StreamReader, queue: _ChunkQueue) -> None:
        """Read chunks, stamped with their arrival time, until EOF or a reset."""
        loop = asyncio.get_running_loop()
        flowing = self._proxy._flowing
        while True:
            await flowing.wait()  # a blackhole stops reading: the sender's window fills
            try:
                data: bytes | None = await src.read(_CHUNK)
            except OSError:
                data = None
            await queue.put((loop.time(), data))
            if not data:
                return

    async def _write(
        self, queue: _ChunkQueue, dst: asyncio.StreamWriter, direction: Direction
    ) -> None:
        """Deliver chunks in order, applying latency, blackhole and the cut budget."""
        loop = asyncio.get_running_loop()
        proxy = self._proxy
        while True:
            arrived, data = await queue.get()
            delay = arrived + proxy._latency - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await proxy._flowing.wait()
            if data is None:
                raise _Abort
            if data == _EOF:
                with contextlib.suppress(OSError):
                    if dst.can_write_eof():
                        dst.write_eof()  # half-close, as the peer did
                return
            cut = False
            if self.budget is not None:
                remaining = max(self.budget - self.forwarded, 0)
                if len(data) >= remaining:
                    data, cut = data[:remaining], True
            try:
                if data:
                    dst.write(data)
                    await dst.drain()
            except OSError as exc:
                raise _Abort from exc
            self.forwarded += len(data)
            if direction == "up":
                proxy._bytes_up += len(data)
            else:
                proxy._bytes_down += len(data)
            if cut:
                raise _Cut


class FaultProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` whose faults tests switch at will.

    Use as an async context manager (or ``await start()`` / ``await close()``). The fault
    controls are plain synchronous setters, effective at once for live and new connections,
    except ``reset_all()`` which is async so the caller knows the connections are gone.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self._listen_host = listen_host
        self._listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._changed = asyncio.Event()
        """Set (then replaced) whenever the set of live connections changes."""
        self._latency = 0.0
        self._cut_after: int | None = None
        self._cut_rst = False
        self._refusing = False
        self._closing = False
        self._accepted = 0
        self._refused = 0
        self._upstream_failed = 0
        self._resets = 0
        self._cuts = 0
        self._bytes_up = 0
        self._bytes_down = 0

    # lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Self:
        """Start listening; ``port`` is known afterwards (an ephemeral one by default)."""
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._closing = False
        self._server = await asyncio.start_server(
            self._on_client, self._listen_host, self._listen_port, limit=_CHUNK
        )
        return self

    async def close(self) -> None:
        """Stop listening, close every connection with RST and wait for all its tasks."""
        self._closing = True
        self._flowing.set()
        if self._server is not None:
            self._server.close()
        await self._cancel_all()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # addressing --------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The host clients should connect to."""
        return str(self._sockname()[0])

    @property
    def port(self) -> int:
        """The port clients should connect to."""
        return int(self._sockname()[1])

    def url(self, scheme: str, userinfo: str = "", path: str = "") -> str:
        """``scheme://[userinfo@]host:port[path]``, e.g. ``url("amqp", "guest:guest", "/")``."""
        at = f"{userinfo}@" if userinfo else ""
        return f"{scheme}://{at}{self.host}:{self.port}{path}"

    def _sockname(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("FaultProxy is not started")
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    # faults ------------------------------------------------------------------------------

    async def reset_all(self) -> int:
        """Kill every live connection with RST on both sides; return how many were killed.

        Connections still waiting for their upstream (e.g. during a blackhole) are killed too.
        The proxy keeps listening: clients may reconnect at once.
        """
        killed = await self._cancel_all()
        self._resets += killed
        return killed

    def blackhole(self, on: bool = True) -> None:
        """Partition: keep connections open but forward nothing, in both directions.

        Bytes are held (reads stop, so senders' TCP windows fill) and flow again, in order,
        after ``blackhole(False)``/``heal()``. New connections are accepted but not connected
        upstream until healed, so a client's handshake hangs as it would behind a partition.
        """
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def latency(self, seconds: float) -> None:
        """Deliver each chunk ``seconds`` after it arrived (0 disables), per direction.

        A request/response round trip therefore takes at least ``2 * seconds``. Chunks are
        pipelined within a window of a few chunks per direction (like a TCP window), so
        bulk throughput is bounded by about 256 KiB per ``seconds``, not by one chunk.
        """
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        self._latency = float(seconds)

    def cut_after(self, nbytes: int | None, *, rst: bool = False) -> None:
        """Close (FIN, or RST if *rst*) each connection once it forwarded ``nbytes`` more bytes.

        Counts both directions together, from now for live connections and from their start
        for new ones. The chunk that reaches the budget is truncated to it, so on a TLS
        connection the cut usually falls inside a record: the peer holds part of one and
        then sees the end of the stream (FIN) or a reset (RST). ``0`` closes each
        connection as soon as it has anything to forward. ``None`` disables.
        """
        if nbytes is not None and nbytes < 0:
            raise ValueError("cut_after needs nbytes >= 0 or None")
        self._cut_after = nbytes
        self._cut_rst = rst
        for link in self._links:
            link.budget = None if nbytes is None else link.forwarded + nbytes

    def refuse(self, on: bool = True) -> None:
        """Close new connections at once with RST (the listener stays bound to its port).

        Clients see their connect attempt reset before any byte is exchanged, which they
        report as a connection error, as with a down server. Live connections are untouched.
        """
        self._refusing = on

    def heal(self) -> None:
        """Clear every toxic: no blackhole, no latency, no cut budget, no refusal."""
        self.blackhole(False)
        self.latency(0.0)
        self.cut_after(None)
        self.refuse(False)

    # observation -------------------------------------------------------------------------

    @property
    def stats(self) -> ProxyStats:
        """Counters since start (never reset by ``heal()``)."""
        return ProxyStats(
            accepted=self._accepted,
            active=len(self._tasks),
            refused=self._refused,
            upstream_failed=self._upstream_failed,
            reset=self._resets,
            cut=self._cuts,
            bytes_up=self._bytes_up,
            bytes_down=self._bytes_down,
        )

    async def wait_active(self, count: int) -> None:
        """Wait until exactly ``count`` connections are open (e.g. a client reconnected).

        Bound it with ``asyncio.timeout(...)``.
        """
        while len(self._tasks) != count:
            changed = self._changed
            await changed.wait()

    # internals ---------------------------------------------------------------------------

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, not a coroutine: asyncio would own (and log about) that task,
        # while we need to own, cancel and await every connection's task ourselves.
        if self._refusing or self._closing:
            self._refused += 1
            _hard_close(writer)
            return
        self._accepted += 1
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        self._notify()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _set_nodelay(writer)
        writer.transport.set_write_buffer_limits(high=_CHUNK)
        link: _Link | None = None
        try:
            await self._flowing.wait()
            try:
                async with asyncio.timeout(_UPSTREAM_CONNECT_TIMEOUT):
                    upstream = await asyncio.open_connection(
                        self.upstream_host, self.upstream_port, limit=_CHUNK
                    )
            except (OSError, TimeoutError):
                self._upstream_failed += 1
                _hard_close(writer)
                return
            _set_nodelay(upstream[1])
            upstream[1].transport.set_write_buffer_limits(high=_CHUNK)
            link = _Link(self, (reader, writer), upstream)
            if self._cut_after is not None:
                link.budget = self._cut_after
            self._links.add(link)
            await link.run()
        finally:
            # Reached on cancellation (reset_all/close) too: nothing is left half-open.
            if link is not None:
                self._links.discard(link)
                link.close(rst=True)
            else:
                _hard_close(writer)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _cancel_all(self) -> int:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)
