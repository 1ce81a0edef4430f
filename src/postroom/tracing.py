"""Trace context: W3C traceparent across the outbox hop, and OpenTelemetry spans if installed.

Without OpenTelemetry a message carries a W3C ``traceparent``: a new trace per published
event, continued (new span id, same trace) by the events a handler publishes. With the
``otel`` extra and a tracer provider configured by the service, ``publish()`` takes the
current span's context instead, the relay wraps each publish in a producer span and the
worker runs each handler inside a consumer span (messaging semantic conventions), so one
trace runs from the producer's request through the relay to the handler and on to its
follow-up events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

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


# OpenTelemetry, when installed (`pip install postroom[otel]`) and configured by the
# service (a TracerProvider set globally). Without it every function below is a cheap
# no-op and the W3C traceparent above flows as before.

SYSTEM = "rabbitmq"
TRACER_NAME = "postroom"
_DEFAULT_EXCHANGE = "amq.default"  # what the semantic conventions call the "" exchange


class Sent(Protocol):
    """What :func:`sending` reads of an outgoing message (``rabbit.Outgoing``)."""

    @property
    def exchange(self) -> str: ...
    @property
    def routing_key(self) -> str: ...
    @property
    def message_id(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...


_S = TypeVar("_S", bound=Sent)


@functools.cache
def _otel() -> Any:
    """Return the ``opentelemetry.trace`` module, or None when it is not installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


class _TracerCache:
    """postroom's tracer, once OpenTelemetry has a real (SDK) tracer provider.

    Asking OpenTelemetry for its provider costs microseconds per call, on the path of every
    message; a global provider is set once and never unset, so a tracer found is kept,
    and while there is none the question is asked at most once a second (a provider set
    after start-up is used from the next second on).
    """

    RECHECK_SECONDS = 1.0

    def __init__(self) -> None:
        self.tracer: Any = None
        self.next_check = 0.0

    def get(self) -> Any:
        if self.tracer is not None:
            return self.tracer
        now = time.monotonic()
        if now < self.next_check:
            return None
        self.next_check = now + self.RECHECK_SECONDS
        trace = _otel()
        if trace is None:
            return None
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):
            return None  # no SDK configured: spans would record nothing, skip the work
        self.tracer = provider.get_tracer(TRACER_NAME, _release())
        return self.tracer


def _release() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("postroom")
    except PackageNotFoundError:
        return None


_TRACERS = _TracerCache()
_tracer = _TRACERS.get


def current_traceparent() -> str | None:
    """Return the W3C traceparent of the current OpenTelemetry span, if there is one.

    ``publish()`` writes it into the outbox row, so the relay and the consumers continue
    the caller's trace (a web request's, a handler's). None without OpenTelemetry or
    outside any valid span; callers then start or continue a trace as before.
    """
    trace = _otel()
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _parent(traceparent: str | None) -> Any:
    """Return an OpenTelemetry context whose span is the remote *traceparent* (or none)."""
    trace = _otel()
    match = _TRACEPARENT.match(traceparent or "")
    if match is None:
        return trace.set_span_in_context(trace.INVALID_SPAN)  # a new trace, not the caller's
    remote = trace.SpanContext(
        trace_id=int(match.group(1), 16),
        span_id=int(match.group(2), 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(match.group(3), 16)),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(remote))


_NOT_TRACED = contextlib.nullcontext()


def processing(
    *, consumer: str, message_id: str, topic: str, traceparent: str | None, attempt: int
) -> contextlib.AbstractContextManager[Any]:
    """Run the block (a handler) inside a consumer span, child of the message's trace.

    The span is current for the block, so the handler's own spans nest under it and the
    events it publishes carry its context. An exception leaving the block is recorded on
    the span (status error) and re-raised untouched.
    """
    tracer = _tracer()
    if tracer is None:
        return _NOT_TRACED  # the hot path without tracing: no generator, no span
    trace = _otel()
    span: contextlib.AbstractContextManager[Any] = tracer.start_as_current_span(
        f"process {consumer}",
        context=_parent(traceparent),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": consumer,  # the consumer's own queue
            "messaging.rabbitmq.destination.routing_key": topic,
            "messaging.consumer.group.name": consumer,
            "messaging.message.id": message_id,
            "postroom.attempt": attempt,
        },
    )
    return span


def processing_batch(
    *, consumer: str, messages: Sequence[Any]
) -> contextlib.AbstractContextManager[Any]:
    """Run a batch handler inside one consumer span, linked to each message's trace.

    A batch has many parents, so its span starts a trace of its own and links them
    (the messaging conventions' batch shape); *messages* are :class:`postroom.Message`.
    """
    tracer = _tracer()
    if tracer is None:
        return _NOT_TRACED
    trace = _otel()
    links = []
    for message in messages:
        parent = trace.get_current_span(_parent(message.traceparent)).get_span_context()
        if parent.is_valid:
            links.append(trace.Link(parent))
    span: contextlib.AbstractContextManager[Any] = tracer.start_as_current_span(
        f"process {consumer}",
        context=trace.set_span_in_context(trace.INVALID_SPAN),
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": consumer,
            "messaging.consumer.group.name": consumer,
            "messaging.batch.message_count": len(messages),
        },
    )
    return span


class Sending(Generic[_S]):
    """The messages of one relay batch, each with its producer span (see :func:`sending`)."""

    def __init__(self, messages: Sequence[_S], spans: Sequence[Any]) -> None:
        self.messages = messages
        self._spans = spans

    def settle(self, errors: Sequence[BaseException | None]) -> None:
        """Mark the spans of messages the broker refused or returned as failed."""
        trace = _otel()
        for span, error in zip(self._spans, errors, strict=False):
            if error is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)[:200]))


@contextlib.contextmanager
def sending(messages: Sequence[_S]) -> Iterator[Sending[_S]]:
    """Give each message a producer span, child of its row's traceparent, for the block.

    Yields the messages to publish: copies whose ``traceparent`` header is their span's,
    so consumers continue the trace through the relay. Spans end when the block does,
    failed if it raised. Without a configured tracer the messages are yielded unchanged.
    """
    tracer = _tracer()
    if tracer is None or not messages:
        yield Sending(messages, ())
        return
    trace = _otel()
    spans = []
    traced = []
    for message in messages:
        exchange = message.exchange or _DEFAULT_EXCHANGE
        span = tracer.start_span(
            f"publish {exchange}",
            context=_parent(message.headers.get("traceparent")),
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": exchange,
                "messaging.rabbitmq.destination.routing_key": message.routing_key,
                "messaging.message.id": message.message_id,
                "messaging.message.body.size": len(message.body),
            },
        )
        context = span.get_span_context()
        traceparent = (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
        )
        spans.append(span)
        headers = {**message.headers, "traceparent": traceparent}
        traced.append(dataclasses.replace(message, headers=headers))  # type: ignore[type-var]
    try:
        yield Sending(traced, spans)
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        for span in spans:
            span.end()
