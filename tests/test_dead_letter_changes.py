"""After a replay, un-purge, edit-and-replay and redaction: real PostgreSQL and RabbitMQ.

A replay's fate is read while a real worker and relay handle (or fail) the replayed
messages; edit-and-replay is driven through $EDITOR as a person would; redaction is
applied by the worker's own dispatch pipeline (postroom.testing.deliver).
"""

from __future__ import annotations

import base64
import json
import re
import sys
import textwrap

from postroom import testing
from postroom.redaction import Redaction
from tests.apps import secretive
from tests.apps.repairable import Posted, router
from tests.helpers import eventually, running_relay, running_worker
from tests.test_dead_letter_cli import cli
from tests.test_ops import APPLY, NOTIFY, books, effects, letters, seed, snapshot, sql

__all__ = ["books"]  # the fixture, used by name

ROUTER = "tests.apps.repairable:router"


async def with_body(sessions, schema: str, letter_id: int, event: Posted) -> None:
    await sql(
        sessions,
        f'UPDATE "{schema}".dead_letters SET body = :b WHERE id = :i',
        b=event.model_dump_json().encode(),
        i=letter_id,
    )


async def test_13_status_shows_each_replayed_message_handled_failed_again_or_pending(
    books, sessions
):
    schema = books.schema_name
    healthy = [await seed(sessions, schema, event_id=i) for i in (1, 3)]
    hopeless = await seed(sessions, schema, event_id=2)
    await with_body(sessions, schema, hopeless, Posted(id=2, fail="always"))
    untouched = await seed(sessions, schema, consumer=NOTIFY, event_id=4)

    replayed = await cli(books, "dead-letters", "replay", "-c", APPLY, "--json")
    assert replayed.exit_code == 0, replayed.output
    run = json.loads(replayed.stdout)["run"]

    pending = await cli(books, "dead-letters", "status", "--run", run[:8], "--json")
    assert pending.exit_code == 1, pending.output  # not settled yet
    shown = json.loads(pending.stdout)
    assert shown["counts"] == {"pending": 3}
    assert all("in the outbox, attempt 1" in m["detail"] for m in shown["messages"])

    async with running_worker(books, router) as worker, running_relay(books):
        await eventually(lambda: worker.stats.outcomes == {"acked": 2, "dead": 1})
    [again] = [
        r.id
        for r in (await letters(sessions, schema)).values()
        if r.status == "dead" and r.consumer == APPLY
    ]
    settled = await cli(books, "dead-letters", "status", "--run", run, "--json")
    assert settled.exit_code == 1  # one failed again
    fates = {m["id"]: (m["fate"], m["new_id"]) for m in json.loads(settled.stdout)["messages"]}
    assert fates == {
        healthy[0]: ("handled", None),
        healthy[1]: ("handled", None),
        hopeless: ("failed_again", again),
    }
    human = await cli(books, "dead-letters", "status", "--run", run[:8])
    assert "2 handled, 1 failed_again" in human.stdout
    assert "RuntimeError: this entry can never be applied" in human.stdout
    assert sorted(r.event_id for r in await effects(sessions, schema, APPLY)) == [1, 3]
    assert await effects(sessions, schema, NOTIFY) == []  # the other consumer saw no replay

    # A run whose every message was handled settles with exit 0.
    fixed = await seed(sessions, schema, event_id=5)
    human_replay = await cli(books, "dead-letters", "replay", str(fixed))
    hint = re.search(
        r"run ([0-9a-f-]{36}): see what became of them with `postroom dead-letters "
        r"status --run ([0-9a-f]{8})`",
        human_replay.stdout,
    )
    assert hint and hint.group(1).startswith(hint.group(2)), human_replay.stdout
    async with running_worker(books, router) as worker, running_relay(books):
        await eventually(lambda: worker.stats.outcomes.get("acked") == 1)
    done = await cli(books, "dead-letters", "status", "--run", hint.group(2))
    assert done.exit_code == 0 and "1 handled" in done.stdout
    purge = await cli(books, "dead-letters", "purge", str(untouched), "--yes", "--json")
    purge_run = json.loads(purge.stdout)["run"]
    wrong = await cli(books, "dead-letters", "status", "--run", purge_run[:8])
    assert wrong.exit_code == 2 and "no replay run start with" in wrong.stderr


