"""Test helpers for the web console: serve `postroom console` as a real process, speak HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from postroom.settings import Settings
from tests.helpers import free_port, logs_of, spawn, wait_exit

OPERATOR_TOKEN = "op-" + "7" * 29
READER_TOKEN = "rd-" + "5" * 29


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: str

    def csrf(self) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', self.body)
        assert found, f"no CSRF token on the page:\n{self.body[:2000]}"
        return found.group(1)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


async def http(
    url: str,
    *,
    method: str = "GET",
    form: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """One request, redirects not followed; runs in a thread so the test's loop keeps going."""

    def call() -> Answer:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        try:
            with _OPENER.open(request, timeout=30) as response:
                return Answer(response.status, dict(response.headers), response.read().decode())
        except urllib.error.HTTPError as error:
            return Answer(error.code, dict(error.headers), error.read().decode())

    return await asyncio.to_thread(call)


def session_cookie(answer: Answer) -> str:
    """The `name=value` of the session cookie an answer sets."""
    found = re.search(r"(postroom_console=[^;]+)", answer.headers.get("set-cookie", ""))
    assert found, f"no session cookie set: {answer.headers}"
    return found.group(1)


@contextlib.asynccontextmanager
async def served_console(
    settings: Settings, *args: str, tokens: bool = True, **env: str
) -> AsyncIterator[str]:
    """Run `postroom console` on a free loopback port; yield its base URL.

    *tokens*: log-in tokens for an operator and a reader are set (OPERATOR_TOKEN, ...).
    """
    port = free_port()
    if tokens:
        env = {
            "POSTROOM_CONSOLE_TOKEN": OPERATOR_TOKEN,
            "POSTROOM_CONSOLE_READ_TOKEN": READER_TOKEN,
            **env,
        }
    process = spawn(settings, "console", "--port", str(port), *args, **env)
    base = f"http://127.0.0.1:{port}"
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the console exited:\n{logs_of(process)}")
            with contextlib.suppress(OSError):
                if (await http(base + "/login")).status == 200:
                    break
            if loop.time() > deadline:
                raise AssertionError(f"the console never answered:\n{logs_of(process)}")
            await asyncio.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            await wait_exit(process, timeout=10)
        finally:
            if process.poll() is None:
                process.kill()


async def log_in(base: str, token: str = OPERATOR_TOKEN, name: str = "ana") -> str:
    """Log in through the form; return the session cookie."""
    answer = await http(base + "/login", method="POST", form={"name": name, "token": token})
    assert answer.status == 303, answer
    return session_cookie(answer)
