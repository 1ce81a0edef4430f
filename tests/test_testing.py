"""postroom.testing, tested the way a service team would use it.

The service under test is tests/apps/wallet.py. These tests touch only postroom.testing,
the public ``postroom`` names and the service's own code, against real PostgreSQL.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import inspect, select

from postroom import Outbox, testing
from postroom.message import Delivery
from postroom.testing import DeadReason, Outcome
from tests.apps.wallet import (
    Base,
    OrderCancelled,
    Wallet,
    WalletCredited,
    WalletOpened,
    open_wallet,
    router,
)

refund = router["wallet.refund"]


@pytest.fixture
async def schema(engine, names):
    """postroom's tables in a schema of this test's own, and the wallet's tables."""
    name = f"wallet_{names}"
    await testing.install(engine, name)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    yield name
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
    await testing.uninstall(engine, name)


async def balance(sessions, customer_id: int) -> int | None:
    async with sessions() as session:
        return await session.scalar(
            select(Wallet.balance_cents).where(Wallet.customer_id == customer_id)
        )


async def test_published_sees_the_open_transaction_then_the_commit(sessions, schema):
    outbox = Outbox(schema=schema)
    async with sessions() as session:
        async with session.begin():
            await open_wallet(session, outbox, customer_id=1)
            # Before commit: this transaction sees its event; nobody else does.
            assert await testing.published(session, WalletOpened, schema=schema) == [
                WalletOpened(customer_id=1)
            ]
            assert await testing.published(sessions, WalletOpened, schema=schema) == []
        # After commit, from the same session (no transaction left open) and any other.
        assert await testing.published(session, WalletOpened, schema=schema) == [
            WalletOpened(customer_id=1)
        ]
        assert not session.in_transaction()
    [message] = await testing.published_messages(sessions, "wallet.opened", schema=schema)
    assert message.key == "wallet-1" and message.attempt == 1
    assert await testing.published(sessions, WalletCredited, schema=schema) == []


async def test_rolled_back_work_publishes_nothing(sessions, schema):
    outbox = Outbox(schema=schema)
    with pytest.raises(RuntimeError):
        async with sessions() as session, session.begin():
            await open_wallet(session, outbox, customer_id=2)
            assert len(await testing.published(session, WalletOpened, schema=schema)) == 1
            raise RuntimeError("the request failed after publishing")
    assert await testing.published(sessions, WalletOpened, schema=schema) == []
    assert await balance(sessions, 2) is None


async def test_the_same_message_twice_credits_once(sessions, schema):
    async with sessions() as session, session.begin():
        await open_wallet(session, Outbox(schema=schema), customer_id=7)
    message = testing.message(OrderCancelled(order_id=70, customer_id=7, refund_cents=1250))

    first = await testing.deliver(message, refund, sessions, schema=schema)
    again = await testing.deliver(message, refund, sessions, schema=schema)

    assert (first.outcome, again.outcome) == (Outcome.ACKED, Outcome.DUPLICATE)
    assert again.message_id == str(message.message_id)
    assert await balance(sessions, 7) == 1250
    [credited] = await testing.published_messages(sessions, "wallet.credited", schema=schema)
    assert WalletCredited.model_validate_json(credited.body) == WalletCredited(
        customer_id=7, cents=1250, balance_cents=1250
    )
    assert credited.causation_id == str(message.message_id)
    assert credited.correlation_id == message.correlation_id
    # A different message with the same payload is a different refund: it applies.
    third = await testing.deliver(
        OrderCancelled(order_id=71, customer_id=7, refund_cents=50), refund, sessions, schema=schema
    )
    assert third.outcome is Outcome.ACKED and await balance(sessions, 7) == 1300


async def test_a_published_message_is_delivered_as_the_relay_would(sessions, schema):
    # The shop publishes in its own transaction; the wallet gets exactly that message.
    async with sessions() as session, session.begin():
        await open_wallet(session, Outbox(schema=schema), customer_id=3)
        await Outbox(schema=schema).publish(
            session, OrderCancelled(order_id=30, customer_id=3, refund_cents=99), key="order-30"
        )
    [sent] = await testing.published_messages(sessions, OrderCancelled.topic, schema=schema)
    result = await testing.deliver(sent, refund, sessions, schema=schema)
    assert result.outcome is Outcome.ACKED and result.message_id == str(sent.message_id)
    assert await balance(sessions, 3) == 99


