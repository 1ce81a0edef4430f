"""A newcomer's first day, from the wheel: install, migrate, publish, `postroom dev`, tests.

The wheel is built from this checkout and installed into a fresh virtualenv outside it
(no editable install, nothing of the checkout on the path); the five-minute guide's files
are written to a project folder of their own and used exactly as the guide says, against
a database of their own and this run's RabbitMQ vhost.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import PG_ADMIN, ROOT
from tests.helpers import eventually, wait_exit
from tests.test_docs import write_project

CONSUMER = "loyalty.award-points"


def sh(*args: str | Path, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
async def guide_database():
    """A database for the guide's project alone (its tables live in `public`)."""
    name = f"postroom_wheel_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    yield f"{base}/{name}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def start_dev(venv: Path, project: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [venv / "bin" / "postroom", "dev", "loyalty.consumers:router"],
            cwd=project,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )


@pytest.mark.timeout(600)
async def test_the_guide_works_from_the_wheel_in_a_fresh_virtualenv(
    tmp_path, guide_database, amqp_url, amqp, names
):
    assert not tmp_path.is_relative_to(ROOT)
    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTROOM_", "PYTEST_", "PYTHON", "VIRTUAL_ENV"))
    }
    dist, venv, project = tmp_path / "dist", tmp_path / "venv", tmp_path / "project"

    # Build and install: the wheel, its dependencies and the test tools the guide names.
    await asyncio.to_thread(
        sh, sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ROOT,
        cwd=tmp_path, env=base_env,
    )
    [wheel] = dist.glob("postroom-*.whl")
    await asyncio.to_thread(sh, sys.executable, "-m", "venv", venv, cwd=tmp_path, env=base_env)
    python = venv / "bin" / "python"
    await asyncio.to_thread(
        sh, python, "-m", "pip", "install", "-q", wheel, "pytest", "pytest-asyncio",
        cwd=tmp_path, env=base_env,
    )
    write_project("five-minute-consumer.md", project)
    where = await asyncio.to_thread(
        sh, python, "-c", "import postroom, sys; print(postroom.__file__); print(sys.path)",
        cwd=project, env=base_env,
    )
    assert where.splitlines()[0].startswith(str(venv)), where
    assert str(ROOT) not in where, where

    env = {
        **base_env,
        "POSTROOM_DATABASE_URL": guide_database,
        "POSTROOM_AMQP_URL": amqp_url,
        "POSTROOM_EXCHANGE": f"ev.{names}",
        "POSTROOM_DEAD_LETTER_EXCHANGE": f"dead.{names}",
        "POSTROOM_HEALTH_PORT": "0",
        "POSTROOM_LOG_FORMAT": "json",
        "POSTROOM_LOG_INTERVAL": "0.5",
    }
    postroom = venv / "bin" / "postroom"

    # 4. migrate, then `postroom dev`, then publish one event as the guide shows.
    migrated = await asyncio.to_thread(sh, postroom, "migrate", cwd=project, env=env)
    assert "created schema 'postroom'" in migrated and "applied 0001" in migrated, migrated
    log = tmp_path / "dev.log"
    dev = start_dev(venv, project, env, log)
    try:
        await eventually(lambda: "worker.consuming" in log.read_text(), timeout=60)
        await asyncio.to_thread(sh, python, "try_it.py", cwd=project, env=env)

        def handled() -> int:
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
            return sum(
                e["counts"][CONSUMER]["handled"] for e in lines if e["event"] == "postroom.summary"
            )

        assert await eventually(handled, timeout=60) == 1
        dev.terminate()
        assert await wait_exit(dev, timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if dev.poll() is None:
            dev.kill()
        channel = await amqp.channel()
        for queue in (CONSUMER, f"{CONSUMER}.dead"):
            await channel.queue_delete(queue)
        await channel.close()
    text = log.read_text()
    assert "Traceback" not in text
    # PointsAwarded has no consumer: one quiet warning, the event kept in the outbox.
    assert '"relay.unroutable"' in text
    db = await asyncpg.connect(guide_database.replace("+asyncpg", ""))
    try:
        assert await db.fetchval(
            "SELECT points FROM loyalty_accounts WHERE customer_email = 'ada@example.com'"
        ) == 42
        assert await db.fetchval(
            "SELECT count(*) FROM postroom.outbox WHERE topic = 'loyalty.points-awarded'"
        ) == 1
        await db.execute("DROP TABLE loyalty_accounts")  # the guide's tests create their own
    finally:
        await db.close()

    # 5. The guide's tests, with the settings it gives: pass, and without a warning.
    tests = await asyncio.to_thread(
        sh, python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
        cwd=project, env={**base_env, "TEST_DATABASE_URL": guide_database},
    )
    assert "2 passed" in tests and "warning" not in tests.lower(), tests
