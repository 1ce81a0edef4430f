"""Events nobody consumes yet: quiet backoff, a per-topic drop policy, and the outbox tools.

The relay keeps an unroutable event and retries it with a growing delay, warning once
per topic per interval; topics a deployment names may be dropped on purpose (counted);
`postroom outbox list|show|retry|discard` let a person see and act on what waits.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

from sqlalchemy import text

from postroom import Event, Outbox
from postroom.metrics import Metrics
from postroom.relay import Relay
from tests.conftest import postroom_cmd, settings_env
from tests.helpers import eventually, served_relay, wait_exit


class Unheard(Event, topic="nobody.listens"):
    n: int


class Droppable(Event, topic="drop.me"):
    n: int


async def publish(sessions, settings, *events: Event) -> list[str]:
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        return [str((await box.publish(session, event)).message_id) for event in events]


async def outbox_rows(engine, settings) -> list[tuple[str, int, str | None]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            text(
                f'SELECT topic, attempts, last_error FROM "{settings.schema_name}".outbox '
                "ORDER BY id"
            )
        )
        return [tuple(row) for row in result.all()]


async def test_the_relay_warns_once_per_topic_while_unroutable_rows_back_off(
    settings, sessions, engine, tmp_path
):
    await publish(sessions, settings, *(Unheard(n=i) for i in range(5)))
    log_path = tmp_path / "relay.log"
    async with served_relay(
        settings, log_path, POSTROOM_LOG_FORMAT="json", POSTROOM_LOG_INTERVAL="60"
    ) as relay:

        async def retried_twice() -> bool:
            rows = await outbox_rows(engine, settings)
            return len(rows) == 5 and all(attempts >= 2 for _, attempts, _ in rows)

        # Each row failed twice (at once, then after its 1 s backoff): ten failures.
        await eventually(retried_twice, timeout=20)
        _, body = await relay.status("/metrics")
        relay.process.terminate()
        assert await wait_exit(relay.process, timeout=10) == 0

    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    warnings = [e for e in events if e["level"] == "warning"]
    assert [w["event"] for w in warnings] == ["relay.unroutable"], warnings
    assert warnings[0]["topic"] == "nobody.listens"
    assert 'postroom_relay_unroutable_total{topic="nobody.listens"}' in body.decode()
    rows = await outbox_rows(engine, settings)
    assert len(rows) == 5  # kept, never dropped: the policy names no topic
    assert all("unroutable (no queue bound)" in (error or "") for _, _, error in rows)


async def test_topics_named_in_the_drop_policy_are_dropped_and_counted(
    settings, sessions, engine
):
    await publish(sessions, settings, Droppable(n=1), Droppable(n=2), Unheard(n=3))
    metrics = Metrics()
    dropping = settings.model_copy(update={"unroutable_drop": "drop.*, other.topic"})
    relay = Relay(dropping, metrics=metrics)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:

        async def settled() -> list[tuple[str, int, str | None]]:
            rows = await outbox_rows(engine, settings)
            return rows if [topic for topic, _, _ in rows] == ["nobody.listens"] else []

        [(_, attempts, _)] = await eventually(settled, timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)
    assert attempts >= 1
    assert metrics.relay_dropped.labels("drop.me")._value.get() == 2
    assert metrics.relay_published.labels("drop.me")._value.get() == 0
    assert metrics.relay_unroutable.labels("nobody.listens")._value.get() >= 1


def cli(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        postroom_cmd(*args),
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


async def test_outbox_list_show_retry_and_discard_with_dry_run_and_audit(
    settings, sessions, engine
):
    ids = await publish(sessions, settings, Unheard(n=1), Unheard(n=2), Droppable(n=3))
    run = lambda *args: asyncio.to_thread(cli, settings, *args)  # noqa: E731

    listed = await run("outbox", "list", "--topic", "nobody.listens", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["rows"]
    assert [r["message_id"] for r in rows] == ids[:2]
    assert all(r["kind"] == "event" for r in rows)
    first = rows[0]["id"]

    shown = await run("outbox", "show", str(first), "--json")
    assert json.loads(shown.stdout)["body"] == {"n": 1}

    retried = await run("outbox", "retry", str(first), "--json")  # one id: no --yes needed
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["count"] == 1

    dry = await run("outbox", "discard", "--topic", "nobody.listens", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing changed" in dry.stdout and "2 would be discarded" in dry.stdout
    assert len(await outbox_rows(engine, settings)) == 3

    unconfirmed = await run("outbox", "discard", "--topic", "nobody.listens")
    assert unconfirmed.returncode == 2
    assert "discard of 2 rows needs --yes" in unconfirmed.stderr
    nothing = await run("outbox", "discard")
    assert nothing.returncode == 2 and "give row ids, filters, or --all" in nothing.stderr

    done = await run("outbox", "discard", "--topic", "nobody.listens", "--yes", "--actor", "ana")
    assert done.returncode == 0, done.stderr
    assert "2 discarded" in done.stdout
    assert [topic for topic, _, _ in await outbox_rows(engine, settings)] == ["drop.me"]

    audit = await run("audit", "--json")
    entries = json.loads(audit.stdout)["audit"]
    assert [(e["action"], e["actor"], e["count"]) for e in entries] == [
        ("outbox.discard", "ana", 2),
        ("outbox.retry", entries[1]["actor"], 1),
    ]
    discarded = entries[0]
    assert sorted(discarded["target_ids"]) == sorted(r["id"] for r in rows)
    assert [r["message_id"] for r in discarded["details"]["rows"]] == ids[:2]
    assert discarded["details"]["filters"] == {"topic": "nobody.listens"}

    gone = await run("outbox", "list", "--topic", "nobody.listens")
    assert gone.returncode == 1  # nothing matched


def test_the_policy_warns_again_after_the_interval_with_the_count_in_between():
    from structlog.testing import capture_logs

    from postroom.unroutable import UnroutablePolicy, topic_patterns

    now = [0.0]
    policy = UnroutablePolicy(
        drop=topic_patterns(" audit.* ,  x.y"), interval=60, clock=lambda: now[0]
    )
    with capture_logs() as logs:
        for second in (0, 1, 2, 59, 61, 62):
            now[0] = second
            policy.failed(topic="a.b", unroutable=True, dropped=False, error="NO_ROUTE", retry_in=1)
    assert [(e["event"], e["failures_since_last_line"]) for e in logs] == [
        ("relay.unroutable", 0),
        ("relay.unroutable", 3),  # at 61 s: the three failures since the first line
    ]
    assert policy.drops(topic="audit.login", exchange=None, unroutable=True)
    assert policy.drops(topic="x.y", exchange=None, unroutable=True)
    assert not policy.drops(topic="x.yz", exchange=None, unroutable=True)
    assert not policy.drops(topic="audit.login", exchange="", unroutable=True)  # a retry: kept
    assert not policy.drops(topic="audit.login", exchange=None, unroutable=False)  # refused
    assert topic_patterns(" , ") is None
