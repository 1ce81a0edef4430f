"""Every error postroom raises descends from :class:`PostroomError`.

Each class carries a message template so callers and logs see the same wording.
"""

from __future__ import annotations


class PostroomError(Exception):
    """Root of postroom's errors: catch this to handle any of them.

    ``exit_code`` is what a ``postroom`` command exits with when this error ends it: 2 for
    configuration or usage a person must fix (the default), 3 for a dependency that cannot
    be reached or refused the work. An exception that is not a postroom error exits 1.
    """

    exit_code = 2


class ConfigError(PostroomError):
    """Settings are missing, malformed or unknown; raised at start-up, never later."""

    exit_code = 2


class SchemaNotReadyError(ConfigError):
    """postroom's schema is missing or behind the package's head: run ``postroom migrate``.

    Raised by the relay's and worker's pre-flight and by ``publish()`` when the outbox
    table does not exist, so nothing is consumed or written against a wrong schema.
    """

    def __init__(self, schema: str, current: str | None, head: str | None) -> None:
        if current is None:
            state = f"schema {schema!r} has no postroom tables" + (
                f" (head is {head})" if head else ""
            )
        else:
            state = f"schema {schema!r} is at revision {current}, behind head {head}"
        super().__init__(f"{state}; run `postroom migrate`")
        self.schema = schema
        self.current = current
        self.head = head


class UnreachableError(PostroomError):
    """A dependency (database or broker) did not answer; the text names which and where."""

    exit_code = 3


class NotInTransactionError(PostroomError):
    """`publish()` was called on a session with no open transaction.

    An outbox row written outside a transaction would be committed on its own,
    breaking the promise that the event exists only if the caller's work commits.
    """


class MessageTooLargeError(PostroomError):
    """An encoded body exceeds the configured limit; refused before commit."""

    def __init__(self, size: int, limit: int, topic: str) -> None:
        super().__init__(f"message body for topic {topic!r} is {size} bytes; the limit is {limit}")
        self.size = size
        self.limit = limit


class EventDefinitionError(PostroomError):
    """An event class is declared without a usable topic."""


class DecodeError(PostroomError):
    """A received message cannot be decoded into an event; it becomes a dead letter."""


class UnknownTopicError(DecodeError):
    """A received message has a topic its consumer does not handle."""


class TopologyMismatchError(PostroomError):
    """An existing queue or exchange was declared with different arguments."""

    def __init__(self, kind: str, name: str, detail: str) -> None:
        super().__init__(
            f"{kind} {name!r} exists with different arguments ({detail}); "
            "delete it or align the consumer's settings"
        )
        self.name = name


class TopologyRefusedError(PostroomError):
    """The broker refused to delete a queue that holds messages or an exchange in use."""

    def __init__(self, kind: str, name: str, detail: str) -> None:
        super().__init__(f"{kind} {name!r} was not deleted: {detail}")
        self.name = name


class Reject(PostroomError):
    """Raise from a handler to dead-letter the message at once, without retries."""


class ShuttingDownError(PostroomError):
    """The process is stopping; the message in hand must be requeued, not failed."""


class InvalidMessageError(PostroomError):
    """A message cannot be built as asked (reserved header names, bad values)."""


class DeliveryLimitExceededError(PostroomError):
    """The broker dead-lettered a message after repeated deliveries (workers crashed on it)."""


class InvalidFilterError(PostroomError):
    """An ops filter is malformed (a bad time, an unknown status or reason); nothing was done."""


class InvalidEditError(PostroomError):
    """An edited dead-letter body does not fit its consumer; nothing was replayed."""


class UnknownDeadLetterError(PostroomError):
    """Ids given to an ops command name no dead letter; nothing was changed."""

    def __init__(self, ids: list[int]) -> None:
        shown = ", ".join(str(i) for i in ids[:20]) + (" ..." if len(ids) > 20 else "")
        super().__init__(f"no dead letter with id {shown}")
        self.ids = ids


class TableBusyError(PostroomError):
    """Upkeep gave up waiting for a lock rather than queue behind it and stall the hot path."""

    exit_code = 3
