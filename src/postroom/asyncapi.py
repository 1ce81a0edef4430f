"""Describe a router as an AsyncAPI 3.0.0 document: what it consumes and what it publishes.

The document is built from the router alone (no broker, no database): one channel per
topic on the events exchange (an AMQP routing key), one channel per consumer queue, a
``receive`` operation per consumer, a ``send`` operation per topic its handlers declare
with ``publishes=``, and a message per event class whose payload schema is the pydantic
model's JSON schema. The envelope headers are postroom's own (``postroom.message``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pydantic.json_schema import models_json_schema

from postroom.events import Event, topic_of
from postroom.message import (
    CE_ID,
    CE_SOURCE,
    CE_SPECVERSION,
    CE_TIME,
    CE_TYPE,
    H_ATTEMPT,
    H_CAUSATION,
    H_CONSUMER,
    H_FIRST_FAILED,
    H_KEY,
    H_LAST_ERROR,
    H_REPLAYS,
    H_TRACEPARENT,
    JSON,
    SPECVERSION,
)
from postroom.router import Consumer, Router

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING = "0.3.0"
HEADERS_SCHEMA = "postroom-envelope-headers"
_REF = "#/components/schemas/{model}"

Document = dict[str, Any]


def document(
    router: Router,
    *,
    title: str,
    version: str = "1.0.0",
    exchange: str = "postroom.events",
    description: str | None = None,
) -> Document:
    """Return the AsyncAPI 3.0.0 document of *router* as a JSON-ready dict.

    *exchange* is the topic exchange events are published to (``POSTROOM_EXCHANGE``).
    Deterministic: the same router gives the same document, in registration order.
    """
    consumers = list(router)
    events = _event_types(consumers)
    schemas, payloads = _schemas(events)
    messages = _messages(events, payloads)
    message_key = {cls: key for key, (cls, _) in messages.items()}

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for cls in events:
        topic = topic_of(cls)
        channel = channels.setdefault(
            _topic_channel(topic),
            {
                "address": topic,
                "title": topic,
                "description": f"Routing key `{topic}` on the topic exchange `{exchange}`.",
                "messages": {},
                "bindings": {"amqp": _exchange_binding(exchange)},
            },
        )
        channel["messages"][message_key[cls]] = _ref("components", "messages", message_key[cls])

    for consumer in consumers:
        key = message_key[consumer.event_type]
        queue = _queue_channel(consumer.name)
        channels[queue] = {
            "address": consumer.name,
            "title": f"queue {consumer.name}",
            "description": _queue_description(consumer, exchange),
            "messages": {key: _ref("components", "messages", key)},
            "bindings": {"amqp": _queue_binding(consumer.name)},
        }
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": _ref("channels", queue),
            "title": f"consumer {consumer.name}",
            "description": _retry_description(consumer),
            "messages": [_ref("channels", queue, "messages", key)],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
            "x-postroom-consumer": {
                "name": consumer.name,
                "maxAttempts": consumer.retry.max_attempts,
                "backoffSeconds": consumer.retry.base.total_seconds(),
                "backoffCapSeconds": consumer.retry.cap.total_seconds(),
                "ordered": consumer.ordered,
                "deadLetterQueue": f"{consumer.name}.dead",
            },
        }
        summary = _first_line(consumer.handler.__doc__)
        if summary:
            operation["summary"] = summary
        operations[f"receive.{consumer.name}"] = operation

    for topic, publishers in _publishers(consumers).items():
        channel_id = _topic_channel(topic)
        operations[f"send.{topic}"] = {
            "action": "send",
            "channel": _ref("channels", channel_id),
            "title": f"publish {topic}",
            "description": "Written to the outbox in the handler's transaction by "
            + ", ".join(f"`{name}`" for name in publishers)
            + "; the relay publishes it with confirms once that transaction commits.",
            "messages": [
                _ref("channels", channel_id, "messages", key)
                for key in channels[channel_id]["messages"]
            ],
            "bindings": {
                "amqp": {
                    "deliveryMode": 2,
                    "mandatory": True,
                    "timestamp": True,
                    "bindingVersion": AMQP_BINDING,
                }
            },
        }

    schemas[HEADERS_SCHEMA] = _headers_schema()
    info: dict[str, Any] = {"title": title, "version": version}
    if description:
        info["description"] = description
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": info,
        "defaultContentType": JSON,
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": {key: body for key, (_, body) in messages.items()},
            "schemas": schemas,
        },
    }


def dumps(doc: Document) -> str:
    """Serialise *doc* as stable, readable JSON (AsyncAPI accepts JSON as well as YAML)."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _event_types(consumers: Iterable[Consumer[Any]]) -> list[type[Event]]:
    seen: dict[type[Event], None] = {}
    for consumer in consumers:
        seen.setdefault(consumer.event_type)
        for published in consumer.publishes:
            seen.setdefault(published)
    return list(seen)


