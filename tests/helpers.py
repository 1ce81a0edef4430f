"""Small helpers shared by the tests: run a relay, collect what reaches a queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aio_pika
from aio_pika.abc import AbstractConnection
from sqlalchemy import text

from postroom.relay import Relay
from postroom.settings import Settings
from tests.conftest import postroom_cmd, settings_env


@dataclass(frozen=True)
class Received:
    body: bytes
    message_id: str | None
    type: str | None
    headers: dict[str, Any]
    content_type: str | None
    correlation_id: str | None
    redelivered: bool

    def json(self) -> Any:
        return json.loads(self.body)


async def delete_queues(amqp: str | AbstractConnection, consumers: Iterable[Any]) -> None:
    """Delete each consumer's queue and its dead-letter queue (``<name>.dead``).

    *consumers* are names or registrations (anything with a ``name``, e.g. a Router).
    Apps fix their consumer names, so a test that ran one removes its queues afterwards;
    the vhost is per test session, so parallel sessions (pytest-xdist) never share them.
    *amqp* is an open connection or a URL (then a connection of its own is used).
    """
    names = [c if isinstance(c, str) else c.name for c in consumers]
    connection = await aio_pika.connect(amqp, timeout=10) if isinstance(amqp, str) else amqp
    try:
        channel = await connection.channel()
        for name in names:
            for queue in (name, f"{name}.dead"):
                await channel.queue_delete(queue)
        await channel.close()
    finally:
        if isinstance(amqp, str):
            await connection.close()


async def queue_messages(amqp_url: str) -> dict[str, int]:
    """Messages in each queue of *amqp_url*'s vhost, ready or delivered but not yet acked.

    Asked of the broker (``rabbitmqctl list_queues``), so a test can wait until nothing
    is left anywhere instead of sleeping and hoping nothing more arrives.
    """
    vhost = unquote(amqp_url.rsplit("/", 1)[1]) or "/"
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "list_queues",
        "-p",
        vhost,
        "name",
        "messages",
        "--formatter",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode != 0:
        raise AssertionError(f"rabbitmqctl list_queues failed: {err.decode()[-300:]}")
    return {q["name"]: int(q["messages"]) for q in json.loads(out)}


async def settled(engine: Any, schema: str, amqp_url: str, queues: Iterable[str]) -> bool:
    """Nothing left to happen: the outbox is empty and so are *queues*."""
    async with engine.connect() as conn:
        left = (await conn.execute(text(f'SELECT count(*) FROM "{schema}".outbox'))).scalar_one()
    depths = await queue_messages(amqp_url)
    return left == 0 and not any(depths.get(q, 0) for q in queues)


async def bind_queue(
    amqp: AbstractConnection, exchange: str, topics: Sequence[str], name: str
) -> str:
    """Declare a durable queue bound to *topics* on the topic *exchange*; return its name."""
    channel = await amqp.channel()
    ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    for topic in topics:
        await queue.bind(ex, routing_key=topic)
    await channel.close()
    return name


async def collect(
    amqp_url: str, queue: str, *, count: int, timeout: float = 30.0, settle: float = 0.0
) -> list[Received]:
    """Take messages from *queue* until *count* arrived (and *settle* more seconds passed).

    Uses its own connection, so it works across broker connection resets.
    Fails with a readable message listing how many arrived if *timeout* passes.
    """
    got: list[Received] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    settle_until: float | None = None
    while True:
        try:
            connection = await aio_pika.connect(amqp_url, timeout=5)
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        try:
            channel = await connection.channel()
            q = await channel.get_queue(queue, ensure=False)
            while True:
                message = await q.get(no_ack=True, fail=False)
                if message is None:
                    now = loop.time()
                    if len(got) >= count:
                        settle_until = settle_until or now + settle
                        if now >= settle_until:
                            return got
                    if now > deadline:
                        raise AssertionError(
                            f"{len(got)} of {count} messages arrived in {timeout}s"
                        )
                    await asyncio.sleep(0.05)
                    continue
                got.append(
                    Received(
                        body=message.body,
                        message_id=message.message_id,
                        type=message.type,
                        headers=dict(message.headers or {}),
                        content_type=message.content_type,
                        correlation_id=message.correlation_id,
                        redelivered=bool(message.redelivered),
                    )
                )
        except aio_pika.exceptions.AMQPConnectionError:
            await asyncio.sleep(0.2)
        finally:
            with contextlib.suppress(Exception):
                await connection.close()


@contextlib.asynccontextmanager
async def running_relay(settings: Settings) -> AsyncIterator[Relay]:
    """Run a relay in this process for the duration of the block."""
    relay = Relay(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


def spawn(settings: Settings, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """Start `postroom ARGS` as a real subprocess configured like *settings*.

    Its logs go to a temporary file (never a pipe nobody reads: a full pipe would block
    the process mid-log and look like a hang); `logs_of(process)` returns them.
    """
    log_file = tempfile.NamedTemporaryFile(prefix="postroom-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        postroom_cmd(*args),
        env=settings_env(settings, **env),
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    _LOGS[process.pid] = log_file.name
    log_file.close()
    return process


_LOGS: dict[int, str] = {}


def logs_of(process: subprocess.Popen[bytes], tail: int = 4000) -> str:
    """The last *tail* characters a spawned process logged."""
    path = _LOGS.get(process.pid)
    if path is None:
        return ""
    with open(path, errors="replace") as handle:
        return handle.read()[-tail:]


async def wait_exit(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process.poll() is None:
        if loop.time() > deadline:
            process.kill()
            raise AssertionError(f"process did not exit in time; its log:\n{logs_of(process)}")
        await asyncio.sleep(0.05)
    return process.returncode


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, router: Any) -> AsyncIterator[Any]:
    """Run a worker in this process for the duration of the block; wait until it consumes."""
    from postroom.worker import Worker

    worker = Worker(settings, router)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not worker.ready:
        if task.done():
            task.result()
        if loop.time() > deadline:
            raise AssertionError("worker did not start consuming")
        await asyncio.sleep(0.05)
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=settings.shutdown_timeout + 15)


async def eventually(predicate: Any, *, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Await *predicate()* (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to 0, read it, close)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def http_get(
    port: int, path: str, *, method: str = "GET", timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to 127.0.0.1:*port*; return (status, headers, body).

    Plain asyncio, so it never blocks the test's loop (a FaultProxy may be running in it).
    """
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


