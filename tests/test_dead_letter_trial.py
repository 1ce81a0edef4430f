"""The on-call trial of issue 14, with the CLI only, against a real worker, relay and broker.

400 dead letters across two consumers of one topic, all TimeoutErrors; the 300 of the
billing-like consumer are fixable. Find, preview, replay exactly those, check they were
handled, read the audit; then SQL confirms each applied exactly once and the other
consumer untouched. Each step's wall time is printed (``pytest -s``), not asserted.
"""

from __future__ import annotations

import json
import time

from postroom import Outbox
from tests.apps.repairable import Posted, router
from tests.helpers import eventually, running_relay, running_worker
from tests.test_dead_letter_cli import cli
from tests.test_ops import APPLY, NOTIFY, books, effects, letters, seed, sql

__all__ = ["books"]  # the fixture, used by name


async def test_the_on_call_trial_replays_exactly_the_right_300(books, sessions):
    schema = books.schema_name
    outbox = Outbox.from_settings(books)
    async with sessions() as session, session.begin():
        for i in range(300):
            await outbox.publish(session, Posted(id=i, fail="timeout"))
    async with running_worker(books, router) as worker, running_relay(books):
        await eventually(lambda: worker.stats.outcomes == {"dead": 300, "acked": 300}, timeout=60)
    # The other consumer's 100, of the same error type, that must not be replayed.
    others = [
        await seed(
            sessions, schema, consumer=NOTIFY, event_id=1000 + i, error_message="smtp timed out"
        )
        for i in range(100)
    ]
    timings: dict[str, float] = {}

    async def step(name: str, *args: str, code: int = 0) -> str:
        started = time.monotonic()
        result = await cli(books, *args)
        timings[name] = time.monotonic() - started
        assert result.exit_code == code, (args, result.output)
        return result.stdout

    groups = json.loads(await step("find", "dead-letters", "groups", "--json"))["groups"]
    assert {(g["consumer"], g["error_type"], g["count"]) for g in groups} == {
        (APPLY, "TimeoutError", 300),
        (NOTIFY, "TimeoutError", 100),
    }
    await sql(sessions, f'UPDATE "{schema}".switches SET broken = false')  # the fix, deployed
    selection = ("-c", APPLY, "-e", "timeouterror")
    preview = json.loads(
        await step("preview", "dead-letters", "replay", *selection, "--dry-run", "--json")
    )
    assert preview["breakdown"] == [
        {"consumer": APPLY, "error_type": "TimeoutError", "verdict": "would_replay", "count": 300}
    ]
    await step("unconfirmed", "dead-letters", "replay", *selection, code=2)
    replayed = json.loads(
        await step(
            "replay", "dead-letters", "replay", *selection, "--yes", "--actor", "ana", "--json"
        )
    )
    assert replayed["counts"] == {"replayed": 300}
    run = replayed["run"][:8]

    async with running_worker(books, router) as worker, running_relay(books):
        started = time.monotonic()
        status = await cli(books, "dead-letters", "status", "--run", run)
        while status.exit_code != 0:
            assert time.monotonic() - started < 60, status.stdout
            status = await cli(books, "dead-letters", "status", "--run", run)
        timings["until handled"] = time.monotonic() - started
    assert "300 handled" in status.stdout
    [entry] = json.loads(await step("audit", "audit", "--run", run, "--json"))["audit"]
    assert (entry["actor"], entry["count"]) == ("ana", 300)
    assert entry["details"]["totals"] == {"selected": 300, "replayed": 300}

    applied = await effects(sessions, schema, APPLY)
    assert sorted(r.event_id for r in applied) == list(range(300))  # each exactly once
    assert {r.replays for r in applied} == {1}
    notified = await effects(sessions, schema, NOTIFY)
    assert len(notified) == 300 and {r.replays for r in notified} == {0}  # no replay reached it
    rows = await letters(sessions, schema)
    assert {rows[i].status for i in others} == {"dead"}
    assert sum(1 for r in rows.values() if r.status == "replayed") == 300
    print("trial step wall times (s):", {k: round(v, 2) for k, v in timings.items()})
