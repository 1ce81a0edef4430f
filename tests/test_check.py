"""`postroom check`: one line per check, a clear reason, bounded time, no secrets."""

from __future__ import annotations

import asyncio
import subprocess
import time

import asyncpg

from postroom.check import check_config, run_checks
from postroom.migrate import head_revision
from postroom.settings import Settings
from tests.conftest import postroom_cmd, settings_env
from tests.faults.proxy import FaultProxy
from tests.helpers import free_port

PASSWORD = "Pw-n0t-for-logs"


def migrated(settings: Settings) -> Settings:
    """*settings* aimed at the run's database schema `postroom`, migrated to head by conftest."""
    return settings.model_copy(update={"schema_name": "postroom"})


def with_urls(settings: Settings, *, database: str | None = None, amqp: str | None = None):
    values = settings.model_dump(by_alias=True)
    values["database_url"] = database or values["database_url"]
    values["amqp_url"] = amqp or values["amqp_url"]
    return Settings.model_validate(values)


def by_name(results) -> dict[str, tuple[bool, str]]:
    return {result.name: (result.ok, result.detail) for result in results}


async def run_cli(settings: Settings, **env: str) -> tuple[int, str, str]:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            postroom_cmd("check", "--timeout", "3"),
            env=settings_env(settings, **env),
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = await asyncio.to_thread(run)
    return done.returncode, done.stdout, done.stderr


async def test_passes_on_a_migrated_schema(settings):
    results = by_name(await run_checks(migrated(settings)))
    assert results["database"][0] and "PostgreSQL" in results["database"][1]
    connection = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        autovacuum = await connection.fetchval("SHOW autovacuum")
    finally:
        await connection.close()
    # A server without autovacuum passes, with a warning: the outbox would bloat.
    assert ("autovacuum is off" in results["database"][1]) == (autovacuum != "on")
    assert results["migrations"] == (True, f"schema 'postroom' is at head ({head_revision()})")
    assert results["broker"][0]


async def test_schema_behind_head_says_run_migrate(settings, database_url):
    # postroom's tables without migration history, as in a schema never migrated.
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        await conn.execute(f'DROP TABLE "{settings.schema_name}".postroom_alembic_version')
    finally:
        await conn.close()
    results = by_name(await run_checks(settings))
    ok, detail = results["migrations"]
    assert not ok
    assert f"schema '{settings.schema_name}' has no postroom tables" in detail
    assert "run `postroom migrate`" in detail

    # A schema stamped with a revision this package does not ship (a newer postroom).
    conn = await asyncpg.connect(settings.asyncpg_dsn)
    try:
        await conn.execute(
            f'CREATE TABLE "{settings.schema_name}".postroom_alembic_version '
            "(version_num varchar(32) PRIMARY KEY)"
        )
        await conn.execute(
            f"INSERT INTO \"{settings.schema_name}\".postroom_alembic_version VALUES ('9999')"
        )
    finally:
        await conn.close()
    ok, detail = by_name(await run_checks(settings))["migrations"]
    assert not ok and "at 9999, a revision this postroom does not know" in detail


async def test_unreachable_database_and_broker_fail_with_the_reason(settings):
    closed = free_port()
    broken = with_urls(
        settings,
        database=f"postgresql+asyncpg://postroom:{PASSWORD}@127.0.0.1:{closed}/app",
        amqp=f"amqp://guest:guest@127.0.0.1:{closed}/",
    )
    results = by_name(await run_checks(broken))
    ok, detail = results["database"]
    assert not ok
    assert f"postgresql://postroom:***@127.0.0.1:{closed}/app" in detail
    assert "Connect call failed" in detail and PASSWORD not in detail
    assert results["migrations"] == (False, "not checked: the database is unreachable")
    ok, detail = results["broker"]
    assert not ok and "Connect call failed" in detail


async def test_a_silent_database_times_out_instead_of_hanging(settings):
    async with FaultProxy("127.0.0.1", 5432) as proxy:
        proxy.blackhole(True)
        url = settings.database_url.get_secret_value().replace(
            "127.0.0.1:5432", f"{proxy.host}:{proxy.port}"
        )
        started = time.monotonic()
        results = by_name(await run_checks(with_urls(settings, database=url), timeout=1))
        assert time.monotonic() - started < 3
        assert results["database"][0] is False
        assert results["database"][1].endswith("no answer within 1s")
        proxy.heal()


def test_config_errors_name_the_variable_without_the_secret():
    settings, result = check_config({"POSTROOM_DATABASE_URL": f"mysql://u:{PASSWORD}@db/app"})
    assert settings is None and not result.ok
    assert "POSTROOM_DATABASE_URL" in result.detail and "postgresql+asyncpg://" in result.detail
    assert PASSWORD not in result.detail
    settings, result = check_config({"POSTROOM_DATABASE_URL": "postgresql://db/app"})
    assert settings is not None and result.ok


async def test_cli_exit_codes_and_output(settings):
    code, out, err = await run_cli(migrated(settings))
    assert code == 0, out + err
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["OK", "config"],
        ["OK", "database"],
        ["OK", "migrations"],
        ["OK", "relays"],
        ["OK", "broker"],
    ]

    code, out, err = await run_cli(
        settings, POSTROOM_DATABASE_URL=f"postgresql://nobody:{PASSWORD}@127.0.0.1:{free_port()}/x"
    )
    assert code == 1
    assert out.splitlines()[1].startswith("FAIL database    postgresql://nobody:***@127.0.0.1:")
    assert PASSWORD not in out + err

    code, out, err = await run_cli(settings, POSTROOM_DATABASE_URL=f"mysql://u:{PASSWORD}@db/x")
    assert code == 2
    assert out.startswith("FAIL config      invalid settings: POSTROOM_DATABASE_URL:")
    assert PASSWORD not in out + err
