"""The filter options every ``postroom dead-letters`` command shares, and their parsing.

One set of options, one meaning (:class:`postroom.filters.Filters`): what ``list``
shows is what ``replay`` with the same options acts on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from postroom.cli_ops import fail, options
from postroom.errors import PostroomError

if TYPE_CHECKING:
    from postroom.filters import Filters
    from postroom.router import Router

T = TypeVar("T")

Consumer = Annotated[str | None, typer.Option("--consumer", "-c", help="Only this consumer's.")]
Topic = Annotated[str | None, typer.Option(help="Only this topic.")]
ErrorType = Annotated[
    str | None,
    typer.Option(
        "--error-type",
        "-e",
        help="Exception name, any case: TimeoutError, builtins.TimeoutError, httpx.ReadTimeout.",
    ),
]
Text = Annotated[
    str | None,
    typer.Option("--text", "-t", help="Text in 'ErrorType: message' (any case, literal)."),
]
Reason = Annotated[
    str | None,
    typer.Option(
        help="rejected, exhausted, undecodable, unknown_topic, too_large or delivery_limit."
    ),
]
Since = Annotated[
    str | None, typer.Option(help="Dead since: ISO time (UTC unless offset) or age: 90m, 2d.")
]
Until = Annotated[str | None, typer.Option(help="Dead before: like --since.")]
MessageId = Annotated[
    str | None,
    typer.Option("--message-id", "-m", help="One message: every dead letter it became."),
]
Status = Annotated[str, typer.Option(help="dead, replayed, purged or all.")]
Ids = Annotated[list[int] | None, typer.Argument(help="Dead-letter ids.", show_default=False)]
All = Annotated[
    bool, typer.Option("--all", help="Select every dead letter (no filter); needs --yes.")
]
Limit = Annotated[int | None, typer.Option(min=1, help="At most this many.")]
RouterSpec = Annotated[
    str | None,
    typer.Option(
        "--router",
        help="Your Router (billing.consumers:router): its consumers and topics are known "
        "names too; its redaction applies when showing.",
    ),
]


FILTER_OPTIONS: dict[str, tuple[object, object]] = {
    "consumer": (Consumer, None),
    "topic": (Topic, None),
    "error_type": (ErrorType, None),
    "text": (Text, None),
    "reason": (Reason, None),
    "since": (Since, None),
    "until": (Until, None),
    "message_id": (MessageId, None),
}


def filtered(*, status: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Give a reading command the filter options, parsed into its ``filters`` parameter.

    *status*: the command also takes ``--status``, with this default.
    """
    declared = dict(FILTER_OPTIONS)
    if status is not None:
        declared["status"] = (Status, status)
    return options("filters", declared, parse)


def selecting() -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Give a changing command ids, the filter options and ``--all``, as ``filters``.

    What it gets is :func:`selection` of them: the same options select what ``list``
    shows, and an empty selection is refused before anything runs.
    """
    declared = {"ids": (Ids, None), **FILTER_OPTIONS, "every": (All, False)}

    def build(ids: list[int] | None, every: bool, **given: str | None) -> Filters:
        return selection(ids, every, parse(**given))

    return options("filters", declared, build)


def parse(
    *,
    consumer: str | None,
    topic: str | None,
    error_type: str | None,
    text: str | None,
    reason: str | None,
    since: str | None,
    until: str | None,
    message_id: str | None,
    status: str | None = None,
) -> Filters:
    """Parse the filter options, or exit 2 saying what is wrong."""
    from postroom.filters import Filters

    try:
        return Filters.parse(
            consumer=consumer,
            topic=topic,
            error_type=error_type,
            text=text,
            reason=reason,
            since=since,
            until=until,
            status=status,
            message_id=message_id,
        )
    except PostroomError as exc:
        fail(str(exc))


def selection(ids: list[int] | None, every: bool, filters: Filters) -> Filters:
    """The dead letters a changing command acts on: ids and filters, or ``--all`` alone."""
    chosen = replace(filters, ids=tuple(dict.fromkeys(ids or ())))
    if every and chosen.narrows:
        fail(
            "--all selects every dead letter and takes no ids or filters: "
            "drop --all to act on the ones the filters select"
        )
    if not chosen.narrows and not every:
        fail("say which dead letters: ids, a filter (--consumer, --error-type, ...) or --all")
    return chosen


def router_of(spec: str | None) -> Router | None:
    """Load the ``--router`` given, or exit 2 saying why it cannot be loaded."""
    if spec is None:
        return None
    from postroom.loader import load_router

    try:
        return load_router(spec)
    except PostroomError as exc:
        fail(str(exc))
