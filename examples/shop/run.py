"""``postroom demo``: the shop end to end against local PostgreSQL and RabbitMQ.

It checks that both services answer (short timeouts; a failure names the URL and how to
start the service, and exits non-zero), migrates postroom's schema, resets the shop's
state from earlier runs, starts ``postroom relay`` and ``postroom worker`` as real
subprocesses, places orders under a progress bar, waits (bounded) until every consumer
has handled everything, prints a summary read back from the database and stops the
subprocesses with SIGTERM.

Settings are ``POSTROOM_*`` variables as for any postroom process; unset ones get demo
defaults: the database ``postroom_demo`` on the local server (created if missing) and
exchanges of its own, so the demo never touches what the tests or services use. The
reset is confined to what the demo owns: the ``shop`` schema, the rows of the shop's
consumers and topics in postroom's tables, and the messages in the shop's queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import delete, or_, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from examples.shop import preflight, report
from examples.shop.consumers import PAYMENTS, router
from examples.shop.events import OrderPlaced
from examples.shop.models import SCHEMA, Base
from examples.shop.orders import place_order
from examples.shop.preflight import DemoError
from postroom import logs
from postroom.errors import ConfigError
from postroom.migrate import upgrade
from postroom.outbox import Outbox
from postroom.settings import Settings, redact_url
from postroom.tables import dead_letters, inbox, outbox, schema_map

ROOT = Path(__file__).resolve().parents[2]
ROUTER = "examples.shop.consumers:router"
DEFAULTS = {
    "POSTROOM_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/postroom_demo",
    "POSTROOM_EXCHANGE": "shop.events",
    "POSTROOM_DEAD_LETTER_EXCHANGE": "shop.dead",
    "POSTROOM_LOG_FORMAT": "console",
    "POSTROOM_LOG_LEVEL": "WARNING",  # the relay's and worker's logs: retries and dead letters
}
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
POLL_SECONDS = 0.2


def main(
    *,
    orders: int = 200,
    concurrency: int = 8,
    rate: float = 0.0,
    timeout: float = 120.0,
    json_output: bool = False,
) -> int:
    """Run the demo and return the exit code: 0 when every closing check passed.

    *rate* paces the orders (per second); 0 places them as fast as *concurrency* allows.
    """
    errors = Console(stderr=True, highlight=False)
    environ = demo_environ(os.environ)
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        errors.print(f"postroom demo: {exc}", style="red", markup=False, soft_wrap=True)
        return 2
    logs.configure(settings.log_format, "ERROR", secrets=settings.secrets())
    # aio-pika logs a failed connect at ERROR; the demo explains that failure itself.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    demo = Demo(settings, child_environ(environ), console=Console(quiet=json_output))
    try:
        summary = asyncio.run(
            demo.run(orders=orders, concurrency=concurrency, rate=rate, timeout=timeout)
        )
    except DemoError as exc:
        errors.print(f"postroom demo: {exc}", style="red", markup=False, soft_wrap=True)
        return 1
    except asyncio.CancelledError:
        errors.print("postroom demo: stopped", style="red")
        return 143
    if json_output:
        shown = summary.as_dict() | {
            "dead_letters_command": demo.dead_letters_command(),
            "logs": {name: str(path) for name, path in demo.logs.items()},
        }
        print(json.dumps(shown, indent=2, sort_keys=True))
    else:
        demo.print_summary(summary)
    return 0 if summary.ok else 1


def demo_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """*environ* with the demo's defaults for the settings it leaves unset."""
    merged = dict(environ)
    for key, value in DEFAULTS.items():
        if key not in merged and f"{key}_FILE" not in merged:
            merged[key] = value
    return merged


