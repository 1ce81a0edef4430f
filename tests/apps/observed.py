"""A consumer app for the scrape test: one consumer, named by the test (its queue is private)."""

from __future__ import annotations

import os

import postroom
from postroom.router import Context


class Seen(postroom.Event, topic="observed.seen"):
    n: int


router = postroom.Router()


@router.consumer(os.environ.get("OBSERVED_CONSUMER", "observed.record"), Seen)
async def record(event: Seen, ctx: Context) -> None:
    """Handle nothing: the test measures the path, not the handler."""
