"""The console's shared state, one per application, and how a view renders a page."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jinja2 import Environment
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import HTMLResponse

from postroom.console.auth import Gate, Identity
from postroom.router import Router
from postroom.settings import Settings


@dataclass
class Console:
    """What every view needs: settings, the database, the gate and the templates."""

    settings: Settings
    gate: Gate
    templates: Environment
    router: Router | None = None
    """The router given to ``postroom console --router``: its consumers' names and redaction."""
    engine: AsyncEngine | None = field(default=None)

    @property
    def consumers(self) -> frozenset[str]:
        """The names the router declares (none without a router)."""
        return frozenset(consumer.name for consumer in self.router or ())

    @property
    def schema(self) -> str:
        return self.settings.schema_name

    @property
    def db(self) -> AsyncEngine:
        assert self.engine is not None, "the console's engine opens with the application"
        return self.engine

    def render(
        self, request: Request, template: str, *, status: int = 200, **context: Any
    ) -> HTMLResponse:
        """Render *template* with the user's identity and the current path."""
        identity: Identity | None = getattr(request.state, "identity", None)
        page = self.templates.get_template(template).render(
            request=request, identity=identity, path=request.url.path, **context
        )
        return HTMLResponse(page, status_code=status)


def console_of(request: Request) -> Console:
    """Return the application's :class:`Console`."""
    console: Console = request.app.state.console
    return console


def identity_of(request: Request) -> Identity:
    """Return the authenticated user of *request* (set by the gate before any view runs)."""
    identity: Identity = request.state.identity
    return identity
