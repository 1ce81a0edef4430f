"""A one-consumer app for `postroom dev`: greets, failing a message's first attempt on request."""

from __future__ import annotations

from datetime import timedelta

import postroom


class Hello(postroom.Event, topic="devapp.hello"):
    name: str
    fail_first: bool = False


router = postroom.Router()


@router.consumer("devapp.greet", Hello, max_attempts=3, backoff=timedelta(milliseconds=100))
async def greet(event: Hello, ctx: postroom.Context) -> None:
    if event.fail_first and ctx.attempt == 1:
        raise RuntimeError("first attempts fail on request")
