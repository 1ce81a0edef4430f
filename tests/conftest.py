"""Real-service fixtures: a private database and RabbitMQ vhost per test run.

Tests never mock PostgreSQL or RabbitMQ. Each run creates its own database and vhost
(so concurrent runs never collide) and each test gets its own schema and exchange names.
A missing service fails loudly, naming the URL and how to start it.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from postroom.migrate import head_revision, upgrade
from postroom.settings import Settings
from postroom.tables import VERSION_TABLE, metadata, schema_map

PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_ROOT = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the long fault scenarios too")
    parser.addoption(
        "--seed", type=int, default=None, help="replay the fault scenarios with this seed"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long scenario: run with --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _token() -> str:
    return uuid.uuid4().hex[:10]


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        pytest.fail("rabbitmqctl not found: tests create a private vhost with it")
    subprocess.run([exe, *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database for this run, migrated to head; dropped afterwards."""
    name = f"postroom_test_{_token()}"

    async def admin(sql: str) -> None:
        try:
            conn = await asyncpg.connect(PG_ADMIN, timeout=10)
        except (OSError, asyncpg.PostgresError) as exc:
            pytest.fail(
                f"PostgreSQL is not reachable at {PG_ADMIN} ({exc}); start it with "
                "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
            )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    url = f"{base}/{name}"
    upgrade(Settings(database_url=url))  # type: ignore[arg-type]
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A private RabbitMQ vhost for this run; deleted afterwards."""
    vhost = f"postroom-test-{_token()}"

    async def probe() -> None:
        try:
            connection = await aio_pika.connect(AMQP_ROOT, timeout=10)
        except Exception as exc:
            pytest.fail(
                f"RabbitMQ is not reachable at {AMQP_ROOT} ({exc}); start it with "
                "`rabbitmq-server -detached`"
            )
        await connection.close()

    asyncio.run(probe())
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield AMQP_ROOT.rstrip("/") + "/" + vhost
    _rabbitmqctl("delete_vhost", vhost)


def create_tables_at_head(sync: Connection, schema: str) -> None:
    """Create postroom's tables in *schema*, stamped at head as `postroom migrate` leaves them.

    Faster than running the migrations per test; the relay's and worker's pre-flight then
    find the schema at head, as in production.
    """
    metadata.create_all(sync.execution_options(schema_translate_map=schema_map(schema)))
    sync.execute(
        text(
            f'CREATE TABLE "{schema}".{VERSION_TABLE} '
            "(version_num varchar(32) NOT NULL PRIMARY KEY)"
        )
    )
    sync.execute(
        text(f'INSERT INTO "{schema}".{VERSION_TABLE} VALUES (:head)'), {"head": head_revision()}
    )


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The fault scenarios' seed: ``--seed`` or FAULTS_SEED replays a run, else a fresh one."""
    value = request.config.getoption("--seed")
    if value is None:
        value = int(os.environ.get("FAULTS_SEED") or random.SystemRandom().randrange(1, 1 << 31))
    print(f"\nfault seed: {value} (replay with --seed {value})")
    return value


@pytest.fixture
def names() -> str:
    """A token unique to this test, for schema, exchange, queue and consumer names."""
    return _token()


@pytest.fixture
async def settings(database_url: str, amqp_url: str, names: str) -> AsyncIterator[Settings]:
    """Settings aimed at a fresh schema and fresh exchanges, private to this test."""
    schema = f"t_{names}"
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        await conn.run_sync(create_tables_at_head, schema)
    yield Settings(
        database_url=database_url,  # type: ignore[arg-type]
        amqp_url=amqp_url,  # type: ignore[arg-type]
        schema=schema,
        exchange=f"ev.{names}",
        dead_letter_exchange=f"dead.{names}",
        poll_interval=0.2,
        health_port=0,
        log_format="console",
    )
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    await engine.dispose()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url, pool_size=5)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
async def amqp(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(amqp_url)
    yield connection
    await connection.close()


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a `postroom` subprocess needs to reproduce *settings*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTROOM_")}
    values: Mapping[str, Any] = settings.model_dump(by_alias=True)
    for name, value in values.items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"POSTROOM_{name.upper()}"] = str(value)
    env.update(extra)
    return env


def postroom_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "postroom", *args]