async def test_unpurge_restores_within_the_retention(settings, sessions):
    schema = settings.schema_name
    first, second, third, old = [await seed(sessions, schema, event_id=i) for i in range(4)]
    purged = await cli(
        settings, "dead-letters", "purge", str(first), str(second), str(third), str(old), "--yes"
    )
    assert purged.exit_code == 0, purged.output
    await sql(
        sessions,
        f"UPDATE \"{schema}\".dead_letters SET updated_at = now() - interval '31 days' WHERE id = :i",
        i=old,
    )
    # The message of `third` failed again meanwhile: a newer dead letter is live.
    [row] = await sql(
        sessions,
        f'INSERT INTO "{schema}".dead_letters (consumer, message_id, topic, reason, error_type, '
        "error_message, attempts, first_failed_at, last_failed_at, headers, body) SELECT consumer, "
        "message_id, topic, reason, error_type, error_message, 1, now(), now(), headers, body "
        f'FROM "{schema}".dead_letters WHERE id = :i RETURNING id',
        i=third,
    )
    before = await snapshot(sessions, schema)
    dry = await cli(settings, "dead-letters", "unpurge", "-c", APPLY, "--dry-run", "--json")
    assert dry.exit_code == 1
    assert json.loads(dry.stdout)["counts"] == {"would_restore": 2, "refused": 2}
    assert await snapshot(sessions, schema) == before

    restored = await cli(
        settings, "dead-letters", "unpurge", "-c", APPLY, "--actor", "ana", "--json"
    )
    assert restored.exit_code == 1  # two could not be restored
    verdicts = {x["id"]: (x["verdict"], x["detail"]) for x in json.loads(restored.stdout)["items"]}
    assert verdicts[first] == ("restored", "") and verdicts[second] == ("restored", "")
    assert verdicts[third] == ("refused", "its message is dead again under a newer dead letter")
    assert verdicts[old][0] == "refused" and "past its retention" in verdicts[old][1]
    status = {i: r.status for i, r in (await letters(sessions, schema)).items()}
    assert status == {first: "dead", second: "dead", third: "purged", old: "purged", row.id: "dead"}
    [entry, _] = json.loads((await cli(settings, "audit", "--json")).stdout)["audit"]
    assert (entry["action"], entry["actor"], sorted(entry["target_ids"])) == (
        "dead_letters.unpurge",
        "ana",
        [first, second],
    )
    assert entry["details"]["parameters"]["retention_days"] == 30
    again = await cli(settings, "dead-letters", "unpurge", str(first))
    assert again.exit_code == 1 and "already dead" in again.stdout
    nothing = await cli(settings, "dead-letters", "unpurge", "-c", NOTIFY)
    assert nothing.exit_code == 2 and "unknown consumer 'books.notify'" in nothing.stderr


