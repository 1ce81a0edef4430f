"""Misconfiguration gets one line naming the fix and an exit code, never a traceback.

Each case of issue 12's finding 5, reproduced against the real services: the exact line,
the exit code (2: configuration, 3: unreachable) and no traceback unless ``--debug``.
Also: the relay and a worker side by side on one host with default health settings.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess

import aio_pika
import pytest

from postroom import Outbox
from postroom.errors import SchemaNotReadyError
from postroom.migrate import head_revision
from postroom.rabbit import QueueSpec, declare_queues
from postroom.settings import Settings
from tests.apps.billing import Charge
from tests.conftest import postroom_cmd, settings_env
from tests.helpers import eventually, http_get, logs_of, spawn, wait_exit

BILLING = "tests.apps.billing:router"


def run(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = settings_env(settings, **env)
    for key in [k for k, v in environment.items() if v == ""]:
        del environment[key]  # "" here means: unset it
    return subprocess.run(
        postroom_cmd(*args), env=environment, capture_output=True, text=True, timeout=60
    )


async def answer(settings: Settings, *args: str, **env: str) -> tuple[int, str]:
    """Run `postroom ARGS`; return its exit code and the one line it printed."""
    done = await asyncio.to_thread(run, settings, *args, **env)
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return done.returncode, lines[0]


def local_url(database: str, host: str = "127.0.0.1:5432") -> str:
    return f"postgresql://postgres@{host}/{database}"


@pytest.mark.parametrize("command", [("migrate",), ("relay",), ("worker", BILLING)])
async def test_a_database_that_does_not_exist(settings, names, command):
    missing = f"nosuch_{names}"
    code, line = await answer(settings, *command, POSTROOM_DATABASE_URL=local_url(missing))
    assert (code, line) == (
        2,
        f'postroom: database {local_url(missing)}: database "{missing}" does not exist; '
        "create it or fix POSTROOM_DATABASE_URL",
    )


async def test_a_host_that_does_not_resolve_names_the_setting(settings):
    url = local_url("app", host="db.invalid:5432")
    code, line = await answer(settings, "migrate", POSTROOM_DATABASE_URL=url)
    assert (code, line) == (
        3,
        f"postroom: database {url}: cannot resolve host 'db.invalid'; fix POSTROOM_DATABASE_URL",
    )


@pytest.mark.parametrize("command", [("relay",), ("worker", BILLING)])
async def test_relay_and_worker_before_migrate_consume_nothing(settings, names, amqp, command):
    # A message waits in the consumer's queue; a worker of an unmigrated schema must not touch it.
    await declare_queues(
        amqp,
        exchange=settings.exchange,
        dead_letter_exchange=settings.dead_letter_exchange,
        queues=[QueueSpec(name="billing.charge", topics=("billing.charge",), delivery_limit=20)],
    )
    channel = await amqp.channel()
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id="m1"), routing_key="billing.charge"
        )
        schema = f"unmigrated_{names}"
        code, line = await answer(settings, *command, POSTROOM_SCHEMA=schema)
        assert (code, line) == (
            2,
            f"postroom: schema '{schema}' has no postroom tables (head is {head_revision()}); "
            "run `postroom migrate`",
        )
        queue = await channel.declare_queue("billing.charge", passive=True)
        waiting = await queue.get(timeout=5)
        assert waiting is not None and waiting.message_id == "m1"
        assert not waiting.redelivered, "the worker took the message before refusing to start"
        await waiting.ack()
    finally:
        for name in ("billing.charge", "billing.charge.dead"):
            await channel.queue_delete(name)
        await channel.close()


async def test_publish_before_migrate_names_the_schema_and_the_command(sessions, names):
    outbox = Outbox(schema=f"unmigrated_{names}")
    async with sessions() as session:
        with pytest.raises(SchemaNotReadyError) as raised:
            async with session.begin():
                await outbox.publish(session, Charge(id=1))
    assert str(raised.value) == (
        f"schema 'unmigrated_{names}' has no postroom tables; run `postroom migrate`"
    )


async def test_a_wrong_broker_password(settings, amqp_url):
    wrong = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    shown = amqp_url.replace("guest:guest@", "guest:***@")
    code, line = await answer(settings, "worker", BILLING, POSTROOM_AMQP_URL=wrong)
    assert (code, line) == (
        2,
        f"postroom: broker {shown}: login refused for user 'guest'; fix the user or password "
        "in POSTROOM_AMQP_URL",
    )


async def test_a_misspelt_router_attribute(settings):
    code, line = await answer(settings, "worker", "tests.apps.billing:routr")
    assert (code, line) == (
        2,
        "postroom: module 'tests.apps.billing' has no attribute 'routr' "
        "(in 'tests.apps.billing:routr')",
    )


async def test_debug_adds_the_traceback_and_keeps_the_line(settings, names):
    missing = f"nosuch_{names}"
    done = await asyncio.to_thread(
        run, settings, "--debug", "migrate", POSTROOM_DATABASE_URL=local_url(missing)
    )
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(f'postroom: database {local_url(missing)}: database "{missing}" does not exist')
    )


async def test_a_health_port_set_and_taken_is_one_line(settings):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await asyncio.to_thread(
            run, settings, "relay", POSTROOM_HEALTH_HOST="127.0.0.1", POSTROOM_HEALTH_PORT=str(port)
        )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"postroom: health server: 127.0.0.1:{port} is already in use (another postroom "
        "process?); set POSTROOM_HEALTH_PORT to a free port, or 0 for none"
    )


def served_port(log: str) -> int | None:
    for line in log.splitlines():
        if '"health.serving"' in line:
            return int(json.loads(line[line.index("{") :])["port"])
    return None


async def test_relay_and_worker_side_by_side_with_default_settings(settings, amqp):
    defaults = settings.model_copy(update={"health_port": None, "log_format": "json"})
    assert "POSTROOM_HEALTH_PORT" not in settings_env(defaults)
    relay = spawn(defaults, "relay")
    worker = spawn(defaults, "worker", BILLING)
    try:
        ports: dict[str, int] = {}
        for role, process, default in (("relay", relay, 9000), ("worker", worker, 9001)):
            port = await eventually(lambda p=process: served_port(logs_of(p, tail=100_000)))
            log = logs_of(process, tail=100_000)
            # The role's default port, or (when something on this shared host holds it) a
            # free one, said in a warning: either way the log names where the probes are.
            assert port == default or re.search(
                rf'"health.default_port_taken".*"port": {default}', log
            ), log

            async def ready(port: int = port) -> bool:
                try:
                    status, _, _ = await http_get(port, "/readyz")
                except OSError:
                    return False
                return status == 200

            await eventually(ready, timeout=30)
            status, _, _ = await http_get(port, "/livez")
            assert status == 200
            ports[role] = port
        assert ports["relay"] != ports["worker"]
        assert relay.poll() is None and worker.poll() is None
    finally:
        for process in (relay, worker):
            process.terminate()
        codes = [await wait_exit(process) for process in (relay, worker)]
        channel = await amqp.channel()
        for name in (
            "billing.charge",
            "billing.charge.dead",
            "billing.audit",
            "billing.audit.dead",
        ):
            await channel.queue_delete(name)
        await channel.close()
    assert codes == [0, 0], logs_of(relay) + logs_of(worker)
    assert "Traceback" not in logs_of(relay, tail=100_000) + logs_of(worker, tail=100_000)


async def test_an_unexpected_error_keeps_its_traceback(settings):
    done = await asyncio.to_thread(run, settings, "worker", "tests.apps.broken:router")
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr  # a bug, not a misconfiguration
    assert done.stderr.strip().splitlines()[-1] == (
        "postroom: unexpected error: RuntimeError: this module fails at import, on purpose"
    )
