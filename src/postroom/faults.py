"""Named crash points for fault-injection tests; no-ops unless a setting names one.

A real SIGKILL at an exact point (after the broker confirmed, before the row is
deleted; after commit, before ack) is the only honest way to test the windows
where at-least-once delivery turns into duplicates.
"""

from __future__ import annotations

import os
import signal

RELAY_AFTER_CONFIRM = "relay.after_confirm"
WORKER_IN_HANDLER = "worker.in_handler"
WORKER_AFTER_COMMIT = "worker.after_commit"
WORKER_AFTER_RETRY_COMMIT = "worker.after_retry_commit"
"""A failed attempt's retry row is committed; the original is not acked yet."""
WORKER_AFTER_DEAD_LETTER_COMMIT = "worker.after_dead_letter_commit"
"""A dead letter is committed; the message is not acked yet."""
POINTS = frozenset(
    {
        RELAY_AFTER_CONFIRM,
        WORKER_IN_HANDLER,
        WORKER_AFTER_COMMIT,
        WORKER_AFTER_RETRY_COMMIT,
        WORKER_AFTER_DEAD_LETTER_COMMIT,
    }
)


def crash_point(armed: str | None, point: str) -> None:
    """Kill this process with SIGKILL if *armed* names *point*."""
    if armed is not None and armed == point:
        os.kill(os.getpid(), signal.SIGKILL)
