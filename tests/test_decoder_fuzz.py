"""Fuzz the decoder through a running worker: whatever arrives, the worker survives.

Hypothesis generates AMQP messages (random bytes, JSON of the wrong shape, huge values,
missing or malformed ids, types, content types and headers) and publishes them raw to a
consumer's queue. The worker must stay ready, never requeue (a requeue means an outcome
could not be recorded), and end every message as a dead letter or a clean outcome:
dead + acked (+ duplicate, for ids hypothesis repeated) == sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections import Counter
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import text

import postroom
from postroom.router import Context
from postroom.settings import Settings
from tests.helpers import delete_queues, running_worker

QUEUE = "fuzz.sink"
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)  # what the AMQP encoder takes


class Probe(postroom.Event, topic="fuzz.probe"):
    id: int
    note: str = ""


router = postroom.Router()


@router.consumer(QUEUE, Probe, max_attempts=2, backoff=timedelta(milliseconds=50))
async def sink(event: Probe, ctx: Context) -> None:
    """Accept every valid probe, except those asking to fail: their retry rows and dead
    letters carry the fuzzed headers through the outbox and the dead-letter table."""
    if event.note == "fail":
        raise RuntimeError("asked to fail")


# -- strategies ------------------------------------------------------------------------------

texts = st.text(max_size=60) | st.text(min_size=2000, max_size=9000)
scalars = st.none() | st.booleans() | INT32 | st.floats(width=32) | texts
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


def _json(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()


bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(_json),
    st.builds(lambda i, n: _json({"id": i, "note": n}), st.integers(), st.text(max_size=30)),
    st.builds(
        lambda i, n: _json({"id": i, "note": n}),
        st.integers(min_value=0, max_value=1000),
        st.sampled_from(["", "fail"]),
    ),
    st.builds(
        lambda extra: _json({"id": 1, **extra}),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    ),
    st.just(b'{"id": ' + b"9" * 5000 + b"}"),
    st.integers(min_value=4097, max_value=20_000).map(lambda n: b" " * n),  # over the limit
)
# Mostly fresh UUIDs (hypothesis repeats its own), so most messages are distinct.
ids = st.builds(lambda: str(uuid.uuid4())) | st.none() | st.just("") | st.text(max_size=60)
types = (
    st.just("fuzz.probe")
    | st.none()
    | st.just("")
    | st.sampled_from(["fuzz.other", "x"])
    | st.text(max_size=40)
)
content_types = (
    st.just("application/json")
    | st.none()
    | st.sampled_from(["application/json; charset=utf-8", "text/plain", "", "application/JSON"])
    | st.text(max_size=30)
)
special = {
    "postroom-attempt": values,
    "postroom-key": values,
    "postroom-causation-id": values,
    "traceparent": values,
    "cloudEvents_id": values,
    "cloudEvents_type": values,
    "ce-id": values,
    "ce-type": values,
    "ce-time": values,
    "cloudEvents_datacontenttype": values,
    "postroom-first-failed-at": values,
    "postroom-replays": values,
}
headers = st.builds(
    lambda fixed, free: {**free, **fixed},
    st.fixed_dictionaries({}, optional=special),
    st.dictionaries(st.text(min_size=1, max_size=20), values, max_size=5),
)
messages = st.fixed_dictionaries(
    {
        "body": bodies,
        "message_id": ids,
        "type": types,
        "content_type": content_types,
        "correlation_id": st.none() | st.text(max_size=60),
        "timestamp": st.none()
        | st.datetimes(min_value=datetime(1970, 1, 2), timezones=st.just(UTC)),
        "headers": headers,
    }
)


# -- a worker and a publisher on a loop of their own ------------------------------------------


class Harness:
    """Run a worker and a publishing connection on an event loop in a background thread,
    so hypothesis (synchronous) can drive it one example at a time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._stop = asyncio.Event()
        self.worker: Any = None
        self._ready = threading.Event()
        self.unsent = 0
        self.reconnects = 0
        self.unsent_why: Counter[str] = Counter()
        self._main = asyncio.run_coroutine_threadsafe(self._run(), self.loop)
        if not self._ready.wait(60):
            raise AssertionError("the fuzz worker did not start")
        self.channel = self.call(self._channel())

    async def _run(self) -> None:
        async with running_worker(self.settings, router) as worker:
            self.worker = worker
            self.connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.connection.close()

    async def _channel(self, *, fresh: bool = False) -> Any:
        if fresh or self.connection.is_closed:  # the broker refused a frame of the last one
            with contextlib.suppress(Exception):
                await self.connection.close()
            self.reconnects += 1
            self.connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        return await self.connection.channel()

    def call(self, work: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def publish(self, message: aio_pika.Message) -> bool:
        """Publish *message*; False if it could not be sent (the client could not encode
        it, or the broker refused the frame and closed the publishing connection)."""
        try:
            if self.channel.is_closed or self.connection.is_closed:
                self.channel = self.call(self._channel())
            self.call(self.channel.default_exchange.publish(message, routing_key=QUEUE))
        except Exception as exc:
            self.unsent += 1
            self.unsent_why[type(exc).__name__ + ": " + str(exc)[:60]] += 1
            with contextlib.suppress(Exception):
                self.channel = self.call(self._channel(fresh=True))
            return False
        return True

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        try:
            self._main.result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
async def fuzz_settings(settings: Settings):
    await delete_queues(settings.amqp_url.get_secret_value(), [QUEUE])
    yield settings.model_copy(update={"max_body_bytes": 4096, "worker_concurrency": 8})
    await delete_queues(settings.amqp_url.get_secret_value(), [QUEUE])


def test_decoder_survives_whatever_arrives(fuzz_settings, sessions_url):
    harness = Harness(fuzz_settings)
    sent: list[str | None] = []
    try:

        @hypothesis_settings(
            max_examples=100,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(messages)
        def publish_one(fields: dict[str, Any]) -> None:
            message = aio_pika.Message(
                fields["body"],
                message_id=fields["message_id"],
                type=fields["type"],
                content_type=fields["content_type"],
                correlation_id=fields["correlation_id"],
                timestamp=fields["timestamp"],
                headers=fields["headers"],
            )
            if harness.publish(message):
                sent.append(fields["message_id"])

        publish_one()
        # A valid probe at the end proves the worker still does useful work.
        good = str(uuid.uuid4())
        harness.publish(
            aio_pika.Message(
                b'{"id": 42}', message_id=good, type=Probe.topic, content_type="application/json"
            )
        )
        sent.append(good)
        stats = harness.worker.stats

        async def settled() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            # One outcome per message sent. No relay runs here, so a retry is final for
            # this test: its next attempt waits in the outbox (checked below).
            while sum(stats.outcomes.values()) < len(sent):
                if loop.time() > deadline:
                    raise AssertionError(
                        f"{sum(stats.outcomes.values())} of {len(sent)} settled: {stats.outcomes}"
                    )
                await asyncio.sleep(0.1)

        harness.call(settled(), timeout=90)
        assert harness.worker.ready, "the worker stopped consuming"
        outcomes = dict(stats.outcomes)
        assert stats.requeued == 0, f"an outcome could not be recorded: {outcomes}"
        assert set(outcomes) <= {"acked", "dead", "duplicate", "retry"}, outcomes
        final = sum(outcomes.values())
        assert final == len(sent), f"{final} outcomes for {len(sent)} sent: {outcomes}"
        retries = harness.call(_outbox_rows(sessions_url, fuzz_settings.schema_name))
        assert retries == outcomes.get("retry", 0), f"{retries} retry rows for {outcomes}"
        assert outcomes.get("acked", 0) >= 1 and outcomes.get("dead", 0) >= 1, outcomes
        reasons = harness.call(_reasons(sessions_url, fuzz_settings.schema_name))
        assert set(reasons) <= {"undecodable", "too_large", "unknown_topic", "exhausted"}, reasons
        print(
            f"\nfuzz: sent {len(sent)} (client could not encode {harness.unsent}: "
            f"{dict(harness.unsent_why.most_common(3))}; publisher reconnects "
            f"{harness.reconnects}), "
            f"outcomes {outcomes}, dead letters by reason {reasons}"
        )
    finally:
        harness.close()


async def _reasons(url: str, schema: str) -> dict[str, int]:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(f'SELECT reason, count(*) FROM "{schema}".dead_letters GROUP BY reason')
            )
            return {reason: count for reason, count in rows.all()}
    finally:
        await engine.dispose()


async def _outbox_rows(url: str, schema: str) -> int:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return int(await conn.scalar(text(f'SELECT count(*) FROM "{schema}".outbox')))
    finally:
        await engine.dispose()


@pytest.fixture
def sessions_url(database_url: str) -> str:
    return database_url
