"""The faults a scenario can inject, each an ``async def fault(chaos)`` that notes what it did.

Process faults SIGKILL a supervised relay or worker (the supervisor restarts it), or start
an extra process armed with a named crash point that SIGKILLs itself there. Broker and
database faults act on the test's vhost and database only. Proxy faults need a
``FaultProxy`` in ``chaos.extra["pg_proxy"]`` / ``["amqp_proxy"]``; server faults need a
private server in ``chaos.extra["rabbit"]`` / ``["postgres"]``.
"""

from __future__ import annotations

import asyncio
import signal

from tests.faults import servers
from tests.faults.proxy import FaultProxy
from tests.faults.workload import Chaos, Fault


async def kill_relay(chaos: Chaos) -> None:
    await _kill(chaos, "relay")


async def kill_worker(chaos: Chaos) -> None:
    await _kill(chaos, "worker")


async def _kill(chaos: Chaos, kind: str) -> None:
    live = chaos.fleet.live(kind)
    if not live:
        return
    proc = chaos.rng.choice(live)
    chaos.fleet.kill(proc)
    chaos.note(f"sigkill_{kind}", proc.name)


def crash_at(point: str, *, timeout: float = 30.0) -> Fault:
    """Start an extra process armed with *point*; count it when it SIGKILLs itself there."""
    kind = "relay" if point.startswith("relay.") else "worker"

    async def fault(chaos: Chaos) -> None:
        proc = chaos.fleet.spawn(kind, armed=point)
        if kind == "relay" and await chaos.fleet.wait_log(proc, b"relay.connected", timeout):
            # The running relays would win every claim race; make the armed one the only
            # relay until the supervisor's replacements are up.
            for other in chaos.fleet.live("relay"):
                chaos.fleet.kill(other)
                chaos.note("sigkill_relay", other.name)
        if await chaos.fleet.wait_dead(proc, timeout):
            if proc.popen.returncode == -signal.SIGKILL:
                chaos.note(f"crash_at:{point}", proc.name)
            return
        chaos.fleet.retire(proc)  # never reached the point (no work came its way)
        await chaos.fleet.wait_dead(proc, 15)

    fault.__name__ = f"crash_at_{point}"
    return fault


def crash_at_all(points: list[str], *, timeout: float = 30.0) -> Fault:
    """Start one armed extra process per point at once; note each that died at its point."""
    faults = [crash_at(point, timeout=timeout) for point in points]

    async def fault(chaos: Chaos) -> None:
        await asyncio.gather(*(f(chaos) for f in faults))

    fault.__name__ = "crash_at_all"
    return fault


async def close_connections(chaos: Chaos) -> None:
    rabbit = chaos.extra.get("rabbit")
    await servers.close_broker_connections(chaos.amqp_url, node=rabbit.node if rabbit else None)
    chaos.note("broker_close_connections")


async def terminate_backends(chaos: Chaos) -> None:
    killed = await servers.terminate_backends(chaos.admin_dsn)
    chaos.note("pg_terminate_backend", f"{killed} backends")


def _proxy(chaos: Chaos, which: str) -> FaultProxy:
    proxy: FaultProxy = chaos.extra[f"{which}_proxy"]
    return proxy


def proxy_reset(which: str) -> Fault:
    async def fault(chaos: Chaos) -> None:
        killed = await _proxy(chaos, which).reset_all()
        chaos.note(f"{which}_proxy_reset", f"{killed} connections")

    fault.__name__ = f"{which}_proxy_reset"
    return fault


def proxy_blackhole(which: str, seconds: tuple[float, float] = (1.0, 4.0)) -> Fault:
    async def fault(chaos: Chaos) -> None:
        proxy = _proxy(chaos, which)
        hold = chaos.rng.uniform(*seconds)
        proxy.blackhole(True)
        chaos.note(f"{which}_proxy_blackhole", f"{hold:.1f}s")
        try:
            await asyncio.sleep(hold)
        finally:
            proxy.blackhole(False)

    fault.__name__ = f"{which}_proxy_blackhole"
    return fault


