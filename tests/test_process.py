"""The process runner: event loop choice and stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import uvloop

from postroom.process import loop_factory, run_service


@pytest.mark.parametrize(("choice", "loop_type"), [("auto", uvloop.Loop), ("uvloop", uvloop.Loop)])
def test_services_run_on_uvloop_and_stop_on_sigterm(choice: str, loop_type: type) -> None:
    seen: dict[str, object] = {}

    async def main(stop: asyncio.Event) -> None:
        seen["loop"] = type(asyncio.get_running_loop())
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)
        seen["stopped"] = True

    run_service(main, event_loop=choice)
    assert seen == {"loop": loop_type, "stopped": True}


def test_asyncio_choice_keeps_the_standard_loop() -> None:
    assert loop_factory("asyncio") is None
    seen: list[bool] = []

    async def main(stop: asyncio.Event) -> None:
        seen.append(isinstance(asyncio.get_running_loop(), uvloop.Loop))

    run_service(main, event_loop="asyncio")
    assert seen == [False]
