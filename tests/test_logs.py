"""Logs in production format: one JSON object per line, stable keys, no secrets."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

from postroom import Event, Outbox
from tests.helpers import served_relay, wait_exit

PASSWORD = "Pw-n0t-for-logs"


class Unheard(Event, topic="logs.unheard"):
    n: int


async def test_relay_logs_json_lines_with_stable_keys_and_no_password(settings, sessions, tmp_path):
    # Postgres here trusts local connections, so any password works and must never show.
    database = settings.database_url.get_secret_value().replace(
        "postgres@", f"postgres:{PASSWORD}@", 1
    )
    assert PASSWORD in database
    box = Outbox.from_settings(settings)
    async with sessions() as session, session.begin():
        message = await box.publish(session, Unheard(n=1))  # no queue bound: refused
    log_path = tmp_path / "relay.log"
    async with served_relay(
        settings,
        log_path,
        POSTROOM_DATABASE_URL=database,
        POSTROOM_LOG_FORMAT="json",
        POSTROOM_LOG_LEVEL="DEBUG",
    ) as relay:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while "relay.unroutable" not in relay.log():
            assert loop.time() < deadline, relay.log()
            await asyncio.sleep(0.05)
        relay.process.terminate()
        assert await wait_exit(relay.process, timeout=10) == 0

    text = log_path.read_text()
    assert PASSWORD not in text
    events = [json.loads(line) for line in text.splitlines()]  # every line is one JSON event
    for event in events:
        assert {"event", "level", "logger", "timestamp"} <= event.keys(), event
        assert datetime.fromisoformat(event["timestamp"]).utcoffset().total_seconds() == 0
    by_name = {event["event"]: event for event in events}

    starting = by_name["relay.starting"]
    assert (starting["level"], starting["logger"]) == ("info", "postroom.service")
    assert starting["schema"] == settings.schema_name and "settings" not in starting
    shown = by_name["relay.settings"]  # every setting, at DEBUG only, redacted
    assert shown["level"] == "debug"
    assert shown["settings"]["database_url"].startswith("postgresql+asyncpg://postgres:***@")
    assert by_name["relay.connecting"]["database"].startswith("postgresql://postgres:***@")

    failed = by_name["relay.unroutable"]  # one line per topic and interval, not per row
    assert failed["level"] == "warning" and failed["logger"] == "postroom.relay"
    assert failed["topic"] == "logs.unheard"
    assert "no queue is bound" in failed["hint"]
    assert "body" not in failed and str(message.message_id) not in json.dumps(failed)
    assert by_name["process.stopping"]["signal"] == "SIGTERM"
    assert by_name["relay.stopped"]["failed"] >= 1