def _publishers(consumers: Iterable[Consumer[Any]]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for consumer in consumers:
        for published in consumer.publishes:
            names = found.setdefault(topic_of(published), [])
            if consumer.name not in names:
                names.append(consumer.name)
    return found


def _schemas(events: list[type[Event]]) -> tuple[dict[str, Any], dict[type[Event], Any]]:
    """JSON schemas of every event, nested models hoisted into components.schemas.

    pydantic names colliding classes apart (module-qualified), so two events named alike
    in different modules keep distinct schemas.
    """
    if not events:
        return {}, {}
    refs, top = models_json_schema([(cls, "validation") for cls in events], ref_template=_REF)
    schemas = {name: _asyncapi_schema(schema) for name, schema in top.get("$defs", {}).items()}
    payloads = {cls: refs[(cls, "validation")] for cls in events}
    return schemas, payloads


def _asyncapi_schema(schema: Any) -> Any:
    """Fit pydantic's JSON Schema (2020-12) to AsyncAPI's Schema Object (draft-07 based)."""
    if isinstance(schema, list):
        return [_asyncapi_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    fitted = {key: _asyncapi_schema(value) for key, value in schema.items()}
    discriminator = fitted.get("discriminator")
    if isinstance(discriminator, dict):  # OpenAPI style object; AsyncAPI wants the name
        fitted["discriminator"] = discriminator.get("propertyName", "")
    if "prefixItems" in fitted:  # tuples: draft-07 spells them as an items array
        fitted["items"] = fitted.pop("prefixItems")
    return fitted


def _messages(
    events: list[type[Event]], payloads: dict[type[Event], Any]
) -> dict[str, tuple[type[Event], dict[str, Any]]]:
    messages: dict[str, tuple[type[Event], dict[str, Any]]] = {}
    for cls in events:
        topic = topic_of(cls)
        key = topic if topic not in messages else f"{topic}.{cls.__name__}"
        body: dict[str, Any] = {
            "name": topic,
            "title": cls.__name__,
            "contentType": JSON,
            "payload": payloads[cls],
            "headers": {
                "type": "object",
                "allOf": [
                    _ref("components", "schemas", HEADERS_SCHEMA),
                    {"properties": {CE_TYPE: {"const": topic}}},
                ],
            },
            "correlationId": {
                "description": "The AMQP `correlation_id` property: the id of the message "
                "that started the chain; follow-up events inherit it.",
                "location": "$message.header#/correlation_id",
            },
            "bindings": {"amqp": {"messageType": topic, "bindingVersion": AMQP_BINDING}},
        }
        summary = _first_line(cls.__doc__)
        if summary:
            body["summary"] = summary
        messages[key] = (cls, body)
    return messages


def _headers_schema() -> dict[str, Any]:
    """The AMQP headers every postroom message carries (DESIGN.md decision 6)."""
    text = {"type": "string"}
    return {
        "type": "object",
        "description": "CloudEvents AMQP binding, W3C trace context and postroom's own "
        "headers. Other headers are the publisher's; names starting with `x-` are "
        "RabbitMQ's.",
        "required": [CE_ID, CE_TYPE, CE_SOURCE, CE_TIME, CE_SPECVERSION, H_ATTEMPT],
        "properties": {
            CE_ID: {**text, "format": "uuid", "description": "The message id (UUIDv7)."},
            CE_TYPE: {**text, "description": "The topic."},
            CE_SOURCE: {**text, "description": "The publishing application."},
            CE_TIME: {**text, "format": "date-time", "description": "When it occurred."},
            CE_SPECVERSION: {"const": SPECVERSION},
            H_TRACEPARENT: {
                **text,
                "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                "description": "W3C trace context of the publishing span.",
            },
            H_ATTEMPT: {
                "type": "integer",
                "minimum": 1,
                "description": "1 on first delivery; retries count up.",
            },
            H_KEY: {**text, "description": "Ordering key: one key is delivered in order."},
            H_CAUSATION: {**text, "description": "Id of the message whose handler sent this."},
            H_CONSUMER: {**text, "description": "On retries: the consumer being retried."},
            H_FIRST_FAILED: {**text, "format": "date-time", "description": "On retries."},
            H_LAST_ERROR: {**text, "description": "On retries: the last error, truncated."},
            H_REPLAYS: {"type": "integer", "minimum": 0, "description": "Dead-letter replays."},
        },
    }


def _queue_description(consumer: Consumer[Any], exchange: str) -> str:
    topics = ", ".join(f"`{topic}`" for topic in consumer.topics)
    text = (
        f"Quorum queue of consumer `{consumer.name}`, bound to {topics} on `{exchange}`. "
        f"Retries and replays reach it through the default exchange. Messages that crash "
        f"workers past the broker's `x-delivery-limit` go to `{consumer.name}.dead`."
    )
    if consumer.ordered:
        text += " Single active consumer: one ordering key is handled in order."
    return text


def _retry_description(consumer: Consumer[Any]) -> str:
    policy = consumer.retry
    return (
        f"Idempotent (inbox keyed by consumer and message id). A failing handler is retried "
        f"up to {policy.max_attempts} attempts in all, backing off from "
        f"{policy.base.total_seconds():g}s to at most {policy.cap.total_seconds():g}s, "
        f"then becomes a dead letter; `Reject` and undecodable messages are dead at once."
    )


def _exchange_binding(exchange: str) -> dict[str, Any]:
    return {
        "is": "routingKey",
        "exchange": {"name": exchange, "type": "topic", "durable": True, "autoDelete": False},
        "bindingVersion": AMQP_BINDING,
    }


def _queue_binding(name: str) -> dict[str, Any]:
    return {
        "is": "queue",
        "queue": {"name": name, "durable": True, "exclusive": False, "autoDelete": False},
        "bindingVersion": AMQP_BINDING,
    }


def _topic_channel(topic: str) -> str:
    return f"topic.{topic}"


def _queue_channel(name: str) -> str:
    return f"queue.{name}"


def _ref(*path: str) -> dict[str, str]:
    escaped = (part.replace("~", "~0").replace("/", "~1") for part in path)
    return {"$ref": "#/" + "/".join(escaped)}


def _first_line(doc: str | None) -> str | None:
    if not doc:
        return None
    return doc.strip().splitlines()[0].strip() or None
