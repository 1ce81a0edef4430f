"""Structured logs: JSON lines in production, a readable console in development.

Keys are stable (message_id, topic, consumer, attempt, outcome) so dashboards and
alerts can rely on them; bodies and secrets are never logged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, Literal

import structlog

from postroom.redaction import mask


def configure(
    fmt: Literal["auto", "json", "console"] = "json",
    level: str = "INFO",
    *,
    secrets: Iterable[str] = (),
) -> None:
    """Route structlog and stdlib logging to stderr in one format, *secrets* masked.

    Every rendered line, at every level, our own and client libraries' (tracebacks
    included), passes through :func:`postroom.redaction.mask` last, so a password a
    driver echoes in an error never reaches the log. ``auto`` is the console renderer
    (readable, coloured) when stderr is a terminal and JSON lines otherwise, so a
    developer's shell and a log collector each get theirs.
    """
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    hidden = frozenset(secret for secret in secrets if secret)

    def masked(_logger: Any, _name: str, line: Any) -> Any:
        return mask(line, hidden) if isinstance(line, str) and hidden else line

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        # filter_by_level first: a disabled DEBUG call returns before any processing.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
                masked,
            ],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO and may print URLs; keep them to warnings.
    for noisy in ("aiormq", "aio_pika", "asyncio", "sqlalchemy.engine", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
