"""Ops tooling against real PostgreSQL and RabbitMQ: dead letters, outbox status, prune, audit."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, text
from typer.testing import CliRunner

from postroom import Outbox, deadletters
from postroom.cli import app as cli_app
from postroom.deadletters import DeadLetter, DeadReason, DeadStatus
from postroom.errors import TableBusyError
from postroom.filters import Filters
from postroom.lookup import group_letters, list_letters
from postroom.message import Message, json_safe, uuid7
from postroom.prune import prune
from postroom.replay import replay
from postroom.runs import Verdict
from postroom.settings import Settings
from postroom.tables import dead_letters, schema_map
from postroom.tables import outbox as outbox_table
from tests.apps.repairable import DDL, Posted, router
from tests.conftest import postroom_cmd, settings_env
from tests.helpers import (
    delete_queues,
    eventually,
    running_relay,
    running_worker,
    settled,
    spawn,
    wait_exit,
)

APPLY, NOTIFY = "books.apply", "books.notify"


@pytest.fixture
async def books(settings: Settings, sessions, amqp):
    """Settings plus the test app's tables; its fixed-name queues are deleted afterwards."""
    async with sessions() as session, session.begin():
        for ddl in DDL:
            await session.execute(text(ddl.format(schema=settings.schema_name)))
    yield settings.model_copy(update={"worker_concurrency": 8, "shutdown_timeout": 5.0})
    await delete_queues(amqp, router)


def amqp_url(settings: Settings) -> str:
    return settings.amqp_url.get_secret_value()


async def cli(settings: Settings, *args: str) -> Any:
    """Run `postroom ARGS` in-process (a thread: it runs its own event loop)."""
    runner = CliRunner()
    env = settings_env(settings)
    return await asyncio.to_thread(runner.invoke, cli_app, list(args), env=env)


