"""Compose a long-running postroom process: its main loop, health server and side tasks.

``postroom relay`` is :func:`run_relay`; a worker process is built the same way from
:func:`serving` (``/livez``, ``/readyz``, ``/metrics``, unready once *stop* is set),
:func:`running` (a side task that cannot outlive the block) and :func:`within_grace`
(the drain deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import structlog

from postroom import backlog, queues, summary
from postroom.errors import ConfigError
from postroom.health import HealthServer, ReadyCheck
from postroom.metrics import Metrics
from postroom.relay import Relay
from postroom.router import Router
from postroom.settings import Settings
from postroom.worker import Worker

log = structlog.get_logger("postroom.service")

DRAINING = "draining: the process is shutting down"
DEFAULT_PORTS = {"relay": 9000, "worker": 9001}
"""Health ports when POSTROOM_HEALTH_PORT is unset: one per role, so both fit on a host."""
CANCEL_WAIT = 2.0
"""Seconds to wait for a main task to unwind after its grace period was cancelled."""


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    *,
    ready: ReadyCheck,
    metrics: Metrics,
    stop: asyncio.Event,
    port: int | None = None,
    role: str = "relay",
) -> AsyncIterator[HealthServer | None]:
    """Serve health and metrics for the duration of the block; yield the server.

    *port* None means ``settings.health_port``, where 0 turns the server off (then None is
    yielded) and unset means *role*'s default port (:data:`DEFAULT_PORTS`), so a relay and
    a worker run side by side with default settings; if that default is taken (a second
    worker on the host) a free port is bound and logged. A port set explicitly and taken
    is a :class:`ConfigError`. An explicit *port* is bound as given, 0 picking a free one
    (for tests). Once *stop* is set ``/readyz`` answers 503 "draining" whatever *ready*
    says, so load balancers and KEDA stop counting on the process while it drains;
    ``/livez`` stays 200. The same answer is exported as ``postroom_ready{component=role}``.
    """
    chosen = settings.health_port if port is None else port
    if port is None and chosen == 0:
        yield None
        return

    def readiness() -> str | None:
        return DRAINING if stop.is_set() else ready()

    metrics.readiness(role, readiness)  # postroom_ready{component=role}, for the alert rules

    def server_on(number: int) -> HealthServer:
        return HealthServer(
            host=settings.health_host, port=number, ready=readiness, metrics=metrics
        )

    server = server_on(DEFAULT_PORTS[role] if chosen is None else chosen)
    try:
        await server.start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        if chosen is not None:
            raise ConfigError(
                f"health server: {settings.health_host}:{chosen} is already in use (another "
                "postroom process?); set POSTROOM_HEALTH_PORT to a free port, or 0 for none"
            ) from None
        log.warning("health.default_port_taken", port=DEFAULT_PORTS[role], role=role)
        server = server_on(0)
        await server.start()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def running(side: Coroutine[Any, Any, None], *, name: str) -> AsyncIterator[None]:
    """Run *side* as a task while the block runs; cancel and await it on the way out.

    An exception *side* raised is re-raised on exit, never lost.
    """
    task = asyncio.create_task(side, name=name)
    try:
        yield
    finally:
        if not task.done():
            task.cancel()
        await asyncio.wait({task})
        failure = None if task.cancelled() else task.exception()
        if failure is not None:
            raise failure


async def within_grace(
    main: Coroutine[Any, Any, None], stop: asyncio.Event, *, grace: float, name: str
) -> None:
    """Run *main*, which returns soon after *stop* is set; give it *grace* seconds for that.

    Past the grace period *main* is cancelled (a relay batch then rolls back and its rows
    stay for the next claim) and this returns normally, so the process still exits 0
    before the orchestrator's SIGKILL. An exception from *main* propagates.
    """
    task = asyncio.create_task(main, name=name)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=grace)
        if not task.done():
            log.warning("service.grace_expired", task=name, grace_seconds=grace)
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_WAIT)
            return
        task.result()
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_WAIT)


async def run_relay(
    settings: Settings,
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
    health_port: int | None = None,
) -> None:
    """Be the ``postroom relay`` process until *stop* is set.

    Runs the relay, the outbox backlog gauges and the health server. ``/readyz`` is 200
    while the relay is connected to both the database and the broker. On *stop* the relay
    finishes the batch in hand within ``settings.shutdown_timeout`` (or abandons it to be
    claimed again) and this returns. *health_port* overrides the setting, see
    :func:`serving`.
    """
    metrics = metrics if metrics is not None else Metrics()
    relay = Relay(settings, metrics=metrics)

    def ready() -> str | None:
        return None if relay.ready else "relay is not connected to both the database and broker"

    log.info("relay.starting", **_identity(settings))
    log.debug("relay.settings", settings=settings.describe())
    async with (
        serving(settings, ready=ready, metrics=metrics, stop=stop, port=health_port),
        running(backlog.watch(settings, metrics, stop), name="postroom-backlog"),
        running(
            summary.watch(metrics, stop, interval=settings.log_interval, relay=True),
            name="postroom-summary",
        ),
    ):
        await within_grace(
            relay.run(stop), stop, grace=settings.shutdown_timeout, name="postroom-relay"
        )
    log.info("relay.stopped", published=relay.stats.published, failed=relay.stats.failed)


async def run_worker(
    settings: Settings,
    router: Router,
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
    health_port: int | None = None,
) -> None:
    """Be the ``postroom worker`` process until *stop* is set.

    Runs the worker, the outbox backlog and queue gauges and the health server.
    ``/readyz`` is 200 while the worker consumes with both dependencies reachable and 503
    once draining; the worker itself gives in-flight handlers ``settings.shutdown_timeout``
    and requeues the rest.
    """
    metrics = metrics if metrics is not None else Metrics()
    worker = Worker(settings, router, metrics=metrics)

    def ready() -> str | None:
        return None if worker.ready else "worker is not consuming"

    names = tuple(c.name for c in router)
    log.info("worker.starting", consumers=list(names), **_identity(settings))
    log.debug("worker.settings", settings=settings.describe())
    # The outbox gauges too: lag must stay visible when no relay runs (backlog.py).
    async with (
        serving(settings, ready=ready, metrics=metrics, stop=stop, port=health_port, role="worker"),
        running(
            summary.watch(metrics, stop, interval=settings.log_interval, consumers=names),
            name="postroom-summary",
        ),
        running(
            backlog.watch(settings, metrics, stop, hold_connection=False), name="postroom-backlog"
        ),
        running(
            queues.watch(settings, [c.name for c in router], metrics, stop), name="postroom-queues"
        ),
    ):
        await worker.run(stop)
    log.info("worker.stopped", outcomes=worker.stats.outcomes, requeued=worker.stats.requeued)


async def run_dev(
    settings: Settings,
    router: Router,
    stop: asyncio.Event,
    *,
    metrics: Metrics | None = None,
    health_port: int | None = None,
) -> None:
    """Be the ``postroom dev`` process: a relay and a worker side by side until *stop*.

    One process, one health server and one summary line for both: what a developer runs
    beside their code. Each part keeps its own contract (the relay's batch finishes or
    is abandoned within ``shutdown_timeout``, the worker drains); if one fails, the other
    is stopped and the failure propagates.
    """
    metrics = metrics if metrics is not None else Metrics()
    relay = Relay(settings, metrics=metrics)
    worker = Worker(settings, router, metrics=metrics)

    def ready() -> str | None:
        if not relay.ready:
            return "relay is not connected to both the database and broker"
        return None if worker.ready else "worker is not consuming"

    names = tuple(c.name for c in router)
    log.info("dev.starting", consumers=list(names), **_identity(settings))
    log.debug("dev.settings", settings=settings.describe())
    inner = asyncio.Event()

    async def until_stopped() -> None:
        await stop.wait()
        inner.set()

    async with (
        serving(settings, ready=ready, metrics=metrics, stop=stop, port=health_port),
        running(until_stopped(), name="postroom-dev-stop"),
        running(backlog.watch(settings, metrics, inner), name="postroom-backlog"),
        running(
            summary.watch(
                metrics, inner, interval=settings.log_interval, consumers=names, relay=True
            ),
            name="postroom-summary",
        ),
    ):
        parts = [
            asyncio.create_task(
                within_grace(relay.run(inner), inner, grace=settings.shutdown_timeout, name="relay")
            ),
            asyncio.create_task(worker.run(inner)),
        ]
        try:
            await asyncio.wait(parts, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            inner.set()  # one part failed or both stopped: stop the other
            await asyncio.wait(parts)
        for part in parts:
            part.result()
    log.info("dev.stopped", published=relay.stats.published, outcomes=worker.stats.outcomes)


def _identity(settings: Settings) -> dict[str, str]:
    """Where a process works, for its first log line; the full settings go to DEBUG."""
    return {"schema": settings.schema_name, "exchange": settings.exchange}
