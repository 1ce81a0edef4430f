"""The findings of issue 14 on `postroom dead-letters` and `audit`, one test each, real PostgreSQL.

Each test reproduces what an on-call engineer ran into and pins the behaviour that
replaced it. The dead letters are recorded as dispatch records them (tests.test_ops.seed).
"""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

from typer.testing import CliRunner

from postroom.cli import app as cli_app
from postroom.deadletters import DeadStatus
from postroom.runs import Verdict
from postroom.settings import Settings
from tests.conftest import settings_env
from tests.test_ops import APPLY, NOTIFY, letters, seed, snapshot, sql

ROUTER = "tests.apps.repairable:router"


async def cli(settings: Settings, *args: str, **env: str) -> Any:
    """Run `postroom ARGS` in-process, on a terminal wide enough that tables do not wrap."""
    environment = {**settings_env(settings), "COLUMNS": "250", **env}
    return await asyncio.to_thread(CliRunner().invoke, cli_app, list(args), env=environment)


async def test_1_groups_never_add_statuses_together(settings, sessions):
    schema = settings.schema_name
    for i in range(3):
        await seed(sessions, schema, event_id=i)
    for i in range(2):
        await seed(sessions, schema, event_id=10 + i, status=DeadStatus.REPLAYED)
    await seed(sessions, schema, event_id=20, status=DeadStatus.PURGED)

    result = await cli(settings, "dead-letters", "groups", "--status", "all", "--json")
    assert result.exit_code == 0, result.output
    counts = {
        (g["status"], g["consumer"], g["error_type"]): g["count"]
        for g in json.loads(result.stdout)["groups"]
    }
    assert counts == {
        ("dead", APPLY, "TimeoutError"): 3,
        ("replayed", APPLY, "TimeoutError"): 2,
        ("purged", APPLY, "TimeoutError"): 1,
    }
    human = await cli(settings, "dead-letters", "groups", "--status", "all")
    header = next(line for line in human.stdout.splitlines() if "count" in line)
    assert header.split()[:3] == ["count", "status", "consumer"]
    assert re.search(r"^\s*2\s+replayed\s+books\.apply", human.stdout, re.MULTILINE), human.stdout
    replayed = await cli(settings, "dead-letters", "groups", "--status", "replayed", "--json")
    assert [g["count"] for g in json.loads(replayed.stdout)["groups"]] == [2]