def child_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of the relay and worker subprocesses."""
    env = {k: v for k, v in environ.items() if k != "POSTROOM_HEALTH_PORT_FILE"}
    env["POSTROOM_HEALTH_PORT"] = "0"  # two processes on one host; the demo needs no probes
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), environ.get("PYTHONPATH")) if p)
    return env


@dataclass
class Child:
    """A ``postroom`` subprocess and the file its output goes to."""

    name: str
    process: asyncio.subprocess.Process
    log: Path

    def check_alive(self) -> None:
        code = self.process.returncode
        if code is not None:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited ({code})"
            raise DemoError(
                f"the {self.name} {how} before the demo was done; "
                f"the end of its log ({self.log}):\n{self.tail()}"
            )

    def tail(self, lines: int = 15) -> str:
        try:
            text_lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text_lines[-lines:])


class Demo:
    """One run: services, processes and the load, in the order :meth:`run` gives them."""

    def __init__(self, settings: Settings, child_env: dict[str, str], *, console: Console):
        self.settings = settings
        self.console = console
        self.logs: dict[str, Path] = {}
        self._child_env = child_env
        self._children: list[Child] = []
        self._names = [consumer.name for consumer in router]
        self._topics = sorted({topic for consumer in router for topic in consumer.topics})

    @property
    def _database(self) -> str:
        return redact_url(self.settings.database_url.get_secret_value())

    @property
    def _broker(self) -> str:
        return redact_url(self.settings.amqp_url.get_secret_value())

    def _step(self, message: str) -> None:
        self.console.print(f"[green]✓[/] {message}", highlight=False)

    async def run(
        self, *, orders: int, concurrency: int, rate: float, timeout: float
    ) -> report.Summary:
        """Run the whole demo and return its summary; raise DemoError for what to fix."""
        task = asyncio.current_task()
        assert task is not None
        # SIGTERM (docker stop, a test giving up) cancels the run, so the finally below
        # still stops the relay and the worker.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await preflight.check(self.settings)
        self._step(f"PostgreSQL at {escape(self._database)}, RabbitMQ at {escape(self._broker)}")
        await asyncio.to_thread(upgrade, self.settings)
        self._step(f"postroom's tables migrated in schema {self.settings.schema_name!r}")
        engine = self.settings.database.engine(pool_size=concurrency + 2)
        try:
            await self.reset(engine)
            self._step(f"demo state reset (schema {SCHEMA!r}, queues {', '.join(self._names)})")
            await self.start_processes()
            self._step(f"relay and worker running; their logs: {self.logs['worker'].parent}")
            await self.drive(
                engine, orders=orders, concurrency=concurrency, rate=rate, timeout=timeout
            )
            async with report.reading(engine, self.settings.schema_name) as connection:
                return await report.summarize(connection, router, orders=orders, rate=rate)
        finally:
            await self.stop_processes()
            await engine.dispose()

    async def reset(self, engine: AsyncEngine) -> None:
        """Remove what earlier runs left: the shop schema, the shop's rows, queued messages."""
        async with engine.begin() as connection:
            await connection.execution_options(
                schema_translate_map=schema_map(self.settings.schema_name)
            )
            await connection.execute(text(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE'))
            await connection.execute(text(f'CREATE SCHEMA "{SCHEMA}"'))
            await connection.run_sync(Base.metadata.create_all)
            await connection.execute(
                delete(outbox).where(
                    or_(outbox.c.topic.in_(self._topics), outbox.c.routing_key.in_(self._names))
                )
            )
            await connection.execute(delete(inbox).where(inbox.c.consumer.in_(self._names)))
            await connection.execute(
                delete(dead_letters).where(dead_letters.c.consumer.in_(self._names))
            )
        # Purged, not deleted: a worker of another stack (docker compose) may be consuming.
        async with self._broker_connection() as connection:
            for name in [*self._names, *(f"{name}.dead" for name in self._names)]:
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except ChannelNotFoundEntity:
                    continue  # never declared yet; the failed declare closed the channel
                await queue.purge()
                await channel.close()

    async def start_processes(self) -> None:
        """Start the worker and the relay; return once the worker consumes every queue."""
        folder = Path(tempfile.mkdtemp(prefix="postroom-demo-"))
        for name, args in (("worker", ("worker", ROUTER)), ("relay", ("relay",))):
            log = folder / f"{name}.log"
            with log.open("wb") as output:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "postroom",
                    *args,
                    cwd=ROOT,
                    env=self._child_env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches the demo, which stops them once
                )
            self._children.append(Child(name, process, log))
            self.logs[name] = log
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        async with self._broker_connection() as connection:
            while not all([await _consumer_count(connection, name) for name in self._names]):
                self._check_children()
                if loop.time() > deadline:
                    raise DemoError(
                        f"the worker did not consume its queues within {READY_TIMEOUT:.0f} s; "
                        f"the end of its log:\n{self._children[0].tail()}"
                    )
                await asyncio.sleep(POLL_SECONDS)

    def _check_children(self) -> None:
        for child in self._children:
            child.check_alive()

    async def stop_processes(self) -> None:
        """SIGTERM every subprocess, wait for its graceful drain, kill it if it hangs."""
        for child in self._children:
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.terminate()
        for child in self._children:
            try:
                await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                child.process.kill()
                await child.process.wait()
        self._children.clear()

    @contextlib.asynccontextmanager
    async def _broker_connection(self) -> Any:
        url = self.settings.amqp_url.get_secret_value()
        connection = await aio_pika.connect(url, timeout=10)
        try:
            yield connection
        finally:
            await connection.close()

    async def drive(
        self, engine: AsyncEngine, *, orders: int, concurrency: int, rate: float, timeout: float
    ) -> None:
        """Place *orders* orders and wait until every consumer has handled everything.

        *timeout* counts from the last order placed; then DemoError says who is behind.
        """
        columns = (
            TextColumn("{task.description:<20}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[dim]{task.fields[note]}"),
            TimeElapsedColumn(),
        )
        loop = asyncio.get_running_loop()
        with Progress(*columns, console=self.console, disable=self.console.quiet) as progress:
            placing = progress.add_task("orders placed", total=orders, note="")
            bars = {name: progress.add_task(name, total=orders, note="") for name in self._names}
            placer = asyncio.create_task(
                self._place(engine, orders, concurrency, rate, lambda: progress.advance(placing))
            )
            deadline: float | None = None
            try:
                while True:
                    if placer.done():
                        placer.result()  # raises if placing failed
                        deadline = deadline or loop.time() + timeout
                    self._check_children()
                    async with report.reading(engine, self.settings.schema_name) as connection:
                        state = await report.snapshot(connection, router)
                    for consumer in router:
                        goal = orders
                        if OrderPlaced.topic not in consumer.topics:  # fan-out of payments
                            goal = orders - state.dead.get(PAYMENTS, 0)
                        dead = state.dead.get(consumer.name, 0)
                        progress.update(
                            bars[consumer.name],
                            total=goal,
                            completed=state.done(consumer.name),
                            note=f"{dead} dead" if dead else "",
                        )
                    if placer.done() and state.settled(router, orders):
                        return
                    if deadline is not None and loop.time() > deadline:
                        raise DemoError(self._timeout_message(timeout, state))
                    await asyncio.sleep(POLL_SECONDS)
            finally:
                if not placer.done():
                    placer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await placer

    async def _place(
        self,
        engine: AsyncEngine,
        orders: int,
        concurrency: int,
        rate: float,
        placed: Callable[[], None],
    ) -> None:
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        box = Outbox.from_settings(self.settings)
        numbers = iter(range(1, orders + 1))
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def clerk() -> None:
            for number in numbers:  # shared: each order is placed by one clerk
                if rate > 0:
                    await asyncio.sleep(start + (number - 1) / rate - loop.time())
                async with sessions() as session:
                    await place_order(session, box, **customer(number))
                placed()

        await asyncio.gather(*(clerk() for _ in range(concurrency)))

    def _timeout_message(self, timeout: float, state: report.Snapshot) -> str:
        behind = ", ".join(
            f"{name} has done {done} of {expected}"
            for name, (done, expected) in state.behind(router).items()
        )
        logs = ", ".join(str(path) for path in self.logs.values())
        return (
            f"gave up {timeout:g} s after the last order: {behind or 'every consumer is done'}; "
            f"{state.pending} shop messages are still in the outbox. Logs: {logs}"
        )

    def dead_letters_command(self) -> str:
        """The command that lists what failed, with the settings it needs."""
        env = [f"POSTROOM_DATABASE_URL={shlex.quote(self._database)}"]
        if self.settings.schema_name != Settings.model_fields["schema_name"].default:
            env.append(f"POSTROOM_SCHEMA={self.settings.schema_name}")
        return " ".join([*env, _postroom_command(), "dead-letters", "list"])

    def print_summary(self, summary: report.Summary) -> None:
        console = self.console
        console.print()
        console.print("[bold]Summary[/]")
        report.render(summary, console)
        console.print()
        console.print("See what failed, and why:", highlight=False)
        console.print(f"  {escape(self.dead_letters_command())}", highlight=False, soft_wrap=True)
        if "***" in self._database:
            console.print("  (put your password back in place of ***)", style="dim")
        logs = ", ".join(str(path) for path in self.logs.values())
        console.print(f"Relay and worker logs: {escape(logs)}", style="dim", highlight=False)


def customer(number: int) -> dict[str, Any]:
    """The customer of the *number*-th order placed: the same in every run."""
    rng = random.Random(number)
    return {
        "customer_email": f"customer{rng.randrange(1, 100):02d}@example.com",
        "total_cents": rng.randrange(500, 25_000),
    }


async def _consumer_count(connection: AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except ChannelNotFoundEntity:
        return 0
    result = declared.declaration_result.consumer_count
    await channel.close()
    return result or 0


def _postroom_command() -> str:
    """``postroom`` if it is on PATH, else the path of the one next to this Python."""
    local = Path(sys.executable).with_name("postroom")
    found = shutil.which("postroom")
    if not local.exists() or (found and Path(found) == local):
        return "postroom"
    with contextlib.suppress(ValueError):
        return str(local.relative_to(Path.cwd()))
    return str(local)