@dataclass
class ServedRelay:
    """A `postroom relay` subprocess with its health server on :attr:`port`."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Any

    def log(self) -> str:
        return str(self.log_path.read_text(errors="replace"))

    async def status(self, path: str) -> tuple[int, bytes]:
        status, _, body = await http_get(self.port, path)
        return status, body

    async def wait_status(self, path: str, expected: int, *, timeout: float = 20.0) -> bytes:
        """Poll *path* until it answers *expected*; return that answer's body."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: object = None
        while loop.time() < deadline:
            try:
                status, body = await self.status(path)
            except OSError as exc:
                last = exc
            else:
                if status == expected:
                    return body
                last = (status, body)
            if self.process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"{path} never answered {expected} (last: {last!r})\n{self.log()}")


@contextlib.asynccontextmanager
async def served_relay(settings: Settings, log_path: Any, **env: str) -> AsyncIterator[ServedRelay]:
    """Run `postroom relay` with its health server on a free port; stderr goes to *log_path*.

    Yields once /livez answers. On exit the process is stopped (SIGTERM, then SIGKILL) if
    the test did not stop it itself.
    """
    port = free_port()
    env = {"POSTROOM_HEALTH_HOST": "127.0.0.1", "POSTROOM_HEALTH_PORT": str(port), **env}
    process = _spawn_logged(settings, log_path, "relay", **env)
    served = ServedRelay(process, port, log_path)
    try:
        await served.wait_status("/livez", 200)
        yield served
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                await wait_exit(process, timeout=10)
            finally:
                if process.poll() is None:
                    process.kill()


def _spawn_logged(
    settings: Settings, log_path: Any, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            postroom_cmd(*args),
            env=settings_env(settings, **env),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
