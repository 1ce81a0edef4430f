"""Run one event's whole path in this process and print what tracing saw, as JSON.

``python tests/apps/traced.py otel``: an OpenTelemetry SDK with an in-memory exporter;
a span around the producer's transaction, a relay and a worker in-process, a handler
that opens a span of its own and publishes a follow-up event, which a second consumer
handles. ``... without``: the same with every ``opentelemetry`` import blocked, as in an
install without the ``otel`` extra. Configured by POSTROOM_* like the real processes;
TRACED_SUFFIX makes the consumer names (and so the queues) private to the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

MODE = sys.argv[1]
if MODE == "without":

    class _Blocked:
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"{name} is blocked: simulating an install without [otel]")

    sys.meta_path.insert(0, _Blocked())

from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine  # noqa: E402

import postroom  # noqa: E402
from postroom.relay import Relay  # noqa: E402
from postroom.router import Context  # noqa: E402
from postroom.settings import Settings  # noqa: E402
from postroom.worker import Worker  # noqa: E402

exporter: Any = None
tracer: Any = None
if MODE == "otel":
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("the-team's-service")


class Ordered(postroom.Event, topic="traced.ordered"):
    n: int


class Invoiced(postroom.Event, topic="traced.invoiced"):
    n: int


SUFFIX = os.environ["TRACED_SUFFIX"]
router = postroom.Router()
seen: dict[str, str | None] = {}
done = asyncio.Event()


@router.consumer(f"traced.bill.{SUFFIX}", Ordered)
async def bill(event: Ordered, ctx: Context) -> None:
    seen["bill"] = ctx.message.traceparent
    if tracer is None:
        seen["follow_up"] = (await ctx.publish(Invoiced(n=event.n))).traceparent
        return
    with tracer.start_as_current_span("charge card"):  # the team's own span
        seen["follow_up"] = (await ctx.publish(Invoiced(n=event.n))).traceparent


@router.consumer(f"traced.ledger.{SUFFIX}", Invoiced)
async def ledger(event: Invoiced, ctx: Context) -> None:
    seen["ledger"] = ctx.message.traceparent
    done.set()


async def main() -> dict[str, Any]:
    settings = Settings.from_env()
    engine = create_async_engine(settings.database_url.get_secret_value())
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    outbox = postroom.Outbox.from_settings(settings)
    stop = asyncio.Event()
    worker = Worker(settings, router)
    working = asyncio.create_task(worker.run(stop))
    while not worker.ready:  # queues declared and bound before anything is relayed
        assert not working.done(), working.exception()
        await asyncio.sleep(0.05)
    relaying = asyncio.create_task(Relay(settings).run(stop))

    async def place_order() -> str | None:
        async with sessions() as session, session.begin():
            return (await outbox.publish(session, Ordered(n=1))).traceparent

    if tracer is None:
        published = await place_order()
    else:
        with tracer.start_as_current_span("POST /orders"):
            published = await place_order()
    await asyncio.wait_for(done.wait(), 30)
    stop.set()
    await asyncio.gather(working, relaying)
    await engine.dispose()
    spans = [] if exporter is None else exporter.get_finished_spans()
    return {
        "published": published,
        "seen": seen,
        "opentelemetry_loaded": any(name.startswith("opentelemetry") for name in sys.modules),
        "spans": [
            {
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": f"{span.context.trace_id:032x}",
                "span_id": f"{span.context.span_id:016x}",
                "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "status": span.status.status_code.name,
                "attributes": dict(span.attributes or {}),
            }
            for span in spans
        ],
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
