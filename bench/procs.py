"""Spawn ``python -m postroom ...`` subprocesses and know when they are ready."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.env import BenchEnv


@dataclass
class Service:
    """A running postroom process; *lines* keeps its last log lines for error reports."""

    name: str
    proc: asyncio.subprocess.Process
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid


async def _pump(service: Service, marker: str) -> None:
    assert service.proc.stderr is not None
    async for raw in service.proc.stderr:
        line = raw.decode(errors="replace").rstrip()
        service.lines = [*service.lines[-40:], line]
        if marker in line:
            service.ready.set()


@contextlib.asynccontextmanager
async def services(
    env: BenchEnv,
    command: Sequence[str],
    *,
    count: int = 1,
    ready_marker: str,
    extra_env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> AsyncIterator[list[Service]]:
    """Start *count* ``python -m postroom <command>`` processes; wait until each logs
    *ready_marker*; SIGTERM them (SIGKILL after 15 s) when the block ends."""
    started: list[Service] = []
    pumps: list[asyncio.Task[None]] = []
    try:
        for i in range(count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "postroom",
                *command,
                env=env.postroom_env(**(extra_env or {})),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            service = Service(f"{command[0]}-{i}", proc)
            started.append(service)
            pumps.append(asyncio.create_task(_pump(service, ready_marker)))
        for service in started:
            waiter = asyncio.create_task(service.ready.wait())
            exited = asyncio.create_task(service.proc.wait())
            done, _ = await asyncio.wait(
                {waiter, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            exited.cancel()
            if waiter not in done:
                tail = "\n".join(service.lines[-15:])
                raise RuntimeError(f"{service.name} did not become ready:\n{tail}")
        yield started
    finally:
        for service in started:
            if service.proc.returncode is None:
                service.proc.send_signal(signal.SIGTERM)
        for service in started:
            try:
                await asyncio.wait_for(service.proc.wait(), 15)
            except TimeoutError:
                service.proc.kill()
                await service.proc.wait()
        for pump in pumps:
            pump.cancel()


async def start_py_spy(pid: int, out: Path) -> asyncio.subprocess.Process:
    """Sample *pid* at 250 Hz into *out* (collapsed stacks, for ``bench.profile``)."""
    exe = Path(sys.executable).parent / "py-spy"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        str(exe),
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)  # let it attach before the clock starts
    return proc


async def stop_py_spy(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), 20)
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
