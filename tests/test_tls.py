"""TLS through one URL: a private PostgreSQL (ssl=on, hostssl only) and a private RabbitMQ
(an AMQPS listener only), both with certificates from a CA made for this module.

Every command works through one ``sslmode=verify-full`` URL and one ``amqps://`` URL; a
wrong CA or host name fails with one line; a plain connection is refused; ``check``
reports both connections encrypted and verified; and no password, in any form it can be
given, appears in anything postroom prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import aio_pika
import asyncpg
import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from postroom import Outbox, outage, queues, rabbit
from postroom.broker import Broker
from postroom.database import Database
from postroom.metrics import Metrics
from postroom.settings import Settings
from tests.apps.billing import EFFECTS_DDL, Charge
from tests.faults.proxy import FaultProxy
from tests.faults.servers import PrivatePostgres, PrivateRabbit, ThrowawayCA
from tests.helpers import eventually, free_port, http_get

DB_PASSWORD = "Pg-s3cret-Zq81"
AMQP_PASSWORD = "Mq-s3cret-Kx27"
AMQP_USER = "postroom"
VHOST = "tls"

pytestmark = pytest.mark.timeout(300)


@dataclass
class Stage:
    ca: ThrowawayCA
    other_ca: ThrowawayCA
    postgres: PrivatePostgres
    rabbit: PrivateRabbit
    tmp: Path

    def database_url(
        self,
        *,
        host: str = "localhost",
        sslmode: str = "verify-full",
        ca: Path | None = None,
        password: str = "userinfo",
        database: str = "app",
    ) -> str:
        root = ca or self.ca.cert
        userinfo = f"postgres:{DB_PASSWORD}" if password == "userinfo" else "postgres"
        query = f"sslmode={sslmode}&sslrootcert={root}"
        if password == "query":
            query += f"&password={quote(DB_PASSWORD)}"
        return f"postgresql://{userinfo}@{host}:{self.postgres.port}/{database}?{query}"

    def amqp_url(self, *, scheme: str = "amqps", password: str = AMQP_PASSWORD) -> str:
        return f"{scheme}://{AMQP_USER}:{password}@localhost:{self.rabbit.port}/{VHOST}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
        env.update(
            POSTROOM_DATABASE_URL=self.database_url(),
            POSTROOM_AMQP_URL=self.amqp_url(),
            POSTROOM_AMQP_TLS_CA=str(self.ca.cert),
            POSTROOM_HEALTH_HOST="127.0.0.1",
            POSTROOM_POLL_INTERVAL="0.2",
        )
        for key, value in extra.items():
            if value == "":
                env.pop(key, None)
            else:
                env[key] = value
        return env


@pytest.fixture(scope="module")
async def stage(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stage]:
    ca = await ThrowawayCA().create()
    other_ca = await ThrowawayCA("an-unrelated-ca").create()
    cert, key = await ca.issue("server", dns=("localhost",))
    postgres = PrivatePostgres(tls=(cert, key), password=DB_PASSWORD)
    rabbit = PrivateRabbit(tls=(ca.cert, cert, key))
    try:
        await asyncio.gather(postgres.init(), rabbit.start())
        conn = await asyncpg.connect(host="/tmp", port=postgres.port, user="postgres")
        try:
            await conn.execute("CREATE DATABASE app")
        finally:
            await conn.close()
        await rabbit.ctl("add_vhost", VHOST)
        await rabbit.ctl("add_user", AMQP_USER, AMQP_PASSWORD)
        await rabbit.ctl("set_permissions", "-p", VHOST, AMQP_USER, ".*", ".*", ".*")
        yield Stage(ca, other_ca, postgres, rabbit, tmp_path_factory.mktemp("tls"))
    finally:
        await asyncio.gather(postgres.destroy(), rabbit.destroy(), return_exceptions=True)
        ca.destroy()
        other_ca.destroy()


def postroom(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postroom", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(postroom, env, *args)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed, asserting it printed only that."""
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@dataclass
class Served:
    process: subprocess.Popen[str]
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(log: Path, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "postroom", *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )


