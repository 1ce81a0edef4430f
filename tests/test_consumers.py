"""Consumers against real PostgreSQL and RabbitMQ: inbox, retries, dead letters, crashes."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import uuid
from typing import Any

import aio_pika
import pytest
from sqlalchemy import text

from postroom import Outbox, PostroomError, testing
from postroom.dispatch import Pipeline, dispatch
from postroom.failures import Outcome
from postroom.faults import WORKER_AFTER_COMMIT, WORKER_IN_HANDLER
from postroom.message import Delivery, Message, uuid7
from postroom.settings import Settings
from postroom.testing import DeadReason
from postroom.tracing import trace_id
from tests.apps.billing import (
    EFFECTS_DDL,
    Charge,
    Charged,
    batch_router,
    ledger_calls,
    router,
)
from tests.helpers import (
    bind_queue,
    collect,
    delete_queues,
    eventually,
    running_relay,
    running_worker,
    spawn,
    wait_exit,
)


@pytest.fixture
async def app(settings: Settings, sessions, amqp):
    """Settings plus the test app's effects table; its queues are deleted afterwards."""
    async with sessions() as session, session.begin():
        await session.execute(text(EFFECTS_DDL.format(schema=settings.schema_name)))
    yield settings.model_copy(update={"worker_concurrency": 8, "shutdown_timeout": 5.0})
    await delete_queues(amqp, router)


@pytest.fixture
def pipeline(app: Settings, sessions) -> Pipeline:
    return Pipeline(
        sessions=sessions, outbox=Outbox.from_settings(app), max_body_bytes=app.max_body_bytes
    )


async def effects(sessions, settings: Settings, consumer: str) -> list[Any]:
    async with sessions() as session:
        result = await session.execute(
            text(
                f'SELECT message_id, event_id, attempt, at FROM "{settings.schema_name}".effects '
                "WHERE consumer = :c ORDER BY at"
            ),
            {"c": consumer},
        )
        return list(result.all())


async def dead_letters(sessions, settings: Settings) -> list[Any]:
    async with sessions() as session:
        result = await session.execute(
            text(f'SELECT * FROM "{settings.schema_name}".dead_letters ORDER BY id')
        )
        return list(result.mappings().all())


async def publish(sessions, settings: Settings, *events: Charge) -> list[Message]:
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        return [await box.publish(session, event) for event in events]


def delivery_of(event: Charge) -> Delivery:
    from datetime import UTC, datetime

    message = Message(
        message_id=uuid7(),
        topic=Charge.topic,
        body=event.model_dump_json().encode(),
        occurred_at=datetime.now(UTC),
        correlation_id="corr-1",
    )
    return Delivery.of(message)


async def test_same_message_twice_has_one_effect(app, sessions, pipeline):
    delivery = delivery_of(Charge(id=1))
    first = await dispatch(delivery, router["billing.charge"], pipeline)
    second = await dispatch(delivery, router["billing.charge"], pipeline)
    assert (first.outcome, second.outcome) == (Outcome.ACKED, Outcome.DUPLICATE)
    # Twice at once, as two workers would: the inbox key makes one wait for the other.
    other = delivery_of(Charge(id=2, mode="slow", sleep=0.3))
    results = await asyncio.gather(
        dispatch(other, router["billing.charge"], pipeline),
        dispatch(other, router["billing.charge"], pipeline),
    )
    assert sorted(r.outcome for r in results) == [Outcome.ACKED, Outcome.DUPLICATE]
    rows = await effects(sessions, app, "billing.charge")
    assert sorted(r.event_id for r in rows) == [1, 2]


async def test_duplicates_through_the_broker_have_one_effect(app, sessions, amqp):
    [message] = await publish(sessions, app, Charge(id=5))
    async with running_worker(app, router) as worker, running_relay(app):
        await eventually(lambda: worker.stats.outcomes.get("acked", 0) >= 2)
        # The same message again, straight to the consumer's queue, as a redelivery would be.
        channel = await amqp.channel()
        raw = Delivery.of(message)
        await channel.default_exchange.publish(
            aio_pika.Message(
                raw.body,
                message_id=raw.message_id,
                type=raw.type,
                content_type=raw.content_type,
                headers=dict(raw.headers),
            ),
            routing_key="billing.charge",
        )
        await eventually(lambda: worker.stats.outcomes.get("duplicate", 0) >= 1)
    assert len(await effects(sessions, app, "billing.charge")) == 1
    assert len(await effects(sessions, app, "billing.audit")) == 1