async def test_edit_and_replay_through_the_editor_keeps_the_original(books, sessions, tmp_path):
    schema = books.schema_name
    letter = await seed(sessions, schema, event_id=7)
    await with_body(sessions, schema, letter, Posted(id=7, fail="always"))
    original = (await letters(sessions, schema))[letter].body

    bad = tmp_path / "bad.json"
    bad.write_text('{"id": "seven"}')
    before = await snapshot(sessions, schema)
    refused = await cli(
        books, "dead-letters", "edit", str(letter), "--file", str(bad), "--router", ROUTER
    )
    assert refused.exit_code == 2
    assert (
        "the edited body is not a valid Posted: id: Input should be a valid integer"
        in refused.stderr
    )
    not_json = tmp_path / "not.json"
    not_json.write_text("{id: 7")
    broken = await cli(books, "dead-letters", "edit", str(letter), "--file", str(not_json))
    assert broken.exit_code == 2 and "the edited body is not JSON" in broken.stderr
    no_editor = await cli(books, "dead-letters", "edit", str(letter), EDITOR=None, VISUAL=None)  # type: ignore[arg-type]
    assert no_editor.exit_code == 2 and "set $EDITOR" in no_editor.stderr
    editor = tmp_path / "editor.py"
    editor.write_text(
        textwrap.dedent(
            """
            import pathlib, sys
            path = pathlib.Path(sys.argv[1])
            path.write_text(path.read_text().replace('"always"', '""'))
            """
        )
    )
    noop = tmp_path / "noop.py"
    noop.write_text("")
    unchanged = await cli(
        books, "dead-letters", "edit", str(letter), EDITOR=f"{sys.executable} {noop}"
    )
    assert unchanged.exit_code == 1 and "the body was not changed" in unchanged.stderr
    assert await snapshot(sessions, schema) == before

    edited = await cli(
        books, "dead-letters", "edit", str(letter), "--router", ROUTER, "--actor", "kim", "--json",
        EDITOR=f"{sys.executable} {editor}",
    )  # fmt: skip
    assert edited.exit_code == 0, edited.output
    run = json.loads(edited.stdout)["run"]
    [outbox_row] = await sql(sessions, f'SELECT * FROM "{schema}".outbox')
    assert json.loads(outbox_row.body) == {"id": 7, "fail": ""}
    assert (outbox_row.exchange, outbox_row.routing_key) == ("", APPLY)
    kept = (await letters(sessions, schema))[letter]
    assert (kept.status, bytes(kept.body)) == ("replayed", bytes(original))
    [entry] = json.loads((await cli(books, "audit", "--run", run[:8], "--json")).stdout)["audit"]
    assert (entry["action"], entry["actor"], entry["target_ids"]) == (
        "dead_letters.edit_replay",
        "kim",
        [letter],
    )
    parameters = entry["details"]["parameters"]
    assert base64.b64decode(parameters["original_body"]) == bytes(original)
    assert json.loads(base64.b64decode(parameters["edited_body"])) == {"id": 7, "fail": ""}

    async with running_worker(books, router) as worker, running_relay(books):
        await eventually(lambda: worker.stats.outcomes.get("acked") == 1)
    assert [r.event_id for r in await effects(sessions, schema, APPLY)] == [7]
    fate = await cli(books, "dead-letters", "status", "--run", run[:8])
    assert fate.exit_code == 0 and "1 handled" in fate.stdout
    twice = await cli(books, "dead-letters", "edit", str(letter), "--file", str(bad))
    assert twice.exit_code == 1 and "already replayed" in twice.stdout


