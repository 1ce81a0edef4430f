"""Typed events: pydantic models that name their topic explicitly.

A topic is an identity (it names routing keys, bindings and dead letters), so it is
declared, never derived from a class name that someone may rename.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from postroom.errors import EventDefinitionError

_TOPIC = re.compile(r"^[a-z0-9][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*$")


class Event(BaseModel):
    """Base class for events; declare ``class OrderPlaced(Event, topic="shop.order-placed")``.

    Events are frozen and reject unknown fields, so a payload from another service
    that does not match the model fails loudly at decode time instead of half-parsing.
    A class without a topic may serve as a base but cannot be published.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: ClassVar[str] = ""

    def __init_subclass__(cls, *, topic: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if topic is not None:
            check_topic(topic, owner=cls.__name__)
            cls.topic = topic
        elif "topic" not in cls.__dict__:
            cls.topic = ""  # a topic is never inherited: a subclass is a different event

    @classmethod
    def __pydantic_init_subclass__(cls, *, topic: str | None = None, **kwargs: Any) -> None:
        # pydantic passes the class keywords here too; `topic` was handled above.
        super().__pydantic_init_subclass__(**kwargs)


def check_topic(topic: str, *, owner: str = "event") -> str:
    """Validate a topic name: dot-separated words, no AMQP wildcards."""
    if not isinstance(topic, str) or not _TOPIC.match(topic) or len(topic) > 200:
        raise EventDefinitionError(
            f"{owner}: topic {topic!r} must be dot-separated words of [a-z0-9_-] "
            "(no wildcards, at most 200 characters)"
        )
    return topic


def topic_of(event: Event | type[Event]) -> str:
    """Return the topic of an event or event class, or raise if it has none."""
    cls = event if isinstance(event, type) else type(event)
    if not cls.topic:
        raise EventDefinitionError(
            f'{cls.__name__} has no topic; declare it as `class {cls.__name__}(Event, topic="...")`'
        )
    return cls.topic