async def test_fails_twice_then_succeeds_on_attempt_three(app, sessions):
    attempts: list[tuple[int, float]] = []
    original = router["billing.charge"].handler
    loop = asyncio.get_running_loop()

    async def watched(event, ctx):
        attempts.append((ctx.attempt, loop.time()))
        await original(event, ctx)

    test_router = _router_with(charge=watched)
    await publish(sessions, app, Charge(id=1, mode="fail_until", n=3))
    async with running_worker(app, test_router) as worker, running_relay(app):
        await eventually(lambda: worker.stats.outcomes.get("acked", 0) >= 2)
    assert [a for a, _ in attempts] == [1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    # Backoff base 0.2 s with equal jitter: at least 0.1 s, then at least 0.2 s.
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2, gaps
    [applied] = await effects(sessions, app, "billing.charge")
    assert applied.attempt == 3
    # The other consumer of the topic saw the message once, never the retries.
    assert [r.attempt for r in await effects(sessions, app, "billing.audit")] == [1]
    assert worker.stats.outcomes == {"acked": 2, "retry": 2}


async def test_always_failing_message_is_dead_after_max_attempts_others_flow(app, sessions):
    await publish(sessions, app, Charge(id=1, mode="always"))
    async with running_worker(app, router) as worker, running_relay(app):
        await eventually(lambda: worker.stats.outcomes.get("retry", 0) >= 1)
        await publish(sessions, app, *[Charge(id=i) for i in range(10, 20)])
        # The healthy messages are done while the poison one is still waiting to retry.
        await eventually(lambda: worker.stats.outcomes.get("acked", 0) >= 21)
        assert worker.stats.outcomes.get("dead", 0) == 0
        await eventually(lambda: worker.stats.outcomes.get("dead", 0) == 1)
    [letter] = await dead_letters(sessions, app)
    assert letter["consumer"] == "billing.charge" and letter["reason"] == "exhausted"
    assert letter["error_type"] == "TimeoutError"
    assert letter["error_message"] == "the payment provider timed out"
    assert letter["attempts"] == 3 and "Traceback" in letter["traceback"]
    assert letter["first_failed_at"] < letter["last_failed_at"]
    assert letter["topic"] == "billing.charge" and json.loads(letter["body"])["id"] == 1
    assert letter["headers"]["postroom-attempt"] == 3
    assert sorted(r.event_id for r in await effects(sessions, app, "billing.charge")) == list(
        range(10, 20)
    )


async def test_reject_and_malformed_messages_are_dead_at_once(app, sessions, amqp):
    await publish(sessions, app, Charge(id=1, mode="reject"))
    good_id = str(uuid.uuid4())
    raw = [
        aio_pika.Message(
            b"{not json",
            message_id=str(uuid.uuid4()),
            type="billing.charge",
            content_type="application/json",
        ),
        aio_pika.Message(
            b'{"id": 1}',
            message_id=str(uuid.uuid4()),
            type="billing.charge",
            content_type="text/plain",
        ),
        aio_pika.Message(
            b'{"id": 1}',
            message_id=str(uuid.uuid4()),
            type="billing.unknown",
            content_type="application/json",
        ),
        aio_pika.Message(
            b'{"id": 1}', message_id=str(uuid.uuid4()), content_type="application/json"
        ),
        aio_pika.Message(
            b'{"id": "x"}',
            message_id=str(uuid.uuid4()),
            type="billing.charge",
            content_type="application/json",
        ),
        aio_pika.Message(
            b'{"id": 1}',
            message_id="not-a-uuid",
            type="billing.charge",
            content_type="application/json",
        ),
        aio_pika.Message(
            b" " * 3000,
            message_id=str(uuid.uuid4()),
            type="billing.charge",
            content_type="application/json",
        ),
        aio_pika.Message(
            b'{"id": 7}', message_id=good_id, type="billing.charge", content_type="application/json"
        ),
    ]
    small = app.model_copy(update={"max_body_bytes": 2048})
    async with running_worker(small, router) as worker, running_relay(small):
        channel = await amqp.channel()
        for message in raw:
            await channel.default_exchange.publish(message, routing_key="billing.charge")
        await eventually(lambda: worker.stats.outcomes.get("dead", 0) >= 8)
        await eventually(lambda: worker.stats.outcomes.get("acked", 0) >= 2)
        assert worker.ready
    letters = await dead_letters(sessions, app)
    reasons = sorted(letter["reason"] for letter in letters)
    assert reasons == sorted(
        [
            "rejected",
            "undecodable",
            "undecodable",
            "unknown_topic",
            "undecodable",
            "undecodable",
            "undecodable",
            "too_large",
        ]
    )
    rejected = next(letter for letter in letters if letter["reason"] == "rejected")
    assert rejected["attempts"] == 1 and rejected["error_message"] == "card number is invalid"
    assert all(letter["body"] is not None for letter in letters)
    by_text = {letter["error_message"] for letter in letters}
    assert any("not a UUID" in t for t in by_text)
    assert any("content type 'text/plain'" in t for t in by_text)
    assert any("no type property" in t for t in by_text)
    assert any("payload does not match Charge" in t for t in by_text)
    assert any("limit is 2048" in t for t in by_text)
    assert [r.event_id for r in await effects(sessions, app, "billing.charge")] == [7]


async def test_worker_killed_in_handler_or_after_commit_applies_once(app, sessions):
    [in_handler] = await publish(sessions, app, Charge(id=1))
    async with running_relay(app):
        crashing = spawn(
            app, "worker", "tests.apps.billing:router", POSTROOM_CRASH_AT=WORKER_IN_HANDLER
        )
        assert await wait_exit(crashing) == -signal.SIGKILL
        assert await effects(sessions, app, "billing.charge") == []  # rolled back
        crashing = spawn(
            app, "worker", "tests.apps.billing:router", POSTROOM_CRASH_AT=WORKER_AFTER_COMMIT
        )
        assert await wait_exit(crashing) == -signal.SIGKILL
        committed = len(await effects(sessions, app, "billing.charge")) + len(
            await effects(sessions, app, "billing.audit")
        )
        assert committed == 1  # one handler committed, then the process died before its ack
        async with running_worker(app, router) as worker:
            await eventually(lambda: sum(worker.stats.outcomes.values()) >= 2)
            assert worker.stats.outcomes.get("duplicate", 0) == 1
    assert [r.message_id for r in await effects(sessions, app, "billing.charge")] == [
        in_handler.message_id
    ]
    assert [r.message_id for r in await effects(sessions, app, "billing.audit")] == [
        in_handler.message_id
    ]


async def test_message_that_kills_every_worker_reaches_dead_letters(app, sessions):
    limited = app.model_copy(update={"delivery_limit": 2})
    await publish(sessions, limited, Charge(id=1, mode="crash"))
    async with running_relay(limited):
        for _ in range(6):
            process = spawn(limited, "worker", "tests.apps.billing:router")
            try:
                letters = await eventually(
                    lambda p=process: _dead_or_exited(sessions, limited, p), timeout=30
                )
            finally:
                if process.poll() is None:
                    process.terminate()
                    await wait_exit(process)
            if letters is not True:
                break
        else:
            raise AssertionError("the broker never dead-lettered the message")
        letters = await dead_letters(sessions, limited)
        [letter] = [x for x in letters if x["consumer"] == "billing.charge"]
        assert letter["reason"] == "delivery_limit"
        assert "deliveries" in letter["error_message"]
        # The crashes also cost the other consumer's in-flight copy its deliveries: it is
        # either applied exactly once or, as collateral, dead-lettered too; never both.
        # It may still wait in its queue (the last worker was stopped as soon as the
        # charge's letter appeared): a worker that no longer crashes settles it.
        async with running_worker(limited, router):
            settled = await eventually(
                lambda: _audit_settled(sessions, limited), timeout=30
            )
    applied, audit_letters = settled
    assert (applied, audit_letters) in ((1, 0), (0, 1))
    assert await effects(sessions, limited, "billing.charge") == []


async def _audit_settled(sessions, settings):
    applied = len(await effects(sessions, settings, "billing.audit"))
    letters = [x for x in await dead_letters(sessions, settings) if x["consumer"] == "billing.audit"]
    return (applied, len(letters)) if applied or letters else None


async def _dead_or_exited(sessions, settings, process):
    letters = await dead_letters(sessions, settings)
    if letters:
        return letters
    return process.poll() is not None  # True: crashed, start another one


async def test_follow_up_event_commits_with_the_handler_and_carries_causation(
    app, sessions, amqp, names
):
    queue = await bind_queue(amqp, app.exchange, ["billing.charged"], f"charged.{names}")
    [incoming] = await publish(sessions, app, Charge(id=3, mode="follow_up"))
    async with running_worker(app, router), running_relay(app):
        [follow_up] = await collect(app.amqp_url.get_secret_value(), queue, count=1)
    assert follow_up.json() == {"id": 3}
    assert follow_up.type == Charged.topic
    assert follow_up.headers["postroom-causation-id"] == str(incoming.message_id)
    assert follow_up.correlation_id == incoming.correlation_id
    assert follow_up.headers["postroom-key"] == "charge-3"
    assert trace_id(follow_up.headers["traceparent"]) == trace_id(incoming.traceparent)
    assert follow_up.headers["traceparent"] != incoming.traceparent  # a child span


def _router_with(**handlers: Any):
    import postroom

    replaced = postroom.Router()
    for consumer in router:
        override = handlers.get(consumer.name.split(".")[-1])
        replaced.consumer(
            consumer.name,
            consumer.event_type,
            max_attempts=consumer.retry.max_attempts,
            backoff=consumer.retry.base,
            backoff_cap=consumer.retry.cap,
        )(override or consumer.handler)
    return replaced


async def test_batch_dispatch_isolates_each_failing_message(app, sessions, pipeline):
    from postroom.dispatch import dispatch_batch

    ok = delivery_of(Charge(id=1))
    deliveries = [
        ok,
        delivery_of(Charge(id=2, mode="reject")),
        delivery_of(Charge(id=3, mode="fail_until", n=2)),
        Delivery(
            body=b"{broken",
            message_id=str(uuid.uuid4()),
            type="billing.charge",
            content_type="application/json",
        ),
        ok,  # the same message again inside the batch
        delivery_of(Charge(id=4)),
    ]
    results = await dispatch_batch(deliveries, router["billing.charge"], pipeline)
    assert [r.outcome for r in results] == [
        Outcome.ACKED,
        Outcome.DEAD,
        Outcome.RETRY,
        Outcome.DEAD,
        Outcome.DUPLICATE,
        Outcome.ACKED,
    ]
    # The failing handlers left no writes; the rest committed once.
    assert sorted(r.event_id for r in await effects(sessions, app, "billing.charge")) == [1, 4]
    assert sorted(letter["reason"] for letter in await dead_letters(sessions, app)) == [
        "rejected",
        "undecodable",
    ]
    async with sessions() as session:
        retries = (
            await session.execute(
                text(f'SELECT routing_key, exchange FROM "{app.schema_name}".outbox')
            )
        ).all()
    assert retries == [("billing.charge", "")]
    # Failed handlers gave up their inbox claims, so their retries are not duplicates.
    async with sessions() as session:
        claimed = (
            await session.execute(
                text(f'SELECT message_id FROM "{app.schema_name}".inbox WHERE consumer = :c'),
                {"c": "billing.charge"},
            )
        ).scalars()
        assert sorted(str(m) for m in claimed) == sorted(
            d.message_id for d in (deliveries[0], deliveries[5])
        )


@pytest.mark.parametrize("linger", [0.0, 0.01], ids=["natural-batches", "lingering-batches"])
async def test_worker_in_batch_mode_applies_each_message_once(app, sessions, linger):
    batched = app.model_copy(update={"worker_batch_size": 25, "worker_batch_wait": linger})
    await publish(
        sessions,
        batched,
        *[Charge(id=i) for i in range(100)],
        Charge(id=1000, mode="fail_until", n=2),
    )
    async with running_worker(batched, router) as worker, running_relay(batched):
        await eventually(lambda: worker.stats.outcomes.get("acked", 0) >= 202)
    assert worker.stats.outcomes == {"acked": 202, "retry": 1}
    charged = [r.event_id for r in await effects(sessions, app, "billing.charge")]
    assert sorted(charged) == [*range(100), 1000]
    assert len(await effects(sessions, app, "billing.audit")) == 101


# Batch consumers (batch=True): one handler call per batch, same guarantees.

ledger = batch_router["billing.ledger"]


@pytest.fixture
async def books(app: Settings, amqp):
    """The app's settings for the batch router; its calls are counted afresh."""
    ledger_calls.clear()
    yield app
    await delete_queues(amqp, batch_router)


async def inbox_transactions(sessions, settings: Settings, consumer: str) -> int:
    """How many transactions wrote *consumer*'s inbox rows (their distinct xmin)."""
    async with sessions() as session:
        result = await session.execute(
            text(
                f'SELECT count(DISTINCT xmin::text) FROM "{settings.schema_name}".inbox '
                "WHERE consumer = :c"
            ),
            {"c": consumer},
        )
        return int(result.scalar_one())


async def test_batch_handler_gets_the_fresh_events_once_in_one_transaction(books, sessions):
    seen_before = testing.message(Charge(id=0))
    assert (
        await testing.deliver(seen_before, ledger, sessions, schema=books.schema_name)
    ).outcome is Outcome.ACKED
    assert ledger_calls == [1]  # one message dispatched alone: a list of one
    fresh = [testing.message(Charge(id=i)) for i in (1, 2, 3)]
    broken = Delivery(
        body=b"{broken",
        message_id=str(uuid.uuid4()),
        type="billing.charge",
        content_type="application/json",
    )
    batch = [fresh[0], seen_before, fresh[1], broken, fresh[0], fresh[2]]
    results = await testing.deliver_batch(batch, ledger, sessions, schema=books.schema_name)
    assert [r.outcome for r in results] == [
        Outcome.ACKED,
        Outcome.DUPLICATE,
        Outcome.ACKED,
        Outcome.DEAD,
        Outcome.DUPLICATE,
        Outcome.ACKED,
    ]
    assert ledger_calls == [1, 3]  # the duplicates and the undecodable one never shown
    rows = await effects(sessions, books, "billing.ledger")
    assert sorted(r.event_id for r in rows) == [0, 1, 2, 3]
    assert {r.message_id for r in rows[1:]} == {m.message_id for m in fresh}
    assert [letter["reason"] for letter in await dead_letters(sessions, books)] == ["undecodable"]
    assert await inbox_transactions(sessions, books, "billing.ledger") == 2  # one per dispatch


async def test_poison_in_a_batch_is_handled_alone_and_the_rest_commit(books, sessions):
    ok = [testing.message(Charge(id=i)) for i in (1, 2)]
    rejected = testing.message(Charge(id=3, mode="reject"))
    flaky = testing.message(Charge(id=4, mode="fail_until", n=2))
    doomed = testing.message(Charge(id=5, mode="always"))
    results = await testing.deliver_batch(
        [ok[0], rejected, flaky, doomed, ok[1]], ledger, sessions, schema=books.schema_name
    )
    assert [r.outcome for r in results] == [
        Outcome.ACKED,
        Outcome.DEAD,
        Outcome.RETRY,
        Outcome.RETRY,
        Outcome.ACKED,
    ]
    # The batch of five failed and rolled back; then each ran alone, in its own transaction.
    assert ledger_calls == [5, 1, 1, 1, 1, 1]
    assert sorted(r.event_id for r in await effects(sessions, books, "billing.ledger")) == [1, 2]
    assert await inbox_transactions(sessions, books, "billing.ledger") == 2
    [letter] = await testing.dead_letters(sessions, ledger, schema=books.schema_name)
    assert (letter.message_id, letter.reason) == (str(rejected.message_id), DeadReason.REJECTED)
    assert letter.error_message == "charge 3 is invalid"
    # Retries, attempts and backoff as for any consumer: the flaky one succeeds on its
    # second attempt, the doomed one is dead after max_attempts (3) with its own reason.
    second = await testing.deliver_retries(ledger, sessions, schema=books.schema_name)
    assert sorted((r.message_id, r.outcome, r.attempt) for r in second) == sorted(
        [(str(flaky.message_id), Outcome.ACKED, 2), (str(doomed.message_id), Outcome.RETRY, 2)]
    )
    third = await testing.deliver_retries(ledger, sessions, schema=books.schema_name)
    assert [(r.message_id, r.outcome, r.attempt) for r in third] == [
        (str(doomed.message_id), Outcome.DEAD, 3)
    ]
    assert await testing.deliver_retries(ledger, sessions, schema=books.schema_name) == []
    letters = {
        d.message_id: d
        for d in await testing.dead_letters(sessions, ledger, schema=books.schema_name)
    }
    assert letters[str(doomed.message_id)].reason is DeadReason.EXHAUSTED
    assert letters[str(doomed.message_id)].attempts == 3
    assert sorted(r.event_id for r in await effects(sessions, books, "billing.ledger")) == [
        1,
        2,
        4,
    ]


async def test_follow_ups_of_a_batch_name_each_its_own_cause(books, sessions):
    incoming = [testing.message(Charge(id=i, mode="follow_up")) for i in (1, 2, 3)]
    results = await testing.deliver_batch(incoming, ledger, sessions, schema=books.schema_name)
    assert [r.outcome for r in results] == [Outcome.ACKED] * 3
    assert ledger_calls == [3]
    follow_ups = await testing.published_messages(sessions, Charged.topic, schema=books.schema_name)
    assert len(follow_ups) == 3
    by_cause = {m.causation_id: m for m in follow_ups}
    for message in incoming:
        follow_up = by_cause[str(message.message_id)]
        assert follow_up.correlation_id == message.correlation_id
        assert follow_up.key == f"charge-{json.loads(message.body)['id']}"
        assert trace_id(follow_up.traceparent) == trace_id(message.traceparent)


async def test_a_cause_from_outside_the_batch_is_refused(books, sessions, pipeline):
    from postroom import BatchContext
    from postroom.router import Context

    inside, outside = testing.message(Charge(id=1)), testing.message(Charge(id=2))
    async with sessions() as session, session.begin():
        connection = await session.connection()
        context = Context(
            connection=connection, message=inside, consumer=ledger.name, outbox=pipeline.outbox
        )
        with pytest.raises(PostroomError, match="not a message of this batch"):
            await BatchContext(context, [inside]).publish(Charged(id=2), cause=outside)


def test_a_batch_consumer_cannot_be_ordered():
    import postroom

    with pytest.raises(PostroomError, match="batch=True cannot be ordered=True"):
        postroom.Router().consumer("billing.keyed", Charge, batch=True, ordered=True)  # type: ignore[call-overload]


@pytest.mark.parametrize("size", [1, 25], ids=["per-message-worker", "batching-worker"])
async def test_worker_runs_a_batch_consumer_once_per_message(books, sessions, size):
    batched = books.model_copy(update={"worker_batch_size": size, "worker_batch_wait": 0.01})
    await publish(
        sessions,
        batched,
        *[Charge(id=i) for i in range(100)],
        Charge(id=1000, mode="fail_until", n=2),
    )
    async with running_worker(batched, batch_router) as worker, running_relay(batched):
        await eventually(lambda: worker.stats.outcomes.get("acked", 0) >= 101)
    assert worker.stats.outcomes == {"acked": 101, "retry": 1}
    charged = [r.event_id for r in await effects(sessions, books, "billing.ledger")]
    assert sorted(charged) == [*range(100), 1000]
    if size == 1:
        assert set(ledger_calls) == {1}
    else:
        assert max(ledger_calls) > 1 and max(ledger_calls) <= size, ledger_calls
