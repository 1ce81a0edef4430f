"""Turn what went wrong into one line a person can act on, and the exit code that goes with it.

Every ``postroom`` command ends a failure through :func:`explain`: the line names what is
wrong, where (the redacted URL) and the setting or command that fixes it, and the exit
code says what kind of failure it was: 2 for configuration, 3 for a dependency that
cannot be reached or refused the work, 1 for anything unexpected. :func:`database_error`
and :func:`broker_error` are the same mapping for code that wants an error object (the
relay's and worker's pre-flight). Secrets never reach the line: it is masked with the settings'.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

import asyncpg

from postroom.errors import ConfigError, PostroomError, UnreachableError
from postroom.settings import Settings

DATABASE_SETTING = "POSTROOM_DATABASE_URL"
BROKER_SETTING = "POSTROOM_AMQP_URL"
_LOGIN_REFUSED = frozenset({"ProbableAuthenticationError", "AuthenticationError"})
_BROKER_MODULES = ("aiormq", "aio_pika", "pamqp")


@dataclass(frozen=True, slots=True)
class Answer:
    """One line for stderr (without the ``postroom:`` prefix) and the exit code.

    ``unexpected`` marks a failure no mapping knows (a bug, most likely): its traceback is
    worth printing even without ``--debug``.
    """

    line: str
    code: int
    unexpected: bool = False


def explain(exc: BaseException, settings: Settings | None) -> Answer:
    """Return the one-line answer to *exc*, masked with *settings*' secrets.

    A :class:`PostroomError` speaks for itself (its text and ``exit_code``); a database or
    broker failure becomes :func:`database_error` / :func:`broker_error`; anything else is
    unexpected (exit 1), named with its type; the CLI prints its traceback above the line.
    """
    error: PostroomError
    if isinstance(exc, PostroomError):
        error = exc
    elif settings is not None and _from_broker(exc):
        error = broker_error(exc, settings)
    elif settings is not None and _from_database(exc):
        error = database_error(exc, settings)
    else:
        text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        return Answer(_clean(f"unexpected error: {text}", settings), 1, unexpected=True)
    return Answer(_clean(str(error), settings), error.exit_code)


def database_error(exc: BaseException, settings: Settings) -> PostroomError:
    """Return the error naming the database, what it said and how to fix it."""
    where = f"database {settings.database.redacted}"
    cause = _root(exc)
    state = getattr(cause, "sqlstate", None)
    text = _text(cause)
    if state == "3D000":
        return ConfigError(f"{where}: {text}; create it or fix {DATABASE_SETTING}")
    if state in ("28P01", "28000"):
        hint = ""
        if "no pg_hba.conf entry" in text and "no encryption" in text:
            hint = " (the server wants TLS: add sslmode=verify-full and sslrootcert)"
        return ConfigError(f"{where}: {text}; fix the user or password in {DATABASE_SETTING}{hint}")
    if state in ("42P01", "3F000", "42703"):  # no table, schema or column: behind head
        return ConfigError(
            f"{where}: {text}; run `postroom migrate` (schema {settings.schema_name!r})"
        )
    if isinstance(cause, ssl.SSLCertVerificationError):
        return ConfigError(
            f"{where}: the server's certificate was refused ({cause.verify_message}); fix "
            f"sslrootcert or the host name in {DATABASE_SETTING}"
        )
    if isinstance(cause, ssl.SSLError):
        return ConfigError(
            f"{where}: TLS failed ({text}); check the ssl settings in {DATABASE_SETTING}"
        )
    if "rejected SSL upgrade" in text:
        return ConfigError(
            f"{where}: the server does not offer TLS; lower sslmode or enable ssl on the "
            f"server ({DATABASE_SETTING})"
        )
    if isinstance(cause, socket.gaierror):
        hosts = ",".join(settings.database.hosts)
        return UnreachableError(f"{where}: cannot resolve host {hosts!r}; fix {DATABASE_SETTING}")
    if isinstance(cause, OSError | TimeoutError | asyncpg.CannotConnectNowError):
        return UnreachableError(
            f"{where}: {text or 'no answer'}; is it running? fix {DATABASE_SETTING} if it is "
            "elsewhere"
        )
    if isinstance(cause, asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
        return UnreachableError(f"{where}: {text}")
    return UnreachableError(f"{where}: {text}")


def broker_error(exc: BaseException, settings: Settings) -> PostroomError:
    """Return the error naming the broker, what it said and how to fix it."""
    broker = settings.broker
    where = f"broker {broker.redacted}"
    cause = _root(exc)
    names = {kind.__name__ for kind in type(cause).__mro__} | {
        kind.__name__ for kind in type(exc).__mro__
    }
    text = _text(cause)
    if names & _LOGIN_REFUSED:
        return ConfigError(
            f"{where}: login refused for user {broker.user!r}; fix the user or password in "
            f"{BROKER_SETTING}"
        )
    if isinstance(cause, ssl.SSLCertVerificationError):
        return ConfigError(
            f"{where}: the broker's certificate was refused ({cause.verify_message}); fix "
            f"POSTROOM_AMQP_TLS_CA or the host name in {BROKER_SETTING}"
        )
    if isinstance(cause, ssl.SSLError):
        return ConfigError(f"{where}: TLS failed ({text}); is this port TLS (amqps, 5671)?")
    if isinstance(cause, socket.gaierror):
        return UnreachableError(
            f"{where}: cannot resolve host {broker.host!r}; fix {BROKER_SETTING}"
        )
    if "Connection.Close" in text or "NOT_ALLOWED" in text or "ACCESS_REFUSED" in text:
        return ConfigError(
            f"{where}: the broker closed the handshake; does the vhost exist, and may user "
            f"{broker.user!r} use it? fix {BROKER_SETTING}"
        )
    if isinstance(cause, OSError | TimeoutError | ConnectionError) or names & {
        "AMQPConnectionError"
    }:
        return UnreachableError(
            f"{where}: {text or 'no answer'}; is it running? fix {BROKER_SETTING} if it is "
            "elsewhere"
        )
    return UnreachableError(f"{where}: {text}")


def _from_broker(exc: BaseException) -> bool:
    kinds = (*type(exc).__mro__, *type(_root(exc)).__mro__)
    return any(kind.__module__.split(".")[0] in _BROKER_MODULES for kind in kinds)


def _from_database(exc: BaseException) -> bool:
    cause = _root(exc)
    modules = {kind.__module__.split(".")[0] for kind in type(exc).__mro__} | {
        kind.__module__.split(".")[0] for kind in type(cause).__mro__
    }
    return bool(modules & {"asyncpg", "sqlalchemy"}) or isinstance(cause, OSError | TimeoutError)


def _root(exc: BaseException) -> BaseException:
    """The innermost cause: the driver's error inside SQLAlchemy's or aiormq's wrappers.

    The text of a wrapper adds nothing a person can act on; the socket or TLS error it
    wraps (``AMQPConnectionError`` from an ``ssl.SSLCertVerificationError``) does.
    """
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "orig", None)
        if not isinstance(inner, BaseException):
            inner = exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _text(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, socket.gaierror) and exc.strerror:
        return exc.strerror
    return text.splitlines()[0] if text else type(exc).__name__


def _clean(line: str, settings: Settings | None) -> str:
    line = " ".join(line.split())
    return settings.mask(line) if settings is not None else line
