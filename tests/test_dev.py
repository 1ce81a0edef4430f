"""`postroom dev`: a relay and a worker in one process, with a summary line per interval."""

from __future__ import annotations

import asyncio
import json
import subprocess

from sqlalchemy import text

from postroom import Outbox
from tests.apps.devapp import Hello, router
from tests.conftest import ROOT, postroom_cmd, settings_env
from tests.helpers import eventually, wait_exit


def summaries(log: str) -> list[dict[str, int]]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [e["counts"]["devapp.greet"] for e in lines if e["event"] == "postroom.summary"]


def start(env: dict[str, str], *, cwd, log_path) -> subprocess.Popen[bytes]:
    """`postroom dev` from *cwd*, which is not the project: --app-dir finds the module."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            postroom_cmd("dev", "tests.apps.devapp:router", "--app-dir", str(ROOT)),
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


async def test_dev_runs_relay_and_worker_and_summarises_outcomes(
    settings, sessions, engine, amqp, tmp_path
):
    log_path = tmp_path / "dev.log"
    env = settings_env(
        settings, POSTROOM_LOG_INTERVAL="0.5", POSTROOM_LOG_FORMAT="json", POSTROOM_HEALTH_PORT="0"
    )
    process = start(env, cwd=tmp_path, log_path=log_path)
    try:
        await eventually(lambda: "worker.consuming" in log_path.read_text(), timeout=30)
        box = Outbox.from_settings(settings)
        async with sessions() as session, session.begin():
            await box.publish(session, Hello(name="ada"))
            await box.publish(session, Hello(name="bob", fail_first=True))

        def totals() -> dict[str, int] | None:
            counts = summaries(log_path.read_text())
            total = {k: sum(c[k] for c in counts) for k in ("handled", "retries", "dead")}
            return total if total["handled"] == 2 else None

        total = await eventually(totals, timeout=30)
        assert total == {"handled": 2, "retries": 1, "dead": 0}
        process.terminate()
        assert await wait_exit(process, timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        channel = await amqp.channel()
        for consumer in router:
            for name in (consumer.name, f"{consumer.name}.dead"):
                await channel.queue_delete(name)
        await channel.close()

    events = [json.loads(line) for line in log_path.read_text().splitlines()]
    first = events[0]
    assert first["event"] == "dev.starting" and "settings" not in first
    assert first["consumers"] == ["devapp.greet"] and first["schema"] == settings.schema_name
    summary = next(e for e in events if e["event"] == "postroom.summary" and e["counts"]["relay"]["relayed"])
    assert summary["level"] == "info" and "devapp.greet:" in summary["summary"]
    async with engine.connect() as conn:
        handled = await conn.scalar(
            text(f'SELECT count(*) FROM "{settings.schema_name}".inbox WHERE consumer = :c'),
            {"c": "devapp.greet"},
        )
    assert handled == 2


async def test_a_router_outside_the_current_folder_needs_app_dir(settings, tmp_path):
    done = await asyncio.to_thread(
        subprocess.run,
        postroom_cmd("worker", "tests.apps.devapp:router"),
        cwd=tmp_path,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "cannot import 'tests.apps.devapp'" in done.stderr and "--app-dir" in done.stderr
    assert "Traceback" not in done.stderr


async def test_reload_restarts_dev_when_a_python_file_changes(settings, amqp, tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    source = (ROOT / "tests" / "apps" / "devapp.py").read_text()
    (app / "reloadapp.py").write_text(source)
    log_path = tmp_path / "dev.log"
    env = settings_env(settings, POSTROOM_LOG_FORMAT="json", POSTROOM_HEALTH_PORT="0")
    process = start_reload(env, app=app, log_path=log_path)
    try:

        def starts() -> int:
            return log_path.read_text().count('"event": "dev.starting"')

        await eventually(lambda: "worker.consuming" in log_path.read_text(), timeout=30)
        assert starts() == 1
        (app / "reloadapp.py").write_text(source + "\n# changed\n")
        await eventually(lambda: starts() == 2, timeout=30)
        await eventually(lambda: log_path.read_text().count("worker.consuming") == 2, timeout=30)
        assert '"event": "dev.stopped"' in log_path.read_text()  # drained, not killed
    finally:
        process.terminate()
        await wait_exit(process, timeout=30)
        channel = await amqp.channel()
        for name in ("devapp.greet", "devapp.greet.dead"):
            await channel.queue_delete(name)
        await channel.close()


def start_reload(env: dict[str, str], *, app, log_path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            postroom_cmd("dev", "reloadapp:router", "--app-dir", str(app), "--reload"),
            cwd=app,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_a_worker_logs_the_same_summary_line(settings, sessions, amqp):
    from structlog.testing import capture_logs

    from postroom.service import run_worker
    from tests.helpers import running_relay

    quick = settings.model_copy(update={"log_interval": 0.3})
    stop = asyncio.Event()
    with capture_logs() as logs:
        worker = asyncio.create_task(run_worker(quick, router, stop))
        try:
            await eventually(lambda: any(e["event"] == "worker.consuming" for e in logs))
            async with running_relay(settings):
                async with sessions() as session, session.begin():
                    await Outbox.from_settings(settings).publish(session, Hello(name="cy"))

                def handled() -> int:
                    return sum(
                        e["counts"]["devapp.greet"]["handled"]
                        for e in logs
                        if e["event"] == "postroom.summary"
                    )

                assert await eventually(handled, timeout=30) == 1
        finally:
            stop.set()
            await asyncio.wait_for(worker, timeout=30)
            channel = await amqp.channel()
            for name in ("devapp.greet", "devapp.greet.dead"):
                await channel.queue_delete(name)
            await channel.close()
    summary = next(e for e in logs if e["event"] == "postroom.summary" and "devapp.greet" in e["counts"])
    assert summary["log_level"] == "info" and "relay" not in summary["counts"]
    assert summary["summary"].startswith("devapp.greet: ")
