"""The console's pages and previews, read over HTTP from a real `postroom console` process."""

from __future__ import annotations

from sqlalchemy import text

from postroom.deadletters import DeadReason
from postroom.settings import Settings
from tests.consoles import OPERATOR_TOKEN, READER_TOKEN, http, served_console
from tests.test_ops import APPLY, NOTIFY, seed

AS_OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}


async def test_pages_show_what_the_cli_shows(settings: Settings, sessions) -> None:
    schema = settings.schema_name
    first = await seed(sessions, schema, event_id=1)
    await seed(sessions, schema, event_id=2)
    other = await seed(
        sessions,
        schema,
        consumer=NOTIFY,
        event_id=3,
        reason=DeadReason.REJECTED,
        error_type="LookupError",
        error_message="account 'acct-3' not found",
    )
    async with served_console(settings) as base:
        groups = await http(base + "/", headers=AS_OPERATOR)
        assert groups.status == 200
        assert "books timed out after &lt;n&gt; ms" in groups.body  # the shape, escaped
        listed = await http(base + f"/letters?consumer={NOTIFY}", headers=AS_OPERATOR)
        assert (
            f'href="/letters/{other}"' in listed.body
            and f'href="/letters/{first}"' not in listed.body
        )
        shown = await http(base + f"/letters/{first}", headers=AS_OPERATOR)
        assert shown.status == 200 and "&#34;id&#34;: 1" in shown.body and "Traceback" in shown.body
        assert (await http(base + "/letters/99999", headers=AS_OPERATOR)).status == 404
        for page in ("/consumers", "/outbox", "/audit"):
            assert (await http(base + page, headers=AS_OPERATOR)).status == 200, page

        # Bad filters are refused with the CLI's words, not a traceback.
        bad = await http(base + "/letters?since=yesterday", headers=AS_OPERATOR)
        assert bad.status == 400 and "--since &#39;yesterday&#39; is not a time" in bad.body
        status = await http(base + "/?status=zombie", headers=AS_OPERATOR)
        assert status.status == 400 and "unknown status" in status.body

        # Previews: one dead letter by id; a filter; never without a selection.
        one = await http(base + f"/replay/preview?ids={first}", headers=AS_OPERATOR)
        assert "<strong>1</strong> dead letter would be replayed" in one.body
        assert f'name="ids" value="{first}"' in one.body
        by_type = await http(base + "/purge/preview?error_type=TimeoutError", headers=AS_OPERATOR)
        assert "<strong>2</strong> dead letters would be purged" in by_type.body
        assert (
            f'<td>{APPLY}</td><td>TimeoutError</td><td>would purge</td><td class="num">2</td>'
            in by_type.body
        )
        assert (
            f'<td>{NOTIFY}</td><td>(any)</td><td>none selected</td><td class="num">0</td>'
            in by_type.body
        )
        unfiltered = await http(base + "/replay/preview", headers=AS_OPERATOR)
        assert unfiltered.status == 400 and "say which dead letters" in unfiltered.body
        everything = await http(base + "/replay/preview?all=1", headers=AS_OPERATOR)
        assert "<strong>3</strong> dead letters would be replayed" in everything.body
        # A reader may look at a preview but gets no confirmation button.
        reader = await http(
            base + "/replay/preview?all=1", headers={"Authorization": f"Bearer {READER_TOKEN}"}
        )
        assert 'id="confirm"' in everything.body
        assert reader.status == 200 and 'id="confirm"' not in reader.body
    async with sessions() as session:
        rows = (await session.execute(text(f'SELECT status FROM "{schema}".dead_letters'))).all()
    assert {row.status for row in rows} == {"dead"}, "a page or a preview changed something"