def start(settings: Settings, *args: str) -> subprocess.Popen[bytes]:
    """Start `postroom ARGS` as a real process, its stdout and stderr captured."""
    return subprocess.Popen(
        postroom_cmd(*args),
        env=settings_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def sql(sessions, statement: str, **params: Any) -> list[Any]:
    async with sessions() as session, session.begin():
        result = await session.execute(text(statement), params)
        return list(result.all()) if result.returns_rows else []


async def effects(sessions, schema: str, consumer: str) -> list[Any]:
    return await sql(
        sessions,
        f'SELECT message_id, event_id, attempt, replays FROM "{schema}".books_effects '
        "WHERE consumer = :c ORDER BY at",
        c=consumer,
    )


async def letters(sessions, schema: str) -> dict[int, Any]:
    rows = await sql(sessions, f'SELECT * FROM "{schema}".dead_letters ORDER BY id')
    return {row.id: row for row in rows}


async def snapshot(sessions, schema: str) -> dict[str, list[Any]]:
    """Every row (with its xmin, so even a no-op UPDATE shows) of postroom's tables."""
    return {
        table: await sql(sessions, f'SELECT xmin::text, * FROM "{schema}".{table} ORDER BY 2, 3')
        for table in ("outbox", "inbox", "dead_letters", "audit")
    }


async def seed(
    sessions,
    schema: str,
    *,
    consumer: str = APPLY,
    event_id: int = 1,
    error_type: str = "TimeoutError",
    error_message: str = "books timed out after 100 ms",
    reason: DeadReason = DeadReason.EXHAUSTED,
    status: DeadStatus = DeadStatus.DEAD,
    age: timedelta = timedelta(0),
    replays: int = 0,
    topic: str = Posted.topic,
) -> int:
    """Record a dead letter of a decodable Posted message, as dispatch would; return its id."""
    message = Message(
        message_id=uuid7(),
        topic=topic,
        body=Posted(id=event_id).model_dump_json().encode(),
        occurred_at=datetime.now(UTC),
        correlation_id=f"corr-{event_id}",
        extra_headers={"postroom-replays": replays} if replays else {},
    )
    now = datetime.now(UTC)
    letter = DeadLetter(
        consumer=consumer,
        message_id=str(message.message_id),
        topic=topic,
        reason=reason,
        error_type=error_type,
        error_message=error_message,
        traceback="Traceback (most recent call last): ...",
        attempts=1,
        first_failed_at=now,
        last_failed_at=now,
        headers=json_safe(message.amqp_headers()),
        body=message.body,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
    )
    async with sessions() as session, session.begin():
        assert await deadletters.record(session, letter, schema=schema)
    [row] = await sql(
        sessions,
        f'UPDATE "{schema}".dead_letters SET status = :s, created_at = now() - CAST(:age AS interval), '
        "updated_at = now() - CAST(:age AS interval) WHERE message_id = :m RETURNING id",
        s=status.value,
        age=age,
        m=letter.message_id,
    )
    return int(row.id)


async def seed_undecodable(sessions, schema: str) -> int:
    letter = DeadLetter(
        consumer=APPLY,
        message_id="not-a-uuid",
        topic=Posted.topic,
        reason=DeadReason.UNDECODABLE,
        error_type="postroom.errors.DecodeError",
        error_message="message_id 'not-a-uuid' is not a UUID",
        traceback=None,
        attempts=1,
        first_failed_at=datetime.now(UTC),
        last_failed_at=datetime.now(UTC),
        headers={},
        body=b"\xff\xfe not json",
        content_type="text/plain",
        correlation_id=None,
    )
    async with sessions() as session, session.begin():
        assert await deadletters.record(session, letter, schema=schema)
    [row] = await sql(
        sessions, f"SELECT id FROM \"{schema}\".dead_letters WHERE message_id = 'not-a-uuid'"
    )
    return int(row.id)


async def test_poison_replayed_by_filter_reaches_only_the_failing_consumer_once(
    books, sessions, engine
):
    schema = books.schema_name
    outbox = Outbox.from_settings(books)
    events = [Posted(id=i, fail="timeout") for i in (1, 2, 3, 4)]
    events += [Posted(id=5, fail="missing"), Posted(id=6, fail="missing")]
    events += [Posted(id=7), Posted(id=8), Posted(id=9, fail="always")]
    async with sessions() as session, session.begin():
        messages = {e.id: await outbox.publish(session, e) for e in events}

    def outcomes() -> dict[str, int]:
        return dict(worker.stats.outcomes)

    async with running_worker(books, router) as worker, running_relay(books):
        await eventually(lambda: outcomes().get("dead", 0) == 7 and outcomes().get("acked") == 11)
        groups = await group_letters(engine, schema, Filters(status=DeadStatus.DEAD))
        assert {(g.consumer, g.error_type, g.shape, g.count) for g in groups} == {
            (APPLY, "TimeoutError", "books timed out after <n> ms", 4),
            (APPLY, "LookupError", "account <str> not found", 2),
            (APPLY, "RuntimeError", "this entry can never be applied", 1),
        }
        first = await letters(sessions, schema)
        by_event = {json.loads(row.body)["id"]: row.id for row in first.values()}

        await sql(sessions, f'UPDATE "{schema}".switches SET broken = false')  # the fix
        report = await replay(
            engine, schema, Filters.parse(error_type="TimeoutError"), outbox=outbox, actor="ops"
        )
        assert report.complete and report.ids(Verdict.REPLAYED) == sorted(
            by_event[i] for i in (1, 2, 3, 4)
        )
        await eventually(lambda: outcomes()["acked"] == 15)

        # The loop guard: a message that fails again after a replay carries its count.
        again = await replay(
            engine, schema, Filters(ids=(by_event[9],)), outbox=outbox, actor="ops", max_replays=1
        )
        assert again.complete
        await eventually(lambda: outcomes()["dead"] == 8)
        flagged = await replay(
            engine,
            schema,
            Filters.parse(error_type="RuntimeError"),
            outbox=outbox,
            actor="ops",
            max_replays=1,
        )
        [item] = flagged.items
        assert item.verdict is Verdict.LOOP_GUARD and not flagged.complete
        [again_dead] = [
            r
            for r in (await letters(sessions, schema)).values()
            if r.status == "dead" and json.loads(r.body)["id"] == 9
        ]
        assert item.id == again_dead.id and again_dead.replays == 1
        forced = await replay(
            engine,
            schema,
            Filters.parse(error_type="RuntimeError"),
            outbox=outbox,
            actor="ops",
            max_replays=1,
            force=True,
        )
        assert forced.complete
        await eventually(lambda: outcomes()["dead"] == 9)

        # A double replay (the row put back to dead by hand) is absorbed by the inbox.
        await sql(
            sessions,
            f"UPDATE \"{schema}\".dead_letters SET status = 'dead' WHERE id = :i",
            i=by_event[1],
        )
        double = await replay(engine, schema, Filters(ids=(by_event[1],)), outbox=outbox, actor="x")
        assert double.complete
        await eventually(lambda: outcomes().get("duplicate", 0) == 1)
        nothing = await replay(
            engine, schema, Filters.parse(error_type="TimeoutError"), outbox=outbox, actor="ops"
        )
        assert nothing.items == () and not nothing.complete
        await eventually(
            lambda: settled(engine, schema, amqp_url(books), [APPLY, NOTIFY])
        )  # nothing in flight
    assert outcomes() == {"acked": 15, "dead": 9, "duplicate": 1}

    applied = await effects(sessions, schema, APPLY)
    assert sorted(r.event_id for r in applied) == [1, 2, 3, 4, 7, 8]
    assert len({r.message_id for r in applied}) == 6
    replayed = {r.event_id: (r.attempt, r.replays) for r in applied if r.event_id <= 4}
    assert replayed == {i: (1, 1) for i in (1, 2, 3, 4)}
    assert {r.message_id for r in applied if r.event_id <= 4} == {
        messages[i].message_id for i in (1, 2, 3, 4)
    }
    # The topic's other consumer saw each message once, when it was published: no replay.
    notified = await effects(sessions, schema, NOTIFY)
    assert sorted(r.event_id for r in notified) == list(range(1, 10))
    assert all(r.replays == 0 for r in notified)

    rows = await letters(sessions, schema)
    status = {(json.loads(r.body)["id"], r.status, r.replays) for r in rows.values()}
    assert status == {
        (1, "replayed", 2),  # replayed twice: the second copy was absorbed by the inbox
        *((i, "replayed", 1) for i in (2, 3, 4)),
        (5, "dead", 0),
        (6, "dead", 0),
        (9, "replayed", 1),  # replayed once, failed again as a new dead letter ...
        (9, "replayed", 2),  # ... which was forced past the guard and failed once more
        (9, "dead", 2),
    }
    audit = await sql(sessions, f'SELECT * FROM "{schema}".audit ORDER BY id')
    assert [(a.action, a.actor, sorted(a.target_ids)) for a in audit] == [
        ("dead_letters.replay", "ops", sorted(by_event[i] for i in (1, 2, 3, 4))),
        ("dead_letters.replay", "ops", [by_event[9]]),
        ("dead_letters.replay", "ops", [again_dead.id]),
        ("dead_letters.replay", "x", [by_event[1]]),
    ]
    assert all(a.count == len(a.target_ids) for a in audit)


async def test_filters_select_exact_subsets_and_dry_runs_change_nothing(settings, sessions, engine):
    schema = settings.schema_name
    a = await seed(
        sessions, schema, error_message="books timed out after 1200 ms", age=timedelta(hours=3)
    )
    b = await seed(
        sessions, schema, error_message="books timed out after 30 ms", age=timedelta(minutes=10)
    )
    c = await seed(
        sessions,
        schema,
        error_type="httpx.ReadTimeout",
        error_message="read timed out",
        age=timedelta(minutes=10),
    )
    d = await seed(
        sessions,
        schema,
        consumer=NOTIFY,
        error_type="LookupError",
        error_message="discount 50% off_promo",
        reason=DeadReason.REJECTED,
        age=timedelta(hours=1),
    )
    e = await seed(
        sessions,
        schema,
        consumer=NOTIFY,
        error_type="LookupError",
        error_message="discount 500 offXpromo",
        reason=DeadReason.REJECTED,
        age=timedelta(hours=1),
    )
    f = await seed_undecodable(sessions, schema)
    g = await seed(sessions, schema, status=DeadStatus.REPLAYED, age=timedelta(days=2))
    h = await seed(sessions, schema, status=DeadStatus.PURGED, topic="books.other")
    await sql(
        sessions,
        f'INSERT INTO "{schema}".inbox (consumer, message_id, processed_at) '
        "SELECT 'c', gen_random_uuid(), now() - interval '9 days' FROM generate_series(1, 3)",
    )

    async def ids(**given: Any) -> set[int]:
        page = await list_letters(engine, schema, Filters.parse(**given))
        return {x.id for x in page.letters}

    assert await ids(status="dead") == {a, b, c, d, e, f}
    assert await ids(status="all") == {a, b, c, d, e, f, g, h}
    assert await ids(status="replayed") == {g}
    assert await ids(consumer=NOTIFY, status="dead") == {d, e}
    assert await ids(error_type="TimeoutError", status="dead") == {a, b}
    assert await ids(error_type="ReadTimeout") == {c}
    assert await ids(error_type="httpx.ReadTimeout") == {c}
    assert await ids(error_type="DecodeError") == {f}
    assert await ids(text="0% off_") == {d}  # % and _ are literal, not wildcards
    assert await ids(text="%") == {d}
    assert await ids(text="TIMED OUT", status="dead") == {a, b, c}
    assert await ids(reason="rejected") == {d, e}
    assert await ids(since="30m", status="dead") == {b, c, f}
    assert await ids(until="30m", status="dead") == {a, d, e}
    assert await ids(since="2h", until="30m") == {d, e}
    assert await ids(topic="books.other", status="all") == {h}
    assert await ids(ids=[a, g], status="all") == {a, g}
    page = await list_letters(engine, schema, Filters(), limit=5)
    assert [x.id for x in page.letters] == sorted([a, b, c, d, e, f, g, h], reverse=True)[:5]
    rest = await list_letters(engine, schema, Filters(), limit=5, before=page.next_before)
    assert [x.id for x in rest.letters] == sorted([a, b, c], reverse=True) and not rest.next_before

    listed = await cli(settings, "dead-letters", "list", "-e", "TimeoutError", "--json")
    assert listed.exit_code == 0, listed.output
    assert {x["id"] for x in json.loads(listed.stdout)["dead_letters"]} == {a, b}
    grouped = await cli(settings, "dead-letters", "groups", "--json")
    shapes = {
        (x["error_type"], x["shape"]): x["count"] for x in json.loads(grouped.stdout)["groups"]
    }
    assert shapes[("TimeoutError", "books timed out after <n> ms")] == 2
    assert shapes[("LookupError", "discount <n>% off_promo")] == 1
    shown = await cli(settings, "dead-letters", "show", str(f), "--json")
    assert json.loads(shown.stdout)["body_encoding"] == "base64"
    human = await cli(settings, "dead-letters", "show", str(a))
    assert human.exit_code == 0 and '"id": 1' in human.stdout and "Traceback" in human.stdout

    before = await snapshot(sessions, schema)
    dry = await cli(settings, "dead-letters", "replay", "--all", "--dry-run", "--json")
    assert dry.exit_code == 1  # f cannot be replayed
    verdicts = {x["id"]: x["verdict"] for x in json.loads(dry.stdout)["items"]}
    assert verdicts == {
        a: "would_replay",
        b: "would_replay",
        c: "would_replay",
        d: "would_replay",
        e: "would_replay",
        f: "refused",
    }
    dry = await cli(settings, "dead-letters", "purge", "-c", NOTIFY, "--dry-run", "--json")
    assert dry.exit_code == 0 and json.loads(dry.stdout)["counts"] == {"would_purge": 2}
    dry = await cli(settings, "prune", "--dry-run", "--dead-letter-days", "1", "--json")
    assert (json.loads(dry.stdout)["inbox"], json.loads(dry.stdout)["dead_letters"]) == (3, 1)
    refused = await cli(settings, "dead-letters", "replay", str(f), "--json")
    assert refused.exit_code == 1
    [item] = json.loads(refused.stdout)["items"]
    assert item["verdict"] == "refused" and "not a UUID" in item["detail"]
    skipped = await cli(settings, "dead-letters", "replay", str(g), "--json")
    assert skipped.exit_code == 1
    assert json.loads(skipped.stdout)["items"][0]["detail"] == "already replayed"

    for args, message in [
        (("dead-letters", "show", "999999"), "no dead letter with id 999999"),
        (("dead-letters", "replay", str(a), "999998", "999999"), "id 999998, 999999"),
        (("dead-letters", "purge", "999999", "--yes"), "no dead letter with id 999999"),
        (("dead-letters", "list", "--since", "yesterday"), "'yesterday' is not a time"),
        (("dead-letters", "list", "--status", "zombie"), "unknown status 'zombie'; known: dead"),
        (("dead-letters", "groups", "--reason", "nope"), "unknown reason 'nope'"),
        (("dead-letters", "replay", "--since", "1h", "--until", "2h"), "is not before --until"),
        (("dead-letters", "replay"), "say which dead letters"),
        (("dead-letters", "purge", "-c", NOTIFY), "purge needs --yes"),
        (("audit", "--action", "nope"), "unknown action 'nope'"),
    ]:
        result = await cli(settings, *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    assert await snapshot(sessions, schema) == before

    # The same through a real process, as a script would see it.
    process = subprocess.run(
        postroom_cmd("dead-letters", "replay", "424242"),
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 2 and "no dead letter with id 424242" in process.stderr


async def test_replay_killed_midway_then_rerun_completes_exactly_once(books, sessions, engine):
    schema = books.schema_name
    await sql(sessions, f'UPDATE "{schema}".switches SET broken = false')
    seeded = [await seed(sessions, schema, event_id=i) for i in range(30)]
    untouched = await seed(sessions, schema, consumer=NOTIFY, event_id=99)

    async def replayed() -> int:
        rows = await letters(sessions, schema)
        return sum(1 for r in rows.values() if r.status == "replayed")

    process = spawn(books, "dead-letters", "replay", "-c", APPLY, "--rate", "10", "--actor", "kim")
    try:
        await eventually(lambda: replayed(), timeout=30, interval=0.02)
    finally:
        process.send_signal(signal.SIGKILL)
    assert await wait_exit(process) == -signal.SIGKILL
    done = await replayed()
    assert 10 <= done < 30 and done % 10 == 0, done  # whole batches of a second's worth
    outbox_rows = await sql(sessions, f'SELECT * FROM "{schema}".outbox ORDER BY id')
    rows = await letters(sessions, schema)
    marked = [r for r in rows.values() if r.status == "replayed"]
    assert sorted(str(o.message_id) for o in outbox_rows) == sorted(r.message_id for r in marked)
    row = outbox_rows[0]
    assert (row.exchange, row.routing_key, row.topic) == ("", APPLY, Posted.topic)
    assert row.headers["postroom-attempt"] == 1 and row.headers["postroom-replays"] == 1
    assert row.headers["postroom-consumer"] == APPLY

    rerun = await cli(books, "dead-letters", "replay", "-c", APPLY, "--actor", "kim", "--json")
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.stdout)["counts"] == {"replayed": 30 - done}
    again = await cli(books, "dead-letters", "replay", "-c", APPLY)
    assert again.exit_code == 1 and "no dead letter matched" in again.stderr

    async with running_worker(books, router) as worker, running_relay(books):
        await eventually(lambda: worker.stats.outcomes.get("acked", 0) == 30)
        await eventually(
            lambda: settled(engine, schema, amqp_url(books), [APPLY, NOTIFY])
        )  # nothing in flight
    assert worker.stats.outcomes == {"acked": 30}
    applied = await effects(sessions, schema, APPLY)
    assert sorted(r.event_id for r in applied) == list(range(30))
    assert {str(r.message_id) for r in applied} == {rows[i].message_id for i in seeded}
    assert await effects(sessions, schema, NOTIFY) == []
    assert (await letters(sessions, schema))[untouched].status == "dead"
    audit = await sql(sessions, f'SELECT * FROM "{schema}".audit ORDER BY id')
    assert sorted(i for a in audit for i in a.target_ids) == sorted(seeded)
    assert {a.actor for a in audit} == {"kim"}


async def test_prune_beside_a_busy_relay_and_worker(books, sessions):
    schema = books.schema_name
    await sql(
        sessions,
        f'INSERT INTO "{schema}".inbox (consumer, message_id, processed_at) '
        "SELECT 'old', gen_random_uuid(), now() - interval '8 days' - g * interval '1 s' "
        "FROM generate_series(1, 30000) AS g",
    )
    await sql(
        sessions,
        f'INSERT INTO "{schema}".dead_letters (consumer, message_id, reason, error_type, '
        "error_message, attempts, first_failed_at, last_failed_at, headers, body, status, "
        "updated_at) SELECT 'old', g::text, 'exhausted', 'E', 'e', 1, now(), now(), '{}', '', "
        "CASE WHEN g % 2 = 0 THEN 'replayed' ELSE 'purged' END, "
        "now() - interval '40 days' - CASE WHEN g <= 5 THEN interval '-40 days' ELSE '0' END "
        "FROM generate_series(1, 1505) AS g",
    )
    kept_dead = [await seed(sessions, schema, age=timedelta(days=90)) for _ in range(3)]
    await sql(sessions, f'UPDATE "{schema}".switches SET broken = false')
    outbox = Outbox.from_settings(books)
    published: dict[Any, datetime] = {}

    async with running_worker(books, router) as worker, running_relay(books) as relay:
        pruning = start(books, "prune", "--batch-size", "500", "--json", "--actor", "cron")
        event_id, during = 0, set()
        while pruning.poll() is None or event_id < 100:
            async with sessions() as session, session.begin():
                for _ in range(5):
                    message = await outbox.publish(session, Posted(id=event_id))
                    published[message.message_id] = datetime.now(UTC)
                    event_id += 1
            [(old,)] = await sql(
                sessions, f"SELECT count(*) FROM \"{schema}\".inbox WHERE consumer = 'old'"
            )
            if 0 < old < 30000:  # the prune is midway: is the worker still handling?
                during.add(worker.stats.outcomes.get("acked", 0))
            await asyncio.sleep(0.02)
        out, err = pruning.communicate(timeout=30)
        await eventually(lambda: worker.stats.outcomes.get("acked", 0) == 2 * event_id)
    assert pruning.returncode == 0, err.decode()
    assert len(during) >= 3, during  # messages kept flowing while the prune ran
    assert json.loads(out)["inbox"] == 30000 and json.loads(out)["dead_letters"] == 1500
    assert worker.stats.outcomes == {"acked": 2 * event_id} and relay.stats.failed == 0
    rows = await sql(
        sessions, f'SELECT message_id, max(at) AS at FROM "{schema}".books_effects GROUP BY 1'
    )
    lag = max((r.at - published[r.message_id]).total_seconds() for r in rows)
    assert len(rows) == event_id and lag < 10, lag
    inbox = await sql(sessions, f'SELECT consumer, count(*) FROM "{schema}".inbox GROUP BY 1')
    assert dict(inbox) == {APPLY: event_id, NOTIFY: event_id}  # only the fresh rows remain
    left = await letters(sessions, schema)
    assert len(left) == 8 and set(kept_dead) <= set(left)  # live ones are never pruned
    [audit] = await sql(sessions, f'SELECT * FROM "{schema}".audit')
    assert (audit.action, audit.actor, audit.count) == ("prune", "cron", 31500)


async def test_prune_backs_off_from_a_table_lock_instead_of_queueing(settings, sessions, engine):
    schema = settings.schema_name
    await sql(
        sessions,
        f'INSERT INTO "{schema}".inbox (consumer, message_id, processed_at) '
        "SELECT 'c', gen_random_uuid(), now() - interval '9 days' FROM generate_series(1, 10)",
    )
    week = timedelta(days=7)
    async with engine.connect() as holder:
        await holder.execute(text(f'LOCK TABLE "{schema}".inbox IN ACCESS EXCLUSIVE MODE'))
        started = time.monotonic()
        with pytest.raises(TableBusyError, match="inbox stayed locked"):
            await prune(
                engine,
                schema,
                inbox_retention=week,
                dead_letter_retention=week,
                actor="t",
                lock_timeout=timedelta(milliseconds=100),
            )
        assert time.monotonic() - started < 5
        await holder.rollback()
    report = await prune(
        engine, schema, inbox_retention=week, dead_letter_retention=week, actor="t"
    )
    assert report.inbox == 10


async def test_prune_vacuum_clears_the_dead_rows_a_relay_leaves(settings, sessions):
    """Without autovacuum (this test server runs without it) the outbox is all dead rows."""
    schema = settings.schema_name
    await sql(
        sessions,
        f'INSERT INTO "{schema}".outbox (message_id, topic, routing_key, headers, body, '
        "content_type, occurred_at) SELECT gen_random_uuid(), 't', 't', '{}', '\\x00', "
        "'application/json', now() FROM generate_series(1, 500)",
    )
    await sql(sessions, f'DELETE FROM "{schema}".outbox')  # what the relay does, row by row

    async def dead_rows() -> int:
        [(dead,)] = await sql(
            sessions,
            "SELECT n_dead_tup FROM pg_stat_user_tables "
            "WHERE schemaname = :schema AND relname = 'outbox'",
            schema=schema,
        )
        return int(dead)

    result = await cli(settings, "prune", "--vacuum", "--json")
    assert result.exit_code == 0, result.output
    assert await dead_rows() == 0
    [(vacuumed,)] = await sql(
        sessions,
        "SELECT count(*) FROM pg_stat_user_tables WHERE schemaname = :schema "
        "AND relname IN ('outbox', 'inbox', 'dead_letters') AND last_vacuum IS NOT NULL",
        schema=schema,
    )
    assert vacuumed == 3


async def test_every_mutating_command_is_audited(settings, sessions):
    schema = settings.schema_name
    first, second, third = [await seed(sessions, schema, event_id=i) for i in range(3)]
    await sql(
        sessions,
        f'INSERT INTO "{schema}".inbox (consumer, message_id, processed_at) '
        "SELECT 'c', gen_random_uuid(), now() - interval '30 days' FROM generate_series(1, 4)",
    )
    steps = [
        ("dead-letters", "replay", str(first), "--actor", "alice"),
        ("dead-letters", "purge", str(second), str(third), "--yes", "--actor", "bob"),
        ("prune", "--actor", "carol"),
        ("dead-letters", "replay", str(first)),  # already replayed: changes nothing
    ]
    codes = [(await cli(settings, *step)).exit_code for step in steps]
    assert codes == [0, 0, 0, 1]
    result = await cli(settings, "audit", "--json")
    entries = json.loads(result.stdout)["audit"]
    assert [(x["action"], x["actor"], x["target_ids"], x["count"]) for x in entries] == [
        ("prune", "carol", [], 4),
        ("dead_letters.purge", "bob", [second, third], 2),
        ("dead_letters.replay", "alice", [first], 1),
    ]
    assert entries[0]["details"]["inbox"] == 4 and entries[2]["run"]
    only = await cli(settings, "audit", "--id", str(third), "--json")
    assert [x["action"] for x in json.loads(only.stdout)["audit"]] == ["dead_letters.purge"]
    human = await cli(settings, "audit", "--action", "dead_letters.replay")
    assert human.exit_code == 0 and "alice" in human.stdout and "bob" not in human.stdout
    rows = await letters(sessions, schema)
    assert [rows[i].status for i in (first, second, third)] == ["replayed", "purged", "purged"]


async def test_outbox_status_shows_lag_per_topic_and_publish_errors(settings, sessions):
    schema = settings.schema_name

    now = datetime.now(UTC)

    def row(topic: str, due: timedelta, error: str | None = None, exchange: str | None = None):
        return {
            "message_id": uuid7(),
            "topic": topic,
            "exchange": exchange,
            "routing_key": topic,
            "headers": {},
            "body": b"",
            "content_type": "application/json",
            "occurred_at": now,
            "available_at": now + due,
            "attempts": 1 if error else 0,
            "last_error": error,
        }

    rows = [row("a", timedelta(minutes=-2)) for _ in range(3)] + [
        row("b", timedelta(hours=1)),
        row("b", timedelta(seconds=-5), error="unroutable: no queue", exchange=""),
    ]
    async with sessions() as session, session.begin():
        await session.execute(
            insert(outbox_table),
            rows,
            execution_options={"schema_translate_map": schema_map(schema)},
        )
    result = await cli(settings, "outbox", "status", "--json")
    assert result.exit_code == 0, result.output
    state = json.loads(result.stdout)
    assert (state["due"], state["scheduled"], state["errored"], state["direct"]) == (4, 1, 1, 1)
    assert 110 < state["oldest_due_seconds"] < 200
    topics = {t["topic"]: t for t in state["topics"]}
    assert (topics["a"]["due"], topics["b"]["due"], topics["b"]["scheduled"]) == (3, 1, 1)
    assert state["failures"][0]["last_error"] == "unroutable: no queue"
    assert (await cli(settings, "outbox", "status", "--max-lag", "60")).exit_code == 1
    human = await cli(settings, "outbox", "status", "--max-lag", "3600")
    assert human.exit_code == 0 and "unroutable" in human.stdout


async def test_replay_of_a_message_over_the_size_limit_is_refused(settings, sessions, engine):
    schema = settings.schema_name
    letter_id = await seed(sessions, schema)
    small = Outbox(schema=schema, max_body_bytes=5)
    report = await replay(engine, schema, Filters(ids=(letter_id,)), outbox=small, actor="t")
    [item] = report.items
    assert item.verdict is Verdict.REFUSED and "the limit is 5" in item.detail
    async with engine.connect() as connection:
        status = await connection.scalar(
            select(dead_letters.c.status).where(dead_letters.c.id == letter_id),
            execution_options={"schema_translate_map": schema_map(schema)},
        )
    assert status == "dead"


def test_every_command_in_the_runbook_parses():
    """docs/operations.md shows real commands: each one's subcommand and options exist."""
    import re
    import shlex

    import typer
    from typer.core import TyperGroup

    from tests.conftest import ROOT

    runbook = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```bash\n(.*?)^```", runbook, re.MULTILINE | re.DOTALL)
    parsed = []
    for line in "\n".join(blocks).splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] != "postroom":
            continue
        command: Any = typer.main.get_command(cli_app)
        context = command.make_context("postroom", words[1:])
        while isinstance(command, TyperGroup):
            rest = [*getattr(context, "_protected_args", []), *context.args]
            name, sub, rest = command.resolve_command(context, rest)
            assert sub is not None and name is not None, line
            command, context = sub, sub.make_context(name, rest, parent=context)
        parsed.append(context.command_path)
    assert len(parsed) >= 15
    assert {"postroom prune", "postroom audit", "postroom outbox status"} <= set(parsed)
