"""OpenTelemetry (the ``otel`` extra): one trace from the producer's span, through the
relay, to the handler and its follow-up; and without the extra, the W3C traceparent
still flows. Both run the whole path in a subprocess (a global tracer provider, or an
import blocked, must not leak into the other tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT
from tests.helpers import settings_env

SCRIPT = ROOT / "tests" / "apps" / "traced.py"


def run_path(settings: Any, names: str, mode: str) -> dict[str, Any]:
    env = settings_env(settings, TRACED_SUFFIX=names, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(SCRIPT), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def trace_of(traceparent: str | None) -> str:
    assert traceparent is not None
    return traceparent.split("-")[1]


def test_one_trace_from_the_producer_through_relay_and_handler_to_the_follow_up(settings, names):
    result = run_path(settings, names, "otel")
    spans = result["spans"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        by_name.setdefault(span["name"], []).append(span)
    exchange = settings.exchange
    bill, ledger = f"traced.bill.{names}", f"traced.ledger.{names}"
    assert sorted(by_name) == sorted(
        ["POST /orders", f"publish {exchange}", f"process {bill}", "charge card",
         f"process {ledger}"]
    ), sorted(by_name)  # fmt: skip
    assert len({span["trace_id"] for span in spans}) == 1, "everything is one trace"

    [root] = by_name["POST /orders"]
    [process_bill] = by_name[f"process {bill}"]
    [team] = by_name["charge card"]
    [process_ledger] = by_name[f"process {ledger}"]
    publishes = {s["attributes"]["messaging.rabbitmq.destination.routing_key"]: s
                 for s in by_name[f"publish {exchange}"]}  # fmt: skip
    ordered, invoiced = publishes["traced.ordered"], publishes["traced.invoiced"]

    # The path, parent by parent: request -> relay publish -> consumer -> team span ->
    # relay publish of the follow-up -> its consumer.
    assert root["parent_id"] is None
    assert ordered["parent_id"] == root["span_id"]
    assert process_bill["parent_id"] == ordered["span_id"]
    assert team["parent_id"] == process_bill["span_id"]
    assert invoiced["parent_id"] == team["span_id"]
    assert process_ledger["parent_id"] == invoiced["span_id"]

    for publish in (ordered, invoiced):
        assert publish["kind"] == "PRODUCER" and publish["status"] != "ERROR"
        attributes = publish["attributes"]
        assert attributes["messaging.system"] == "rabbitmq"
        assert attributes["messaging.destination.name"] == exchange
        assert attributes["messaging.operation.type"] == "send"
        assert attributes["messaging.operation.name"] == "publish"
        assert attributes["messaging.message.body.size"] > 0
    for process, consumer, topic in (
        (process_bill, bill, "traced.ordered"),
        (process_ledger, ledger, "traced.invoiced"),
    ):
        attributes = process["attributes"]
        assert process["kind"] == "CONSUMER"
        assert attributes["messaging.system"] == "rabbitmq"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.consumer.group.name"] == consumer
        assert attributes["messaging.destination.name"] == consumer
        assert attributes["messaging.rabbitmq.destination.routing_key"] == topic
    assert (
        process_bill["attributes"]["messaging.message.id"]
        == ordered["attributes"]["messaging.message.id"]
    )
    assert (
        process_ledger["attributes"]["messaging.message.id"]
        == invoiced["attributes"]["messaging.message.id"]
    )
    # The row carried the request span's context; the consumer saw the relay span's.
    assert result["published"].split("-")[2] == root["span_id"]
    assert result["seen"]["bill"].split("-")[2] == ordered["span_id"]


def test_without_the_extra_postroom_runs_and_traceparent_still_flows(settings, names):
    result = run_path(settings, names, "without")
    assert result["opentelemetry_loaded"] is False
    assert result["spans"] == []
    published, seen = result["published"], result["seen"]
    assert published is not None and seen["bill"] == published, "the consumer sees the row's"
    assert trace_of(seen["follow_up"]) == trace_of(published), "the follow-up continues it"
    assert seen["follow_up"] != published, "with a span id of its own"
    assert seen["ledger"] == seen["follow_up"]


BATCH_SPAN = """
import json
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

import postroom
from postroom import testing, tracing

class Entry(postroom.Event, topic="traced.entry"):
    n: int

messages = [testing.message(Entry(n=i)) for i in range(3)]
with tracing.processing_batch(consumer="traced.batch", messages=messages):
    pass
[span] = exporter.get_finished_spans()
print(json.dumps({
    "name": span.name,
    "kind": span.kind.name,
    "parent": span.parent is not None,
    "links": sorted(format(link.context.trace_id, "032x") for link in span.links),
    "traces": sorted(m.traceparent.split("-")[1] for m in messages),
    "count": span.attributes["messaging.batch.message_count"],
}))
"""


def test_a_batch_handler_runs_in_one_span_linked_to_each_message_trace():
    done = subprocess.run(
        [sys.executable, "-c", BATCH_SPAN],
        env={"PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    span = json.loads(done.stdout.strip().splitlines()[-1])
    assert (span["name"], span["kind"], span["parent"]) == (
        "process traced.batch",
        "CONSUMER",
        False,
    )
    assert span["links"] == span["traces"] and span["count"] == 3
