"""Configure once: every write path uses the schema the relay reads, or says it does not.

A producer process configured once (`postroom.configure()`, from POSTROOM_SCHEMA) writes
with `postroom.publish` where its relay reads; a producer and relays that disagree on the
schema are reported, by the producer's first publish and by `postroom check`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import text

import postroom
from postroom import outbox as outbox_module
from postroom.check import run_checks
from postroom.errors import ConfigError
from postroom.settings import Settings, publishing_values
from tests.conftest import postroom_cmd, settings_env
from tests.helpers import bind_queue, collect, running_relay

PRODUCER = textwrap.dedent(
    """
    import asyncio, os, sys
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
    import postroom

    class Ping(postroom.Event, topic=os.environ["TEST_TOPIC"]):
        n: int

    async def main() -> None:
        postroom.configure()  # once, at start-up: POSTROOM_SCHEMA and friends
        engine = create_async_engine(os.environ["POSTROOM_DATABASE_URL"])
        async with AsyncSession(engine) as session, session.begin():
            await postroom.publish(session, Ping(n=1))
        await engine.dispose()
        print("published to", postroom.outbox.configured().schema)

    asyncio.run(main())
    """
)


def produce(settings: Settings, schema: str, topic: str) -> subprocess.CompletedProcess[str]:
    env = settings_env(settings, POSTROOM_SCHEMA=schema, TEST_TOPIC=topic)
    return subprocess.run(
        [sys.executable, "-c", PRODUCER], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
async def custom(settings: Settings, engine):
    """A schema of this test's own, created by `postroom migrate` as a team would."""
    schema = f"custom_{settings.schema_name}"
    migrate = postroom_cmd("migrate")
    env = settings_env(settings, POSTROOM_SCHEMA=schema)
    first = await asyncio.to_thread(
        subprocess.run, migrate, env=env, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert f"created schema {schema!r}" in first.stdout
    assert "applied 0001" in first.stdout, first.stdout
    again = await asyncio.to_thread(
        subprocess.run, migrate, env=env, capture_output=True, text=True, timeout=120
    )
    assert again.stdout.strip().endswith("nothing to do"), again.stdout
    yield schema
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


async def test_a_producer_configured_once_writes_where_its_relay_reads(
    settings, custom, amqp, names
):
    schema = custom
    topic = f"configured.{names}"
    queue = await bind_queue(amqp, settings.exchange, [topic], f"q.{names}")
    relay_settings = settings.model_copy(update={"schema_name": schema})
    async with running_relay(relay_settings):
        done = await asyncio.to_thread(produce, settings, schema, topic)
        assert done.returncode == 0, done.stderr
        assert f"published to {schema}" in done.stdout
        assert "no_relay_for_schema" not in done.stdout + done.stderr
        [got] = await collect(settings.amqp_url.get_secret_value(), queue, count=1)
    assert got.type == topic and got.json() == {"n": 1}


async def test_a_producer_and_relays_on_different_schemas_are_reported(
    settings, custom, engine, names
):
    schema = custom
    async with running_relay(settings):  # serves the fixture's schema, not `custom`
        done = await asyncio.to_thread(produce, settings, schema, f"stranded.{names}")
    assert done.returncode == 0, done.stderr
    assert "outbox.no_relay_for_schema" in done.stdout + done.stderr
    assert f"none serves schema {schema!r}" in done.stdout + done.stderr

    # The row waits where no relay reads; two minutes on, `postroom check` names it.
    async with engine.begin() as conn:
        await conn.execute(
            text(f"UPDATE \"{schema}\".outbox SET available_at = now() - interval '2 minutes'")
        )
    results = {r.name: r for r in await run_checks(settings)}
    relays = results["relays"]
    assert relays.ok
    assert f"schema(s) no relay serves: {schema!r} (1)" in relays.detail
    assert "POSTROOM_SCHEMA" in relays.detail


def test_configuring_twice_differently_is_refused():
    before = outbox_module._state.outbox
    try:
        first = postroom.configure(postroom.Outbox(schema="one"), replace=True)
        assert postroom.configure(postroom.Outbox(schema="one")) is first  # same: a no-op
        with pytest.raises(ConfigError, match="already configured with schema 'one'"):
            postroom.configure(postroom.Outbox(schema="two"))
        assert outbox_module.configured().schema == "one"
    finally:
        outbox_module._state.outbox = before


def test_publishing_values_come_from_the_same_variables_as_the_relays():
    values = publishing_values(
        {"POSTROOM_SCHEMA": "shop", "POSTROOM_MAX_BODY_BYTES": "2048", "POSTROOM_NOTIFY": "false"}
    )
    assert values == {"schema": "shop", "max_body_bytes": 2048, "notify": False}
    assert publishing_values({}) == {"schema": "postroom", "max_body_bytes": 1_048_576, "notify": True}
    with pytest.raises(ConfigError, match="unknown setting POSTROOM_SCHEME"):
        publishing_values({"POSTROOM_SCHEME": "shop"})


async def test_publishing_to_a_schema_without_postroom_tables_says_what_to_run(sessions, names):
    box = postroom.Outbox(schema=f"nowhere_{names}")
    with pytest.raises(ConfigError) as raised:
        async with sessions() as session, session.begin():
            await box.publish(session, Lonely(n=1))
    assert f"schema 'nowhere_{names}' has no postroom tables" in str(raised.value)
    assert "run `postroom migrate`" in str(raised.value)


class Lonely(postroom.Event, topic="configure.lonely"):
    n: int
