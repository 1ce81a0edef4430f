"""The console in a real browser: an on-call engineer's whole trial, clicked end to end.

Debian's chromium, driven by playwright (no browser download: `make test` installs the
apt package). Real PostgreSQL, RabbitMQ, relay and worker; the console is a real
`postroom console` process. Screenshots go to the test's tmp_path (and, when
CONSOLE_SCREENSHOTS_DIR is set, there too: that is how docs/img/console-*.png are made).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, async_playwright, expect
from sqlalchemy import text

from postroom.deadletters import DeadReason
from postroom.settings import Settings
from tests.apps.repairable import router
from tests.consoles import OPERATOR_TOKEN, served_console
from tests.helpers import eventually, running_relay, running_worker
from tests.test_ops import (
    APPLY,
    NOTIFY,
    books,  # noqa: F401 (a fixture)
    seed,
)

pytestmark = pytest.mark.timeout(240)


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("chromium is not installed: `make test` installs it (scripts/ensure-browser)")
    return found


async def shot(page: Page, out: Path, name: str) -> None:
    path = out / f"console-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("CONSOLE_SCREENSHOTS_DIR")
    if target:
        await asyncio.to_thread(shutil.copy, path, os.path.join(target, path.name))


async def rows(sessions, sql: str, **params: Any) -> list[Any]:
    async with sessions() as session:
        return list((await session.execute(text(sql), params)).all())


async def test_on_call_trial_in_the_browser(books: Settings, sessions, tmp_path: Path) -> None:  # noqa: F811
    schema = books.schema_name
    timeouts = [
        await seed(sessions, schema, event_id=i, error_message=f"books timed out after {i}00 ms")
        for i in range(1, 7)
    ]
    for i in range(7, 9):
        await seed(
            sessions,
            schema,
            event_id=i,
            error_type="LookupError",
            error_message=f"account 'acct-{i}' not found",
        )
    others = [await seed(sessions, schema, consumer=NOTIFY, event_id=i) for i in range(10, 13)]
    rejected = await seed(
        sessions,
        schema,
        consumer=NOTIFY,
        event_id=20,
        reason=DeadReason.REJECTED,
        error_type="postroom.errors.Reject",
        error_message="parcel weight -3 kg is invalid",
    )

    async with (
        running_relay(books),
        running_worker(books, router),
        served_console(books, "--router", "tests.apps.repairable:router") as base,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(
            executable_path=chromium(), args=["--no-sandbox"]
        )
        page = await browser.new_page(viewport={"width": 1280, "height": 800})
        try:
            # Log in: the name is the actor of every change.
            await page.goto(base + "/")
            await page.fill("input[name=name]", "ana")
            await page.fill("input[name=token]", OPERATOR_TOKEN)
            await page.click("button[type=submit]")
            await expect(page.locator("h1")).to_have_text("Groups of failures")
            await expect(page.locator("#groups tbody tr")).to_have_count(4)
            await shot(page, tmp_path, "groups")

            # Filter to one consumer, then open its TimeoutError group.
            await page.select_option("select[name=consumer]", APPLY)
            await page.click("#filters button[type=submit]")
            await expect(page.locator("#groups tbody tr")).to_have_count(2)
            timeout_row = page.locator("#groups tbody tr", has_text="TimeoutError")
            await timeout_row.get_by_role("link", name="list").click()
            await expect(page.locator("h1")).to_have_text("Dead letters")
            await expect(page.locator("#letters tbody tr")).to_have_count(6)
            await shot(page, tmp_path, "letters")

            # Preview the replay: exactly these 6, all of books.apply, none of books.notify.
            await page.click("#replay-these")
            await expect(page.locator("h1")).to_have_text("Replay: preview")
            await expect(page.locator("#summary")).to_contain_text(
                "6 dead letters would be replayed"
            )
            slices = await page.locator("#slices tbody tr").all_inner_texts()
            assert [" ".join(s.split()) for s in slices] == [
                f"{APPLY} TimeoutError would replay 6",
                f"{NOTIFY} (any) none selected 0",
            ]
            await shot(page, tmp_path, "replay-preview")
            nothing = await rows(
                sessions, f"SELECT id FROM \"{schema}\".dead_letters WHERE status <> 'dead'"
            )
            assert nothing == [], "the preview changed something"

            # Confirm: the run's page shows the audit row, then the messages handled.
            await page.click("#confirm")
            await expect(page.locator("#audit tbody tr").first).to_contain_text(
                "dead_letters.replay"
            )
            await expect(page.locator("#audit tbody tr").first).to_contain_text("ana")

            async def all_handled() -> bool:
                await page.click("#fates a")  # refresh
                return "6 handled" in await page.locator("#fates").inner_text()

            await eventually(all_handled, timeout=60, interval=0.5)
            await shot(page, tmp_path, "replay-run")
            applied = await rows(
                sessions,
                f'SELECT event_id, count(*) AS n FROM "{schema}".books_effects '
                "WHERE consumer = :c GROUP BY event_id ORDER BY event_id",
                c=APPLY,
            )
            assert [(r.event_id, r.n) for r in applied] == [(i, 1) for i in range(1, 7)]
            assert (
                await rows(
                    sessions,
                    f'SELECT 1 FROM "{schema}".books_effects WHERE consumer = :c',
                    c=NOTIFY,
                )
                == []
            )
            statuses = await rows(
                sessions, f'SELECT id, status FROM "{schema}".dead_letters ORDER BY id'
            )
            assert {r.id for r in statuses if r.status == "replayed"} == set(timeouts)
            assert {r.id: r.status for r in statuses if r.id in others} == dict.fromkeys(
                others, "dead"
            )

            # One replayed letter: body, headers, traceback, its chain and its fate.
            await page.goto(f"{base}/letters/{timeouts[0]}")
            await expect(page.locator("#fate")).to_contain_text("handled")
            await expect(page.locator("#body")).to_contain_text('"id": 1')
            await expect(page.locator("#chain tbody tr")).to_have_count(1)
            await shot(page, tmp_path, "letter")

            # Purge the rejected one, after its preview.
            await page.goto(f"{base}/letters?consumer={NOTIFY}&reason=rejected")
            await page.click("#purge-these")
            await expect(page.locator("#summary")).to_contain_text("1 dead letter would be purged")
            await page.click("#confirm")
            await expect(page.locator("#audit tbody tr").first).to_contain_text(
                "dead_letters.purge"
            )
            [purged] = await rows(
                sessions, f'SELECT status FROM "{schema}".dead_letters WHERE id = :i', i=rejected
            )
            assert purged.status == "purged"

            # Un-purge it: the purged list, its preview, the confirmation.
            await page.goto(f"{base}/letters?consumer={NOTIFY}&status=purged")
            await page.click("#unpurge-these")
            await expect(page.locator("#summary")).to_contain_text(
                "1 dead letter would be restored"
            )
            await page.click("#confirm")
            await expect(page.locator("#audit tbody tr").first).to_contain_text(
                "dead_letters.unpurge"
            )
            [restored] = await rows(
                sessions, f'SELECT status FROM "{schema}".dead_letters WHERE id = :i', i=rejected
            )
            assert restored.status == "dead"

            # Pause a consumer, with a reason; the audit and the table say who and why.
            await page.click("nav >> text=Consumers")
            row = page.locator(f"#consumers tr[data-consumer='{NOTIFY}']")
            await row.locator("input[name=reason]").fill("invoicing is down")
            await row.get_by_role("button", name="Pause").click()
            await expect(page.locator(f"#consumers tr[data-consumer='{NOTIFY}']")).to_contain_text(
                "paused"
            )
            await shot(page, tmp_path, "consumers")
            [pause] = await rows(sessions, f'SELECT consumer, actor, reason FROM "{schema}".pauses')
            assert tuple(pause) == (NOTIFY, "ana", "invoicing is down")

            await page.click("nav >> text=Audit")
            await expect(page.locator("h1")).to_have_text("Audit trail")
            await expect(page.locator("#audit tbody tr")).to_have_count(4)
            actions = await page.locator("#audit tbody tr td:nth-child(4)").all_inner_texts()
            assert actions == [
                "consumers.pause",
                "dead_letters.unpurge",
                "dead_letters.purge",
                "dead_letters.replay",
            ]
            await shot(page, tmp_path, "audit")
        finally:
            await browser.close()
    taken = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.glob("*.png")))
    expected = ["groups", "letters", "replay-preview", "replay-run", "letter", "consumers", "audit"]
    assert taken == sorted(f"console-{name}.png" for name in expected)