async def test_failing_handler_retries_then_becomes_a_dead_letter(sessions, schema):
    message = testing.message(OrderCancelled(order_id=40, customer_id=4, refund_cents=500))

    first = await testing.deliver(message, refund, sessions, schema=schema)
    assert (first.outcome, first.attempt) == (Outcome.RETRY, 1)
    assert first.error == "LookupError: customer 4 has no wallet yet"
    [retry] = await testing.pending_retries(sessions, refund, schema=schema)
    assert (retry.message_id, retry.attempt) == (message.message_id, 2)
    # A retry goes to this consumer alone: it is not a publication of the topic.
    assert await testing.published(sessions, OrderCancelled, schema=schema) == []

    [second] = await testing.deliver_retries(refund, sessions, schema=schema)
    assert (second.outcome, second.attempt) == (Outcome.RETRY, 2)
    [third] = await testing.deliver_retries(refund, sessions, schema=schema)
    assert (third.outcome, third.attempt) == (Outcome.DEAD, 3)
    assert third.reason is DeadReason.EXHAUSTED
    assert await testing.deliver_retries(refund, sessions, schema=schema) == []

    [letter] = await testing.dead_letters(sessions, refund, schema=schema)
    assert letter.message_id == str(message.message_id) and letter.attempts == 3
    assert (letter.reason, letter.error_type) == (DeadReason.EXHAUSTED, "LookupError")
    assert letter.first_failed_at < letter.last_failed_at
    assert OrderCancelled.model_validate_json(letter.body).order_id == 40
    assert await testing.published(sessions, WalletCredited, schema=schema) == []


async def test_a_retry_succeeds_once_the_cause_is_gone(sessions, schema):
    message = testing.message(OrderCancelled(order_id=50, customer_id=5, refund_cents=300))
    assert (await testing.deliver(message, refund, sessions, schema=schema)).outcome is (
        Outcome.RETRY
    )
    async with sessions() as session, session.begin():
        await open_wallet(session, Outbox(schema=schema), customer_id=5)

    [result] = await testing.deliver_retries(refund, sessions, schema=schema)

    assert (result.outcome, result.attempt) == (Outcome.ACKED, 2)
    assert await balance(sessions, 5) == 300
    assert await testing.pending_retries(sessions, refund, schema=schema) == []
    assert await testing.dead_letters(sessions, schema=schema) == []
    # The redelivered original (a broker redelivery of attempt 1) is now a duplicate.
    assert (await testing.deliver(message, refund, sessions, schema=schema)).outcome is (
        Outcome.DUPLICATE
    )


async def test_rejected_malformed_and_exhausted_messages_are_dead_at_once(sessions, schema):
    rejected = await testing.deliver(
        OrderCancelled(order_id=60, customer_id=6, refund_cents=0), refund, sessions, schema=schema
    )
    malformed = await testing.deliver(
        Delivery(
            body=b'{"order_id": "sixty"}',
            content_type="application/json",
            message_id="0190a8e4-0000-7000-8000-000000000060",
            type=OrderCancelled.topic,
        ),
        refund,
        sessions,
        schema=schema,
    )
    last_try = await testing.deliver(
        OrderCancelled(order_id=61, customer_id=6, refund_cents=10),
        refund,
        sessions,
        schema=schema,
        attempt=refund.retry.max_attempts,
    )
    assert [(r.outcome, r.reason) for r in (rejected, malformed, last_try)] == [
        (Outcome.DEAD, DeadReason.REJECTED),
        (Outcome.DEAD, DeadReason.UNDECODABLE),
        (Outcome.DEAD, DeadReason.EXHAUSTED),
    ]
    letters = await testing.dead_letters(sessions, refund, schema=schema)
    assert [letter.reason for letter in letters] == [
        DeadReason.REJECTED,
        DeadReason.UNDECODABLE,
        DeadReason.EXHAUSTED,
    ]
    assert letters[0].error_message == "refund of 0 cents for order 60"
    assert await testing.pending_retries(sessions, refund, schema=schema) == []


async def test_install_is_idempotent_and_uninstall_removes_the_schema(engine, names):
    name = f"inst_{names}"
    await testing.install(engine, name)
    await testing.install(engine, name)
    async with engine.connect() as connection:
        tables = await connection.run_sync(
            lambda sync: sorted(inspect(sync).get_table_names(schema=name))
        )
    assert tables == ["audit", "dead_letters", "inbox", "outbox", "pauses"]
    await testing.uninstall(engine, name)
    async with engine.connect() as connection:
        schemas = await connection.run_sync(lambda sync: inspect(sync).get_schema_names())
    assert name not in schemas
    with pytest.raises(ValueError, match="SQL identifier"):
        await testing.install(engine, 'bad"; DROP TABLE x; --')


def test_the_module_is_complete_and_imported_explicitly():
    defined = {
        name
        for name, value in vars(testing).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == testing.__name__
    }
    assert defined <= set(testing.__all__), defined - set(testing.__all__)
    assert all(hasattr(testing, name) for name in testing.__all__)
    code = "import sys, postroom; print('postroom.testing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