async def serve(stage: Stage, env: dict[str, str], *args: str) -> Served:
    """Start `postroom ARGS` and wait until its /readyz answers 200."""
    port = free_port()
    log = stage.tmp / f"{args[0]}-{port}.log"
    process = start(log, {**env, "POSTROOM_HEALTH_PORT": str(port)}, *args)
    served = Served(process, port, log)

    async def ready() -> bool:
        assert process.poll() is None, served.output()
        try:
            status, _, _ = await http_get(port, "/readyz")
        except OSError:
            return False
        return status == 200

    await eventually(ready, timeout=60, interval=0.2)
    return served


async def stop(served: Served) -> str:
    served.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(served.process.wait, 30)
    assert code == 0, served.output()
    return served.output()


async def test_every_command_and_a_round_trip_through_one_verify_full_url(stage: Stage):
    env = stage.env()
    migrated = await run(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr

    checked = await run(env, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = {line.split()[1]: line for line in checked.stdout.splitlines()}
    assert "TLS TLSv1." in lines["database"], lines["database"]
    assert "peer verified (CA and host name)" in lines["database"]
    assert "TLS, peer verified (CA and host name)" in lines["broker"], lines["broker"]
    assert "warning" not in checked.stdout

    database = Database.parse(stage.database_url())
    conn = await database.connect()
    try:
        await conn.execute(EFFECTS_DDL.format(schema="postroom"))
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()

    relay = await serve(stage, env, "relay")
    worker = await serve(stage, env, "worker", "tests.apps.billing:router")
    engine = database.engine()
    try:
        async with async_sessionmaker(engine)() as session, session.begin():
            await Outbox().publish(session, Charge(id=7))

        async def applied() -> int:
            conn = await database.connect()
            try:
                # One consumer's effect: billing.audit records its own for the same event.
                return int(
                    await conn.fetchval(
                        "SELECT count(*) FROM postroom.effects WHERE consumer = 'billing.charge'"
                    )
                )
            finally:
                await conn.close()

        assert await eventually(applied, timeout=30) == 1
    finally:
        await engine.dispose()
        await stop(relay)
        await stop(worker)

    for command in (
        ("outbox", "status"),
        ("dead-letters", "list", "--json"),
        ("prune", "--dry-run"),
        ("audit", "--json"),
    ):
        done = await run(env, *command)
        assert done.returncode in (0, 1), (command, done.stderr)
        assert not done.stderr.startswith("postroom:"), (command, done.stderr)
        assert "Traceback" not in done.stderr, (command, done.stderr)


async def test_a_wrong_ca_or_host_name_fails_with_one_line(stage: Stage):
    wrong_ca = await run(
        stage.env(POSTROOM_DATABASE_URL=stage.database_url(ca=stage.other_ca.cert)), "migrate"
    )
    assert wrong_ca.returncode == 2
    line = one_line(wrong_ca)
    assert line.startswith(
        f"postroom: database postgresql://postgres:***@localhost:{stage.postgres.port}/app?"
    )
    assert "the server's certificate was refused (unable to get local issuer certificate)" in line
    assert line.endswith("fix sslrootcert or the host name in POSTROOM_DATABASE_URL")

    wrong_host = await run(
        stage.env(POSTROOM_DATABASE_URL=stage.database_url(host="127.0.0.1")), "migrate"
    )
    assert wrong_host.returncode == 2
    assert "the server's certificate was refused (IP address mismatch" in one_line(wrong_host)

    assert (await run(stage.env(), "migrate")).returncode == 0  # so the broker is checked next
    broker_ca = await run(stage.env(POSTROOM_AMQP_TLS_CA=str(stage.other_ca.cert)), "relay")
    assert broker_ca.returncode == 2
    line = one_line(broker_ca)
    assert line.startswith(
        f"postroom: broker amqps://{AMQP_USER}:***@localhost:{stage.rabbit.port}/tls:"
    )
    assert "the broker's certificate was refused" in line
    assert line.endswith("fix POSTROOM_AMQP_TLS_CA or the host name in POSTROOM_AMQP_URL")


async def test_a_plain_connection_is_refused_where_tls_is_required(stage: Stage):
    plain = await run(
        stage.env(POSTROOM_DATABASE_URL=stage.database_url(sslmode="disable")), "migrate"
    )
    assert plain.returncode == 2
    line = one_line(plain)
    assert (
        'no pg_hba.conf entry for host "127.0.0.1", user "postgres", database "app", no encryption'
        in line
    )
    assert "the server wants TLS" in line

    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await Database.parse(stage.database_url(sslmode="disable")).connect()

    # prefer (libpq's default) and allow both end up encrypted on a hostssl-only server.
    for mode in ("prefer", "allow"):
        conn = await Database.parse(stage.database_url(sslmode=mode)).connect()
        try:
            assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        finally:
            await conn.close()

    checked = await run(
        stage.env(POSTROOM_AMQP_URL=stage.amqp_url(scheme="amqp"), POSTROOM_AMQP_TLS_CA=""),
        "check",
        "--timeout",
        "5",
    )
    assert checked.returncode == 1
    broker = next(line for line in checked.stdout.splitlines() if " broker " in line)
    assert broker.startswith("FAIL broker")


async def test_no_password_in_any_form_reaches_anything_printed(stage: Stage):
    secret_file = stage.tmp / "database-url"
    secret_file.write_text(stage.database_url() + "\n")
    amqp_file = stage.tmp / "amqp-url"
    amqp_file.write_text(stage.amqp_url() + "\n")
    forms = {
        "userinfo": stage.env(POSTROOM_LOG_LEVEL="DEBUG"),
        "query": stage.env(
            POSTROOM_LOG_LEVEL="DEBUG", POSTROOM_DATABASE_URL=stage.database_url(password="query")
        ),
        "files": stage.env(
            POSTROOM_LOG_LEVEL="DEBUG",
            POSTROOM_DATABASE_URL="",
            POSTROOM_DATABASE_URL_FILE=str(secret_file),
            POSTROOM_AMQP_URL="",
            POSTROOM_AMQP_URL_FILE=str(amqp_file),
        ),
    }
    printed: list[str] = []
    for form, env in forms.items():
        for args in (
            ("migrate",),
            ("check",),
            ("outbox", "status"),
            ("--help",),
            ("worker", "--help"),
        ):
            done = await run(env, *args)
            assert done.returncode == 0, (form, args, done.stderr)
            printed.append(done.stdout + done.stderr)
        relay = await serve(stage, env, "relay")
        worker = await serve(stage, env, "worker", "tests.apps.billing:router")
        printed += [await stop(relay), await stop(worker)]
        # Failures, with and without --debug: a missing database, a refused login.
        missing = stage.database_url(
            database="nosuch", password="query" if form == "query" else "userinfo"
        )
        failing = {**env, "POSTROOM_DATABASE_URL": missing}
        failing.pop("POSTROOM_DATABASE_URL_FILE", None)
        for args in (("migrate",), ("--debug", "migrate"), ("relay",), ("check",)):
            done = await run(failing, *args)
            assert done.returncode != 0, (form, args)
            printed.append(done.stdout + done.stderr)
        refused = {**env, "POSTROOM_AMQP_URL": stage.amqp_url(password="not-" + AMQP_PASSWORD)}
        refused.pop("POSTROOM_AMQP_URL_FILE", None)
        done = await run(refused, "--debug", "worker", "tests.apps.billing:router")
        assert done.returncode == 2, done.stderr
        printed.append(done.stdout + done.stderr)
    printed.append((await run(stage.env(), "config-reference")).stdout)

    everything = "\n".join(printed)
    assert "DEBUG" in everything.upper() and "Traceback" in everything  # the levels were on
    assert "login refused for user 'postroom'" in everything
    for secret in (DB_PASSWORD, AMQP_PASSWORD, quote(DB_PASSWORD), "not-" + AMQP_PASSWORD):
        assert secret not in everything


@pytest.mark.parametrize("rst", [False, True], ids=["fin", "rst"])
async def test_tls_connections_cut_mid_record_are_outages(stage: Stage, rst: bool):
    """A proxy forwards part of a TLS record, then closes (FIN) or resets (RST).

    In use (a query answer, a batch of publishes) and while opening (inside the TLS
    handshake), every error the clients raise must be an outage, so the relay and
    the workers requeue and reconnect instead of reporting a bug. Python's TLS
    transport reports a truncated record as the end of the stream or a reset (no
    ``ssl.SSLError`` reaches the caller), which the drivers wrap in their connection
    errors; this pins that down for the verify-full and AMQPS paths postroom uses.
    """
    async with (
        FaultProxy("127.0.0.1", stage.postgres.port) as pg_proxy,
        FaultProxy("127.0.0.1", stage.rabbit.port) as amqp_proxy,
    ):
        database = Database.parse(
            f"postgresql://postgres:{DB_PASSWORD}@localhost:{pg_proxy.port}/app"
            f"?sslmode=verify-full&sslrootcert={stage.ca.cert}"
        )
        broker = Broker.parse(
            f"amqps://{AMQP_USER}:{AMQP_PASSWORD}@localhost:{amqp_proxy.port}/{VHOST}",
            ca=str(stage.ca.cert),
        )
        errors: dict[str, BaseException] = {}

        conn = await database.connect()
        try:
            pg_proxy.cut_after(3_000, rst=rst)  # inside the 200 kB answer's records
            with pytest.raises(Exception) as in_use:
                await conn.fetchval("SELECT repeat('x', 200000)")
            errors["database in use"] = in_use.value
        finally:
            conn.terminate()

        connection = await rabbit.connect(broker, name="postroom-test")
        try:
            publisher = await rabbit.ConfirmingPublisher.open(connection)
            amqp_proxy.cut_after(3_000, rst=rst)  # inside the batch's records
            batch = [
                rabbit.Outgoing(
                    exchange="amq.topic",
                    routing_key="tls.cut",
                    body=b"x" * 20_000,
                    message_id=str(uuid.uuid4()),
                    topic="tls.cut",
                    timestamp=datetime.now(UTC),
                    content_type="application/octet-stream",
                    correlation_id=None,
                    headers={},
                )
                for _ in range(10)
            ]
            with pytest.raises(Exception) as publishing:
                await publisher.publish_many(batch, timeout=20)
            errors["broker in use"] = publishing.value
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

        # New connections: cut inside the TLS handshake (it is larger than 1,000 bytes).
        pg_proxy.cut_after(1_000, rst=rst)
        amqp_proxy.cut_after(1_000, rst=rst)
        with pytest.raises(outage.Unreachable) as opening_database:
            async with outage.reaching(outage.DATABASE, "database"):
                await database.connect()
        errors["database opening"] = opening_database.value
        with pytest.raises(outage.Unreachable) as opening_broker:
            async with outage.reaching(outage.BROKER, "broker"):
                await rabbit.connect(broker, name="postroom-test", timeout=10)
        errors["broker opening"] = opening_broker.value

        # Preconditions: each failure was one of the proxy's cuts, not something else.
        assert pg_proxy.stats.cut == 2 and amqp_proxy.stats.cut == 2, (
            pg_proxy.stats,
            amqp_proxy.stats,
        )
        not_outages = {
            where: outage.describe(exc)
            for where, exc in errors.items()
            if not outage.is_outage(exc)
        }
        assert not not_outages, not_outages


async def test_the_queue_gauge_connects_with_the_brokers_ca(stage: Stage):
    """The worker's queue watcher (``postroom_queue_messages_ready``) opened its own
    connection from the bare URL, so it verified the broker against the system store
    and, with ``POSTROOM_AMQP_TLS_CA`` naming a private CA, never connected (found in
    the TLS fault run's logs: CERTIFICATE_VERIFY_FAILED every interval)."""
    settings = Settings(
        database_url=stage.database_url(),  # type: ignore[arg-type]
        amqp_url=stage.amqp_url(),  # type: ignore[arg-type]
        amqp_tls_ca=str(stage.ca.cert),
        metrics_interval=0.2,
        log_format="console",
    )
    queue = f"tls.gauge.{uuid.uuid4().hex[:8]}"
    connection = await rabbit.connect(settings.broker, name="postroom-test")
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, auto_delete=True)
        await channel.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue)
        metrics = Metrics()
        stop = asyncio.Event()
        watching = asyncio.create_task(queues.watch(settings, [queue], metrics, stop))
        try:
            sample = "postroom_queue_messages_ready"
            assert await eventually(
                lambda: metrics.registry.get_sample_value(sample, {"consumer": queue}) == 1,
                timeout=20,
            )
        finally:
            stop.set()
            await asyncio.wait_for(watching, 20)
        await declared.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()
