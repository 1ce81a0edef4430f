"""Build and serve the console: routes, the authentication gate, templates, static files.

:func:`build` returns the ASGI application (tests serve it on a free port); :func:`serve`
runs it with uvicorn, as ``postroom console`` does. One engine per process, opened and
disposed with the application.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from postroom.console import actions, views
from postroom.console.auth import Gate, Refused, set_session
from postroom.console.state import Console, console_of
from postroom.router import Router
from postroom.settings import Settings

OPEN_PATHS = ("/login", "/static/", "/livez")
"""Paths served without a session: the login form, its assets, the liveness probe."""

SECURITY_HEADERS = {
    # Everything the pages use ships in the package: no inline script, no other origin.
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def build(
    settings: Settings, *, router: Router | None = None, gate: Gate | None = None
) -> Starlette:
    """Return the console application; raise ConfigError when no authentication is set."""
    console = Console(
        settings=settings,
        gate=gate or Gate(settings),
        templates=Environment(
            loader=PackageLoader("postroom.console", "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        ),
        router=router,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        console.engine = create_async_engine(
            settings.database_url.get_secret_value(),
            pool_size=4,
            connect_args={"server_settings": {"application_name": "postroom-console"}},
        )
        try:
            yield
        finally:
            await console.engine.dispose()

    app = Starlette(
        routes=[
            Route("/livez", _alive),
            *views.ROUTES,
            *actions.ROUTES,
            Mount("/static", StaticFiles(packages=[("postroom.console", "static")])),
        ],
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=_authenticate)],
        exception_handlers={Refused: _refused},
        lifespan=lifespan,
    )
    app.state.console = console
    return app


async def _authenticate(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Let a request through only with an identity; set the session cookie it needs."""
    console = console_of(request)
    cookie = None
    if request.url.path.startswith(OPEN_PATHS):
        response = await call_next(request)
    else:
        try:
            identity, cookie = console.gate.identify(request)
        except Refused as refused:
            wants_page = request.method == "GET" and "authorization" not in request.headers
            if refused.status == 401 and wants_page and console.gate.login_enabled:
                response = RedirectResponse("/login", status_code=303)
            else:
                response = console.render(
                    request, "refused.html", status=refused.status, why=refused.why
                )
        else:
            request.state.identity = identity
            response = await call_next(request)
    if cookie is not None:
        set_session(request, response, cookie)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def _alive(_request: Request) -> Response:
    """Answer the liveness probe: the process serves requests (no database round trip)."""
    return PlainTextResponse("ok")


async def _refused(request: Request, exc: Exception) -> Response:
    """Show why a view refused (bad input, not allowed, stale CSRF token), with its status."""
    assert isinstance(exc, Refused)
    return console_of(request).render(request, "refused.html", status=exc.status, why=exc.why)


def serve(settings: Settings, *, router: Router | None = None) -> None:
    """Serve the console on ``console_host:console_port`` until interrupted."""
    import uvicorn

    app = build(settings, router=router)
    uvicorn.run(
        app,
        host=settings.console_host,
        port=settings.console_port,
        log_level="warning",
        access_log=False,
        server_header=False,
    )
