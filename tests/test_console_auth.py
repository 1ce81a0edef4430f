"""The console's gate, against a real `postroom console` process: tokens, roles, CSRF, proxy."""

from __future__ import annotations

import json
import subprocess
import sys

from pydantic import SecretStr
from sqlalchemy import text

from postroom.console.app import build
from postroom.settings import Settings
from tests.conftest import postroom_cmd, settings_env
from tests.consoles import OPERATOR_TOKEN, READER_TOKEN, http, log_in, served_console
from tests.test_ops import APPLY, seed


def test_importing_postroom_and_its_cli_loads_no_web_stack() -> None:
    code = (
        "import sys, postroom, postroom.cli, postroom.worker, postroom.pauses; "
        "print([m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'jinja2', 'uvicorn', 'multipart')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_console_refuses_to_start_without_a_way_to_authenticate(settings: Settings) -> None:
    done = subprocess.run(
        postroom_cmd("console", "--port", "1"),
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "the console needs a way to authenticate: set POSTROOM_CONSOLE_TOKEN_FILE" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr


def _changes(settings: Settings) -> list[str]:
    """Every POST route of the console but the login form, with its actions spelled out."""
    app = build(settings.model_copy(update={"console_token": SecretStr(OPERATOR_TOKEN)}))
    paths = []
    for route in app.routes:
        methods = getattr(route, "methods", None) or set()
        path = getattr(route, "path", "")
        if "POST" in methods and path != "/login":
            if "{action:str}" in path:
                paths += [path.replace("{action:str}", a) for a in ("replay", "purge", "unpurge")]
            else:
                paths.append(path)
    return paths


async def _state(sessions, schema: str) -> tuple[int, int, str]:
    async with sessions() as session:
        audit = (await session.execute(text(f'SELECT count(*) FROM "{schema}".audit'))).scalar()
        paused = (await session.execute(text(f'SELECT count(*) FROM "{schema}".pauses'))).scalar()
        status = (
            await session.execute(
                text(f"SELECT string_agg(status, ',') FROM \"{schema}\".dead_letters")
            )
        ).scalar()
    return int(audit or 0), int(paused or 0), str(status)


async def test_tokens_roles_and_csrf_guard_every_change(settings: Settings, sessions) -> None:
    schema = settings.schema_name
    letter = await seed(sessions, schema)
    changes = _changes(settings)
    assert {"/logout", "/replay/confirm", "/purge/confirm", "/unpurge/confirm"} <= set(changes)
    async with served_console(settings) as base:
        # No token: the pages send people to the login form, scripts get 401.
        anonymous = await http(base + "/")
        assert anonymous.status == 303 and anonymous.headers["location"] == "/login"
        bad_bearer = await http(base + "/", headers={"Authorization": "Bearer not-the-token"})
        assert bad_bearer.status == 401
        wrong = await http(base + "/login", method="POST", form={"name": "x", "token": "nope"})
        assert wrong.status == 401 and "not a console token" in wrong.body
        forged = await http(base + "/", headers={"Cookie": "postroom_console=eyJhIjoiZXZlIn0.00"})
        assert forged.status == 303
        for path in changes:
            refused = await http(
                base + path, method="POST", form={"consumer": APPLY, "ids": str(letter)}
            )
            assert refused.status in (303, 401), (path, refused.status)

        cookie = await log_in(base)
        page = await http(base + "/", headers={"Cookie": cookie})
        assert page.status == 200 and APPLY in page.body
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        csrf = page.csrf()
        before = await _state(sessions, schema)
        for path in changes:
            form = {"consumer": APPLY, "ids": str(letter), "reason": "x"}
            missing = await http(base + path, method="POST", form=form, headers={"Cookie": cookie})
            assert missing.status == 403 and "CSRF" in missing.body, (path, missing.status)
            bad = await http(
                base + path,
                method="POST",
                form={**form, "csrf": csrf[:-2] + "xx"},
                headers={"Cookie": cookie},
            )
            assert bad.status == 403, (path, bad.status)
        assert await _state(sessions, schema) == before, "a refused request changed something"

        paused = await http(
            base + "/consumers/pause",
            method="POST",
            form={"consumer": APPLY, "reason": "drill", "csrf": csrf},
            headers={"Cookie": cookie},
        )
        assert paused.status == 303
        async with sessions() as session:
            row = (
                await session.execute(text(f'SELECT actor, reason FROM "{schema}".pauses'))
            ).one()
            audit = (
                await session.execute(text(f'SELECT actor, action FROM "{schema}".audit'))
            ).one()
        assert tuple(row) == ("ana", "drill") and tuple(audit) == ("ana", "consumers.pause")

        # A reader sees everything and changes nothing, CSRF token or not.
        reader = await log_in(base, READER_TOKEN, "rita")
        seen = await http(base + "/consumers", headers={"Cookie": reader})
        assert seen.status == 200 and "paused" in seen.body and "Resume" not in seen.body
        refused = await http(
            base + "/consumers/resume",
            method="POST",
            form={"consumer": APPLY, "csrf": seen.csrf()},
            headers={"Cookie": reader},
        )
        assert refused.status == 403 and "may read but not change" in refused.body
        # Scripts: a bearer token, no cookie, hence no CSRF token needed; actor "token".
        resumed = await http(
            base + "/consumers/resume",
            method="POST",
            form={"consumer": APPLY},
            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        )
        assert resumed.status == 303
        assert (await _state(sessions, schema))[1] == 0


async def test_trusted_header_mode_records_the_proxy_user(settings: Settings, sessions) -> None:
    schema = settings.schema_name
    await seed(sessions, schema)
    env = {
        "POSTROOM_CONSOLE_TRUSTED_HEADER": "X-Forwarded-User",
        "POSTROOM_CONSOLE_OPERATORS": "ana@example.com",
    }
    async with served_console(settings, tokens=False, **env) as base:
        assert (await http(base + "/")).status == 401  # no header, no login form either
        ana = {"X-Forwarded-User": "ana@example.com"}
        page = await http(base + "/consumers", headers=ana)
        assert page.status == 200
        cookie = page.headers["set-cookie"].split(";")[0]
        done = await http(
            base + "/consumers/pause",
            method="POST",
            form={"consumer": APPLY, "csrf": page.csrf()},
            headers={**ana, "Cookie": cookie},
        )
        assert done.status == 303
        # Another user behind the proxy reuses ana's cookie: a new session, and a reader.
        bo = {"X-Forwarded-User": "bo@example.com", "Cookie": cookie}
        refused = await http(
            base + "/consumers/resume",
            method="POST",
            form={"consumer": APPLY, "csrf": page.csrf()},
            headers=bo,
        )
        assert refused.status == 403
    async with sessions() as session:
        rows = (
            await session.execute(text(f'SELECT actor, action, details FROM "{schema}".audit'))
        ).all()
    assert [(r.actor, r.action) for r in rows] == [("ana@example.com", "consumers.pause")]
    assert json.loads(json.dumps(rows[0].details))["consumer"] == APPLY