async def test_2_unknown_names_are_errors_listing_the_known_ones(settings, sessions):
    schema = settings.schema_name
    await seed(sessions, schema, consumer=APPLY)
    await seed(sessions, schema, consumer="billing.issue-invoice", error_type="httpx.ReadTimeout")
    before = await snapshot(sessions, schema)
    known = "known: billing.issue-invoice, books.apply"
    for args, message in [
        (
            ("list", "-c", "billing.issue-invoce"),
            f"unknown consumer 'billing.issue-invoce'; {known}",
        ),
        (("groups", "-c", "billing.issue-invoce"), "unknown consumer 'billing.issue-invoce'"),
        (("replay", "-c", "billing.issue-invoce"), "unknown consumer 'billing.issue-invoce'"),
        (
            ("purge", "-c", "billing.issue-invoce", "--yes"),
            "unknown consumer 'billing.issue-invoce'",
        ),
        (("list", "--topic", "books.postd"), "unknown topic 'books.postd'; known: books.posted"),
        (
            ("replay", "-e", "ReadTimeOutt"),
            "unknown error type 'ReadTimeOutt'; known: TimeoutError, httpx.ReadTimeout",
        ),
        (("list", "-c", NOTIFY), f"unknown consumer 'books.notify'; {known}"),
    ]:
        result = await cli(settings, "dead-letters", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    assert await snapshot(sessions, schema) == before  # nothing replayed or purged

    # A consumer of the router given is known, even without dead letters: an empty answer.
    routed = await cli(settings, "dead-letters", "list", "-c", NOTIFY, "--router", ROUTER, "--json")
    assert routed.exit_code == 0, routed.output
    assert json.loads(routed.stdout)["dead_letters"] == []
    bad = await cli(settings, "dead-letters", "list", "--router", "tests.apps.nowhere:router")
    assert bad.exit_code == 2 and "cannot import 'tests.apps.nowhere'" in bad.stderr


async def test_3_error_type_matches_in_any_case_and_qualified(settings, sessions):
    schema = settings.schema_name
    timeout = await seed(sessions, schema, error_type="TimeoutError")
    value = await seed(sessions, schema, event_id=2, error_type="ValueError", error_message="x")
    read = await seed(sessions, schema, event_id=3, error_type="httpx.ReadTimeout")

    async def ids(error_type: str) -> set[int]:
        result = await cli(settings, "dead-letters", "list", "-e", error_type, "--json")
        assert result.exit_code == 0, (error_type, result.output)
        return {x["id"] for x in json.loads(result.stdout)["dead_letters"]}

    assert await ids("timeouterror") == {timeout}
    assert await ids("builtins.TimeoutError") == {timeout}
    assert await ids("BUILTINS.valueerror") == {value}
    assert await ids("ReadTimeout") == {read}
    assert await ids("HTTPX.READTIMEOUT") == {read}
    # A suffix matches at a dot only: "Error" is not a name of any of them.
    missing = await cli(settings, "dead-letters", "list", "-e", "Error")
    assert missing.exit_code == 2 and "unknown error type 'Error'" in missing.stderr


async def test_4_a_replay_over_the_threshold_or_of_everything_needs_yes(settings, sessions):
    schema = settings.schema_name
    model = await seed(sessions, schema)
    await sql(  # 100 more like it, each its own message
        sessions,
        f'INSERT INTO "{schema}".dead_letters (consumer, message_id, topic, reason, error_type, '
        "error_message, attempts, first_failed_at, last_failed_at, headers, body, content_type) "
        "SELECT consumer, gen_random_uuid()::text, topic, reason, error_type, error_message, "
        f'attempts, first_failed_at, last_failed_at, headers, body, content_type FROM "{schema}".'
        "dead_letters CROSS JOIN generate_series(1, 100) WHERE id = :id",
        id=model,
    )
    before = await snapshot(sessions, schema)
    refused = await cli(settings, "dead-letters", "replay", "-c", APPLY)
    assert refused.exit_code == 2, refused.output
    assert "replay needs --yes: it selects 101 dead letters (more than 100)" in refused.stderr
    assert re.search(r"101\s+books\.apply\s+TimeoutError\s+would replay", refused.stdout)
    everything = await cli(settings, "dead-letters", "replay", "--all", "--limit", "1")
    assert everything.exit_code == 2
    assert "(every dead letter is selected)" in everything.stderr
    assert await snapshot(sessions, schema) == before

    under = await cli(settings, "dead-letters", "replay", "-c", APPLY, "--limit", "100", "--json")
    assert under.exit_code == 0, under.output
    assert json.loads(under.stdout)["counts"] == {"replayed": 100}
    low = await cli(settings, "dead-letters", "replay", "-c", APPLY, "--threshold", "0")
    assert low.exit_code == 2 and "it selects 1 dead letter (more than 0)" in low.stderr
    done = await cli(settings, "dead-letters", "replay", "--all", "--yes", "--json")
    assert done.exit_code == 0 and json.loads(done.stdout)["counts"] == {"replayed": 1}


async def test_5_summaries_break_down_by_consumer_and_error_type(settings, sessions):
    schema = settings.schema_name
    for i in range(3):
        await seed(sessions, schema, event_id=i)
    await seed(sessions, schema, event_id=5, error_type="LookupError", error_message="no")
    await seed(sessions, schema, consumer=NOTIFY, event_id=9)

    dry = await cli(settings, "dead-letters", "replay", "-e", "TimeoutError", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "dry run: nothing changed" in dry.stdout
    assert re.search(r"3\s+books\.apply\s+TimeoutError\s+would replay", dry.stdout), dry.stdout
    assert re.search(r"1\s+books\.notify\s+TimeoutError\s+would replay", dry.stdout)
    assert "LookupError" not in dry.stdout
    assert "replayed" not in dry.stdout  # a dry run says what would happen, never that it did
    assert dry.stdout.strip().endswith("4 would replay")

    real = await cli(
        settings, "dead-letters", "replay", "-c", APPLY, "-e", "TimeoutError", "--json"
    )
    shown = json.loads(real.stdout)
    assert shown["breakdown"] == [
        {"consumer": APPLY, "error_type": "TimeoutError", "verdict": "replayed", "count": 3}
    ]
    human = await cli(settings, "dead-letters", "purge", "-c", NOTIFY, "--yes")
    assert re.search(r"1\s+books\.notify\s+TimeoutError\s+purged", human.stdout), human.stdout


async def test_6_all_together_with_filters_is_refused(settings, sessions):
    first = await seed(sessions, settings.schema_name)
    for args in (("--all", "-c", APPLY), ("--all", str(first)), ("--all", "--since", "1h")):
        for command in ("replay", "purge", "unpurge"):
            yes = () if command == "unpurge" else ("--yes",)
            result = await cli(settings, "dead-letters", command, *args, *yes)
            assert result.exit_code == 2, (command, args, result.output)
            assert "--all selects every dead letter and takes no ids or filters" in result.stderr
    assert (await letters(sessions, settings.schema_name))[first].status == "dead"


async def test_7_nothing_matched_says_where_the_selection_is(settings, sessions):
    schema = settings.schema_name
    for i in range(3):
        await seed(sessions, schema, event_id=i)
    await seed(sessions, schema, event_id=9, status=DeadStatus.PURGED)
    first = await cli(settings, "dead-letters", "replay", "-c", APPLY)
    assert first.exit_code == 0, first.output
    again = await cli(settings, "dead-letters", "replay", "-c", APPLY)
    assert again.exit_code == 1
    assert "the same selection has 1 purged, 3 replayed" in again.stderr, again.stderr
    purge = await cli(settings, "dead-letters", "purge", "-c", APPLY, "--yes")
    assert purge.exit_code == 1 and "1 purged, 3 replayed" in purge.stderr
    none = await cli(settings, "dead-letters", "replay", "-c", APPLY, "--until", "2020-01-01")
    assert none.exit_code == 1 and "no dead letter matched, in any status" in none.stderr


async def test_8_the_status_error_lists_all(settings):
    result = await cli(settings, "dead-letters", "list", "--status", "zombie")
    assert result.exit_code == 2
    assert "unknown status 'zombie'; known: dead, replayed, purged, all" in result.stderr


async def test_9_time_ranges_say_their_time_zone_and_refuse_the_future(settings):
    inverted = await cli(
        settings,
        "dead-letters",
        "list",
        "--since",
        "2026-11-26T12:00",
        "--until",
        "2026-11-26T10:00+01:00",
    )
    assert inverted.exit_code == 2
    assert (
        "--since (2026-11-26 12:00:00 UTC) is not before --until (2026-11-26 09:00:00 UTC)"
        in inverted.stderr
    ), inverted.stderr
    ahead = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M")
    future = await cli(settings, "dead-letters", "replay", "--since", ahead)
    assert future.exit_code == 2
    assert f"--since '{ahead}' is {ahead.replace('T', ' ')}:00 UTC, in the future" in future.stderr


async def test_10_one_message_followed_across_its_replays(settings, sessions):
    schema = settings.schema_name
    first = await seed(sessions, schema, event_id=1)
    other = await seed(sessions, schema, event_id=2)
    message_id = (await letters(sessions, schema))[first].message_id
    hops = [first]
    for _ in range(2):  # replayed, failed again (a new dead letter of the same message) ...
        replayed = await cli(settings, "dead-letters", "replay", str(hops[-1]))
        assert replayed.exit_code == 0, replayed.output
        [row] = await sql(
            sessions,
            f'INSERT INTO "{schema}".dead_letters (consumer, message_id, topic, reason, error_type, '
            "error_message, attempts, first_failed_at, last_failed_at, headers, body, content_type, "
            "replays) SELECT consumer, message_id, topic, reason, error_type, error_message, 1, "
            f'now(), now(), headers, body, content_type, replays FROM "{schema}".dead_letters '
            "WHERE id = :i RETURNING id",
            i=hops[-1],
        )
        hops.append(row.id)

    listed = await cli(
        settings, "dead-letters", "list", "--message-id", message_id, "--status", "all", "--json"
    )
    assert [x["id"] for x in json.loads(listed.stdout)["dead_letters"]] == hops[::-1]
    shown = await cli(settings, "dead-letters", "show", str(first), "--json")
    assert [(x["id"], x["status"]) for x in json.loads(shown.stdout)["chain"]] == [
        (hops[0], "replayed"),
        (hops[1], "replayed"),
        (hops[2], "dead"),
    ]
    human = await cli(settings, "dead-letters", "show", str(hops[2]))
    assert "this message's chain" in human.stdout
    for args in (("--id", str(first)), ("--message-id", message_id), ("--id", str(hops[2]))):
        audited = await cli(settings, "audit", *args, "--json")
        assert audited.exit_code == 0, audited.output
        assert [x["target_ids"] for x in json.loads(audited.stdout)["audit"]] == [
            [hops[1]],
            [hops[0]],
        ]
    assert other not in hops
    unknown = await cli(settings, "dead-letters", "list", "--message-id", "nope", "--json")
    assert unknown.exit_code == 0 and json.loads(unknown.stdout)["dead_letters"] == []
    missing = await cli(settings, "audit", "--message-id", "nope")
    assert missing.exit_code == 2 and "no dead letter with message id 'nope'" in missing.stderr


async def test_11_one_audit_row_per_run_with_parameters_and_totals(settings, sessions):
    schema = settings.schema_name
    seeded = [await seed(sessions, schema, event_id=i) for i in range(5)]
    looping = await seed(sessions, schema, event_id=9, replays=3)
    result = await cli(
        settings, "dead-letters", "replay", "-c", APPLY, "--rate", "2", "--limit", "6",
        "--max-replays", "3", "--actor", "ana", "--json",
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # the looping one is held by the guard
    run = json.loads(result.stdout)["run"]
    [entry] = json.loads((await cli(settings, "audit", "--json")).stdout)["audit"]
    assert (entry["actor"], entry["action"], entry["run"], entry["count"]) == (
        "ana",
        "dead_letters.replay",
        run,
        5,
    )
    assert sorted(entry["target_ids"]) == seeded
    details = entry["details"]
    assert details["parameters"] == {
        "filters": {"consumer": APPLY},
        "limit": 6,
        "rate": 2.0,
        "max_replays": 3,
        "force": False,
        "batch_size": 100,
        "threshold": 100,
        "confirmed": False,
    }
    assert details["totals"] == {"selected": 6, "replayed": 5, "loop_guard": 1}
    assert [b["count"] for b in details["batches"]] == [2, 2, 1]  # batches inside the one row
    assert looping not in entry["target_ids"]

    by_run = await cli(settings, "audit", "--run", run[:8], "--json")
    assert [x["run"] for x in json.loads(by_run.stdout)["audit"]] == [run]
    human = await cli(settings, "audit")
    assert run[:8] in human.stdout and "rate=2.0" in human.stdout and "loop_guard=1" in human.stdout
    for args, message in [
        (("--id", "99999"), "no dead letter with id 99999"),
        (("--run", "ffffffff"), "no audit row for run 'ffffffff'"),
        (("--action", "nope"), "unknown action 'nope'"),
    ]:
        bad = await cli(settings, "audit", *args)
        assert bad.exit_code == 2 and message in bad.stderr, (args, bad.output)


async def test_12_help_shows_flags_as_flags_and_purge_says_how_many(settings, sessions):
    for command in (("dead-letters", "replay"), ("dead-letters", "purge"), ("prune",), ("audit",)):
        shown = await cli(settings, *command, "--help")
        assert shown.exit_code == 0
        assert "<bool>" not in shown.stdout, shown.stdout
    replay_help = (await cli(settings, "dead-letters", "replay", "--help")).stdout
    assert re.search(r"^\s+--dry-run\s+Show what would happen", replay_help, re.MULTILINE)
    assert re.search(r"^\s+-y, --yes\s+Confirm", replay_help, re.MULTILINE)

    schema = settings.schema_name
    await seed(sessions, schema, event_id=1)
    await seed(sessions, schema, event_id=2)
    refused = await cli(settings, "dead-letters", "purge", "-c", APPLY)
    assert refused.exit_code == 2
    assert (
        "purge needs --yes: it selects 2 dead letters (a purge always asks): 2 would purge"
        in refused.stderr
    )
    assert {r.status for r in (await letters(sessions, schema)).values()} == {"dead"}


async def test_7_concurrent_runs_share_a_selection_without_doubling(settings, sessions, engine):
    from postroom import Outbox
    from postroom.filters import Filters
    from postroom.replay import replay

    schema = settings.schema_name
    seeded = [await seed(sessions, schema, event_id=i) for i in range(40)]
    outbox = Outbox.from_settings(settings)
    filters = Filters(consumer=APPLY)

    async def late(who: str) -> Any:  # starts midway and overtakes the paced run
        await asyncio.sleep(0.6)
        return await replay(engine, schema, filters, outbox=outbox, actor=who, batch_size=5)

    paced = replay(engine, schema, filters, outbox=outbox, actor="ana", rate=20, batch_size=5)
    first, second = await asyncio.gather(paced, late("kim"))
    mine = set(first.ids(Verdict.REPLAYED)), set(second.ids(Verdict.REPLAYED))
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(seeded)
    assert mine[0] and mine[1], "the runs did not overlap: nothing was tested"
    assert set(first.ids(Verdict.SKIPPED)) == mine[1]  # ana selected all 40, kim took these
    assert set(second.ids(Verdict.SKIPPED)) <= mine[0]
    assert {i.detail for i in (*first.items, *second.items) if i.verdict is Verdict.SKIPPED} == {
        "resolved by another run meanwhile"
    }
    rows = await sql(sessions, f'SELECT message_id FROM "{schema}".outbox')
    assert len(rows) == 40 == len({r.message_id for r in rows})
    audit = await sql(sessions, f'SELECT actor, target_ids FROM "{schema}".audit ORDER BY id')
    assert sorted((a.actor, len(a.target_ids)) for a in audit) == sorted(
        [("ana", len(mine[0])), ("kim", len(mine[1]))]
    )


async def test_a_schema_behind_head_says_to_migrate(settings, sessions):
    await sql(sessions, f'ALTER TABLE "{settings.schema_name}".audit DROP COLUMN run')
    result = await cli(settings, "audit")
    assert result.exit_code == 2  # configuration a person fixes, as a missing schema is
    assert "column audit.run does not exist" in result.stderr
    assert "run `postroom migrate`" in result.stderr
