"""Who is asking, and may they change things: tokens, a trusted proxy header, CSRF.

Three ways in, checked in this order:

- **Trusted header** (``POSTROOM_CONSOLE_TRUSTED_HEADER``): an authenticating proxy in front
  of the console sets the user's name in that header; the console takes it as the actor.
  Users listed in ``POSTROOM_CONSOLE_OPERATORS`` (or all, with ``*``) may change things, the
  others read only. Only safe when nothing but the proxy can reach the console.
- **Bearer token**: ``Authorization: Bearer <token>`` for scripts; the actor is ``token``.
- **Login**: a person gives their name (the actor in the audit) and a token at ``/login``;
  ``POSTROOM_CONSOLE_TOKEN`` makes an operator, ``POSTROOM_CONSOLE_READ_TOKEN`` a reader.

A browser session is an HMAC-signed cookie (HttpOnly, SameSite=Strict) holding the actor,
the role, an expiry and a random CSRF token. Every change is a POST that must carry that
token in its form (:func:`Gate.check_change`); a bearer request needs none, since a browser
never adds that header by itself. The signing key is random per process: restarting the
console ends every session, and it runs as one replica.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from postroom.errors import ConfigError
from postroom.settings import Settings

COOKIE = "postroom_console"
SESSION_SECONDS = 12 * 3600
MAX_ACTOR_CHARS = 100


class Role(enum.StrEnum):
    """What a user may do in the console."""

    OPERATOR = "operator"
    """Sees everything; may replay, purge, pause and resume."""
    READER = "reader"
    """Sees everything; changes nothing."""


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated user: the actor recorded in the audit, the role, the CSRF token."""

    actor: str
    role: Role
    csrf: str
    bearer: bool = False

    @property
    def may_change(self) -> bool:
        return self.role is Role.OPERATOR


class Refused(Exception):
    """The request may not go on: *status* 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class Gate:
    """Authenticate requests and guard changes, from the console settings."""

    def __init__(self, settings: Settings, *, key: bytes | None = None) -> None:
        self._tokens: dict[Role, bytes] = {}
        if settings.console_token is not None:
            self._tokens[Role.OPERATOR] = settings.console_token.get_secret_value().encode()
        if settings.console_read_token is not None:
            self._tokens[Role.READER] = settings.console_read_token.get_secret_value().encode()
        for role, token in self._tokens.items():
            if len(token) < 16:
                raise ConfigError(
                    f"the console's {role.value} token is shorter than 16 characters; "
                    "generate one, e.g. `openssl rand -hex 32`"
                )
        self._header = (settings.console_trusted_header or "").strip().lower() or None
        names = {name.strip() for name in settings.console_operators.split(",")}
        self._operators = names - {""}
        if not self._tokens and self._header is None:
            raise ConfigError(
                "the console needs a way to authenticate: set POSTROOM_CONSOLE_TOKEN_FILE "
                "(and POSTROOM_CONSOLE_READ_TOKEN_FILE for read-only users), or "
                "POSTROOM_CONSOLE_TRUSTED_HEADER when an authenticating proxy is in front"
            )
        self._key = key or secrets.token_bytes(32)

    @property
    def login_enabled(self) -> bool:
        return bool(self._tokens)

    def identify(self, request: Request) -> tuple[Identity, str | None]:
        """Return who sent *request*, and a session cookie to set (or None); raise Refused.

        The cookie is (re)issued when the request carries no valid session of this user,
        so that the page it gets back holds a CSRF token for its forms.
        """
        session = self._read(request.cookies.get(COOKIE, ""))
        if self._header is not None and self._header in request.headers:
            user = request.headers[self._header].strip()[:MAX_ACTOR_CHARS]
            if not user:
                raise Refused(401, f"the proxy sent an empty {self._header} header")
            role = (
                Role.OPERATOR
                if "*" in self._operators or user in self._operators
                else (Role.READER)
            )
            if session and session.actor == user and session.role is role:
                return session, None
            fresh = Identity(user, role, secrets.token_urlsafe(24))
            return fresh, self._write(fresh)
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            granted = self.role_of(authorization[7:].strip())
            if granted is None:
                raise Refused(401, "the bearer token is not a console token")
            return Identity("token", granted, "", bearer=True), None
        if session is not None:
            return session, None
        raise Refused(401, "log in first")

    def role_of(self, token: str) -> Role | None:
        """Return the role *token* grants, or None; compares in constant time."""
        given = token.encode()
        found = None
        for role, expected in self._tokens.items():
            if hmac.compare_digest(given, expected):
                found = role
        return found

    def login(self, actor: str, token: str) -> str:
        """Return a session cookie for *actor* if *token* is a console token; raise Refused."""
        actor = actor.strip()[:MAX_ACTOR_CHARS]
        role = self.role_of(token)
        if role is None:
            raise Refused(401, "that token is not a console token")
        if not actor:
            raise Refused(401, "give your name: it is recorded as the actor of your changes")
        return self._write(Identity(actor, role, secrets.token_urlsafe(24)))

    def check_change(self, identity: Identity, csrf: str | None) -> None:
        """Raise Refused unless *identity* may change things and *csrf* is its session's."""
        if not identity.may_change:
            raise Refused(403, f"{identity.actor} may read but not change (a reader)")
        self.check_csrf(identity, csrf)

    def check_csrf(self, identity: Identity, csrf: str | None) -> None:
        """Raise Refused unless *csrf* is the token of *identity*'s session (bearer: none)."""
        if identity.bearer:
            return
        if not csrf or not hmac.compare_digest(csrf.encode(), identity.csrf.encode()):
            raise Refused(403, "missing or stale form token (CSRF); reload the page and retry")

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def _write(self, identity: Identity) -> str:
        payload = json.dumps(
            {
                "a": identity.actor,
                "r": identity.role.value,
                "c": identity.csrf,
                "e": int(time.time()) + SESSION_SECONDS,
            }
        ).encode()
        return base64.urlsafe_b64encode(payload).decode() + "." + self._sign(payload)

    def _read(self, cookie: str) -> Identity | None:
        encoded, _, signature = cookie.partition(".")
        try:
            payload = base64.urlsafe_b64decode(encoded.encode())
        except ValueError:
            return None
        if not signature or not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(payload)
            if int(data["e"]) < time.time():
                return None
            return Identity(str(data["a"]), Role(data["r"]), str(data["c"]))
        except (ValueError, KeyError, TypeError):
            return None


def set_session(request: Request, response: Response, cookie: str) -> None:
    """Set the session *cookie* on *response*: HttpOnly, SameSite=Strict, Secure over TLS."""
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