async def test_redaction_keeps_secrets_out_of_dead_letters_and_output(settings, sessions, tmp_path):
    schema = settings.schema_name
    event = secretive.Charged(
        id=1, card=secretive.Card(number="4111111111111111", holder="Ann"), cvv="123", amount=5
    )
    secret_headers = {"authorization": "Bearer s3cr3t-token", "x-api-token": "tok-999"}
    message = testing.message(event, headers=secret_headers)
    for name in ("pay.capture", "pay.audit"):
        result = await testing.deliver(message, secretive.router[name], sessions, schema=schema)
        assert result.outcome is testing.Outcome.DEAD

    rows = {r.consumer: r for r in (await letters(sessions, schema)).values()}
    capture, audit = rows["pay.capture"], rows["pay.audit"]
    assert json.loads(capture.body) == {
        "id": 1,
        "card": {"number": "***", "holder": "Ann"},
        "amount": 5,
    }
    assert "authorization" not in capture.headers and capture.headers["x-api-token"] == "tok-999"
    assert capture.headers["postroom-redacted"] == "body,headers"
    # The handler's error quoted the card number: blanked out of the message and traceback.
    assert capture.error_message == "card *** of charge 1 declined"
    assert "4111111111111111" not in capture.traceback and "card ***" in capture.traceback
    # The consumer's own redaction replaces the router's: headers masked, body kept.
    assert json.loads(audit.body)["cvv"] == "123" and audit.headers["x-api-token"] == "***"
    assert audit.headers["authorization"] == "Bearer s3cr3t-token"
    assert audit.headers["postroom-redacted"] == "headers"

    for args in (
        ("show", str(capture.id)),
        ("show", str(capture.id), "--json"),
        ("list", "--json"),
    ):
        shown = await cli(settings, "dead-letters", *args)
        assert shown.exit_code == 0, shown.output
        for secret in ("4111111111111111", "s3cr3t", '"123"'):
            assert secret not in shown.stdout, (args, secret)
    replay = await cli(settings, "dead-letters", "replay", str(capture.id), "--json")
    assert replay.exit_code == 1
    [item] = json.loads(replay.stdout)["items"]
    assert item["verdict"] == "refused" and "its body was redacted when stored" in item["detail"]
    whole = tmp_path / "whole.json"
    whole.write_text(event.model_dump_json())  # the person supplies the redacted fields
    edited = await cli(
        settings, "dead-letters", "edit", str(capture.id), "--file", str(whole),
        "--router", "tests.apps.secretive:router", "--json",
    )  # fmt: skip
    assert edited.exit_code == 0, edited.output
    [sent] = await sql(sessions, f'SELECT body, headers FROM "{schema}".outbox')
    assert json.loads(sent.body)["cvv"] == "123" and "postroom-redacted" not in sent.headers
    headers_only = await cli(settings, "dead-letters", "replay", str(audit.id), "--json")
    assert headers_only.exit_code == 0, headers_only.output  # the body is whole: replayable

    # A dead letter stored before the redaction was declared is shown redacted with --router.
    older = await seed(sessions, schema, consumer="pay.capture", topic="pay.charged")
    await sql(
        sessions,
        f'UPDATE "{schema}".dead_letters SET body = :b WHERE id = :i',
        b=event.model_dump_json().encode(),
        i=older,
    )
    plain = await cli(settings, "dead-letters", "show", str(older), "--json")
    assert "4111111111111111" in plain.stdout  # no router given: the stored bytes
    routed = await cli(
        settings,
        "dead-letters",
        "show",
        str(older),
        "--router",
        "tests.apps.secretive:router",
        "--json",
    )
    assert routed.exit_code == 0, routed.output
    shown = json.loads(routed.stdout)
    assert "4111111111111111" not in routed.stdout and '"123"' not in routed.stdout
    assert json.loads(shown["body"])["card"]["number"] == "***"


def test_redaction_rules():
    rule = Redaction(
        drop=("items.sku", "missing.path"), mask=("user.email",), mask_headers=("Cookie",)
    )
    body = b'{"user": {"email": "a@b.c", "name": "n"}, "items": [{"sku": 1, "n": 2}, {"sku": 3}]}'
    redacted, headers = rule.apply(body, {"cookie": "c=1", "trace": "t"})
    assert json.loads(redacted) == {"user": {"email": "***", "name": "n"}, "items": [{"n": 2}, {}]}
    assert headers == {"cookie": "***", "trace": "t", "postroom-redacted": "body,headers"}
    untouched, same = Redaction(drop=("nothing",)).apply(b'{"a": 1}', {"h": 1})
    assert (untouched, same) == (b'{"a": 1}', {"h": 1})
    unreadable, marked = Redaction(mask=("a",)).apply(b"\xff not json", {})
    assert (unreadable, marked) == (b"", {"postroom-redacted": "body"})
    listed, _ = Redaction(mask=("a",)).apply(b"[1, 2]", {})
    assert listed == b""  # not an object: cannot be searched for the fields, so dropped
