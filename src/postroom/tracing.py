"""W3C trace context: start a trace or continue one across a hop through the outbox."""

from __future__ import annotations

import os
import re

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def new_traceparent() -> str:
    """Start a new sampled trace."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def child_traceparent(parent: str | None) -> str:
    """Continue *parent*'s trace with a new span id; start a new trace if it is unusable."""
    if parent:
        match = _TRACEPARENT.match(parent)
        if match:
            return f"00-{match.group(1)}-{os.urandom(8).hex()}-{match.group(3)}"
    return new_traceparent()


def trace_id(traceparent: str | None) -> str | None:
    """Return the trace id of *traceparent*, or None if it is malformed."""
    match = _TRACEPARENT.match(traceparent or "")
    return match.group(1) if match else None