def proxy_latency(which: str, seconds: tuple[float, float] = (2.0, 5.0)) -> Fault:
    async def fault(chaos: Chaos) -> None:
        proxy = _proxy(chaos, which)
        delay = chaos.rng.uniform(0.02, 0.2)
        hold = chaos.rng.uniform(*seconds)
        proxy.latency(delay)
        chaos.note(f"{which}_proxy_latency", f"{delay * 1000:.0f}ms for {hold:.1f}s")
        try:
            await asyncio.sleep(hold)
        finally:
            proxy.latency(0.0)

    fault.__name__ = f"{which}_proxy_latency"
    return fault


def proxy_cut(which: str, seconds: tuple[float, float] = (1.0, 3.0)) -> Fault:
    async def fault(chaos: Chaos) -> None:
        proxy = _proxy(chaos, which)
        budget = chaos.rng.randint(50, 20_000)
        hold = chaos.rng.uniform(*seconds)
        proxy.cut_after(budget)
        chaos.note(f"{which}_proxy_cut", f"after {budget} bytes for {hold:.1f}s")
        try:
            await asyncio.sleep(hold)
        finally:
            proxy.cut_after(None)

    fault.__name__ = f"{which}_proxy_cut"
    return fault


def proxy_cut_mid_record(which: str, seconds: tuple[float, float] = (1.0, 3.0)) -> Fault:
    """Forward part of a TLS record, then reset (RST) the connection, for a while.

    Every live connection, and every new one (its handshake included), is reset after a
    random budget of 50 to 20,000 more bytes: past a few bytes that is almost always
    inside a record (the client holds part of one, then "connection reset"). The stage
    must speak TLS through the proxy for this to be the TLS cut it is named for.
    """

    async def fault(chaos: Chaos) -> None:
        proxy = _proxy(chaos, which)
        budget = chaos.rng.randint(50, 20_000)
        hold = chaos.rng.uniform(*seconds)
        proxy.cut_after(budget, rst=True)
        chaos.note(f"{which}_proxy_tls_cut", f"RST after {budget} bytes for {hold:.1f}s")
        try:
            await asyncio.sleep(hold)
        finally:
            proxy.cut_after(None)

    fault.__name__ = f"{which}_proxy_tls_cut"
    return fault


def proxy_refuse(which: str, seconds: tuple[float, float] = (1.0, 3.0)) -> Fault:
    """Like a server that went away: reset live connections and refuse new ones for a while."""

    async def fault(chaos: Chaos) -> None:
        proxy = _proxy(chaos, which)
        hold = chaos.rng.uniform(*seconds)
        proxy.refuse(True)
        await proxy.reset_all()
        chaos.note(f"{which}_proxy_refuse", f"{hold:.1f}s")
        try:
            await asyncio.sleep(hold)
        finally:
            proxy.refuse(False)

    fault.__name__ = f"{which}_proxy_refuse"
    return fault


def proxy_faults(which: str) -> list[Fault]:
    return [
        proxy_reset(which),
        proxy_blackhole(which),
        proxy_latency(which),
        proxy_cut(which),
        proxy_refuse(which),
    ]


async def broker_alarm(chaos: Chaos) -> None:
    """A memory alarm on the private node: publishers block for a few seconds."""
    rabbit: servers.PrivateRabbit = chaos.extra["rabbit"]
    hold = chaos.rng.uniform(2.0, 4.0)
    async with rabbit.memory_alarm():
        chaos.note("broker_memory_alarm", f"{hold:.1f}s")
        await asyncio.sleep(hold)


async def broker_restart(chaos: Chaos) -> None:
    """Stop the private node and start it again (queues and messages are on disk)."""
    rabbit: servers.PrivateRabbit = chaos.extra["rabbit"]
    await rabbit.stop()
    chaos.note("broker_restart")
    await asyncio.sleep(chaos.rng.uniform(0.5, 2.0))
    await rabbit.start()


async def postgres_crash(chaos: Chaos) -> None:
    """`pg_ctl stop -m immediate` on the private cluster, then start it (WAL recovery)."""
    postgres: servers.PrivatePostgres = chaos.extra["postgres"]
    await postgres.crash()
    chaos.note("postgres_crash_restart")
    await asyncio.sleep(chaos.rng.uniform(0.5, 2.0))
    await postgres.start()


def heal(chaos: Chaos) -> None:
    """Clear every proxy toxic (faults clear their own, this is the belt to their braces)."""
    for which in ("pg", "amqp"):
        proxy = chaos.extra.get(f"{which}_proxy")
        if proxy is not None:
            proxy.heal()
