"""Run a long-lived service coroutine until SIGTERM or SIGINT asks it to stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("postroom.process")


def run_service(
    main: Callable[[asyncio.Event], Awaitable[None]], *, event_loop: str = "auto"
) -> None:
    """Run ``main(stop)`` on a fresh event loop; the first signal sets *stop*.

    A second signal cancels the service outright, for people who really mean it.
    """

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("process.forced_stop", signal=signal.Signals(signum).name)
                if task is not None:
                    task.cancel()
                return
            log.info("process.stopping", signal=signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await main(stop)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as loop_runner:
        loop_runner.run(runner())


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return uvloop's loop factory for "uvloop" (and "auto" where it is installed).

    uvloop runs the same asyncio code with its transports and callbacks in C; on a
    worker that is a third less CPU per message (docs/performance.md).
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop
