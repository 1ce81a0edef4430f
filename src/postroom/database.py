"""One description of the database connection, parsed once from ``POSTROOM_DATABASE_URL``.

Every connection postroom opens comes from :class:`Database`: SQLAlchemy engines through
:meth:`Database.engine` (worker, ops commands, migrations) and raw asyncpg connections
through :meth:`Database.connect` (relay, backlog gauges, ``check``, LISTEN). Neither
SQLAlchemy nor asyncpg ever parses the URL, so the libpq parameters that providers print
(``sslmode`` from ``disable`` to ``verify-full``, ``sslrootcert``, ``sslcert``, ``sslkey``,
``sslpassword``, ``host=`` for a Unix socket, ``password=``) and SQLAlchemy's ``ssl=`` form
mean the same thing for every command. An unknown key or an impossible combination is a
:class:`ConfigError` when the settings are built.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg

from postroom.errors import ConfigError
from postroom.redaction import redact_url, url_secrets
from postroom.tls import SYSTEM, ClientTLS, Verify, client_tls

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

SETTING = "POSTROOM_DATABASE_URL"
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
QUERY_KEYS = frozenset(
    {"host", "port", "user", "password", "dbname", "connect_timeout"}
    | {"sslmode", "ssl", "sslrootcert", "sslcert", "sslkey", "sslpassword"}
)
_SA_SSL = {"true": "verify-full", "1": "verify-full", "false": "disable", "0": "disable"}
DEFAULT_PORT = 5432


@dataclass(frozen=True, slots=True)
class Database:
    """Where the database is, who logs in and how the connection is protected."""

    hosts: tuple[str, ...]
    """Host names, addresses or Unix socket directories (starting with ``/``)."""
    port: int
    user: str | None
    database: str | None
    sslmode: str
    tls: ClientTLS | None
    """None when no TLS is attempted (``disable``, or a Unix socket)."""
    url: str = field(repr=False)
    password: str | None = field(default=None, repr=False)
    connect_timeout: float = 10.0
    client_certificate: bool = False

    @classmethod
    def parse(cls, url: str) -> Database:
        """Parse a ``postgresql://`` URL; raise :class:`ConfigError` saying what is wrong."""
        try:
            parts = urlsplit(url)
            netloc_port = parts.port
        except ValueError:  # its text may quote part of a password: not shown
            raise ConfigError(
                f"{SETTING}: not a valid URL (percent-encode '/', '@', ':' and '#' in the "
                "user name and password)"
            ) from None
        if parts.scheme not in SCHEMES:
            raise ConfigError(
                f"{SETTING}: must start with postgresql:// or postgresql+asyncpg:// "
                f"(got scheme {parts.scheme or 'none'!r})"
            )
        query: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key not in QUERY_KEYS:
                raise ConfigError(
                    f"{SETTING}: unknown parameter {key!r}; known: {', '.join(sorted(QUERY_KEYS))}"
                )
            query[key] = value
        hosts = tuple(h for h in query.get("host", parts.hostname or "").split(",") if h)
        if not hosts:
            raise ConfigError(f"{SETTING}: has no host (give one, or host=/socket/dir)")
        try:
            port = int(query.get("port") or netloc_port or DEFAULT_PORT)
            timeout = float(query.get("connect_timeout") or 10.0)
        except ValueError:
            raise ConfigError(f"{SETTING}: port and connect_timeout must be numbers") from None
        sslmode = _sslmode(query)
        sockets = [h.startswith("/") for h in hosts]
        tls: ClientTLS | None = None
        if all(sockets):
            if sslmode in ("require", "verify-ca", "verify-full"):
                raise ConfigError(
                    f"{SETTING}: sslmode={sslmode} cannot apply to a Unix socket "
                    f"(host={hosts[0]}); use a TCP host or sslmode=disable"
                )
        elif any(sockets):
            raise ConfigError(f"{SETTING}: mixes Unix sockets and TCP hosts; give one kind")
        elif sslmode != "disable":
            tls = _tls(sslmode, query)
        user = query.get("user") or (unquote(parts.username) if parts.username else None)
        password = query.get("password")
        if password is None and parts.password is not None:
            password = unquote(parts.password)
        name = query.get("dbname") or unquote(parts.path.lstrip("/")) or None
        return cls(
            hosts=hosts,
            port=port,
            user=user,
            database=name,
            sslmode=sslmode,
            tls=tls,
            url=url,
            password=password,
            connect_timeout=timeout,
            client_certificate="sslcert" in query,
        )

    @property
    def redacted(self) -> str:
        """The URL in libpq's form, passwords hidden: for logs, errors and ``postroom check``."""
        scheme, sep, rest = self.url.partition("://")
        return redact_url(f"postgresql{sep}{rest}" if scheme in SCHEMES else self.url)

    @property
    def secrets(self) -> set[str]:
        """Secret values in the URL, for masking free text that might echo them."""
        return url_secrets(self.url)

    @property
    def loopback(self) -> bool:
        """True if every host is a Unix socket or a loopback address or name."""
        return all(_is_loopback(host) for host in self.hosts)

    async def connect(
        self,
        *,
        application_name: str | None = None,
        timeout: float | None = None,
        server_settings: Mapping[str, str] | None = None,
    ) -> asyncpg.Connection[Any]:
        """Open one raw asyncpg connection as described, with libpq's fallbacks.

        ``prefer`` tries TLS and falls back to a plain connection when the server does not
        offer TLS; ``allow`` tries plain first and TLS when the server refuses it (a
        ``hostssl``-only server). Connection errors propagate unchanged.
        """
        settings = dict(server_settings or {})
        if application_name is not None:
            settings["application_name"] = application_name
        tls = self.tls.context if self.tls is not None else False
        if self.sslmode == "allow" and tls is not False:
            try:
                return await self._connect(False, timeout, settings)
            except asyncpg.InvalidAuthorizationSpecificationError:
                return await self._connect(tls, timeout, settings)
        if self.sslmode == "prefer" and tls is not False:
            if not self.client_certificate:
                # asyncpg's own "prefer" (no verification, like ours) falls back to plain
                # text on the same socket when the server declines TLS: no second connect.
                return await self._connect("prefer", timeout, settings)
            try:
                return await self._connect(tls, timeout, settings)
            except ConnectionError as exc:
                if "rejected SSL upgrade" not in str(exc):
                    raise
                return await self._connect(False, timeout, settings)
        return await self._connect(tls, timeout, settings)

    async def _connect(
        self, tls: Any, timeout: float | None, server_settings: dict[str, str]
    ) -> asyncpg.Connection[Any]:
        return await asyncpg.connect(
            host=list(self.hosts) if len(self.hosts) > 1 else self.hosts[0],
            port=self.port,
            user=self.user,
            password=self.password,
            database=self.database,
            ssl=tls,
            timeout=self.connect_timeout if timeout is None else timeout,
            server_settings=server_settings or None,
        )

    def engine(self, *, application_name: str | None = None, **options: Any) -> AsyncEngine:
        """Return a SQLAlchemy engine whose every connection comes from :meth:`connect`.

        *options* go to ``create_async_engine`` (pool size and the like); the URL itself
        is never handed to SQLAlchemy, so it cannot misread a libpq parameter.
        """
        from sqlalchemy.ext.asyncio import create_async_engine

        async def creator() -> asyncpg.Connection[Any]:
            return await self.connect(application_name=application_name)

        return create_async_engine("postgresql+asyncpg://", async_creator=creator, **options)


def _sslmode(query: Mapping[str, str]) -> str:
    if "ssl" in query and "sslmode" in query:
        raise ConfigError(f"{SETTING}: both ssl= and sslmode= are given; keep sslmode")
    raw = query.get("sslmode")
    if raw is None and "ssl" in query:
        raw = _SA_SSL.get(query["ssl"].lower(), query["ssl"])
    mode = (raw or "prefer").lower()
    if mode not in SSL_MODES:
        raise ConfigError(f"{SETTING}: unknown sslmode {raw!r}; use one of {', '.join(SSL_MODES)}")
    return mode


def _tls(sslmode: str, query: Mapping[str, str]) -> ClientTLS:
    ca = query.get("sslrootcert")
    if sslmode in ("disable", "allow", "prefer"):
        verify = Verify.NONE
    elif sslmode == "require":
        # libpq: with a root certificate, "require" checks the chain like verify-ca.
        verify = Verify.CA if ca and ca != SYSTEM else Verify.NONE
    elif sslmode == "verify-ca":
        if not ca or ca == SYSTEM:
            raise ConfigError(
                f"{SETTING}: sslmode=verify-ca needs sslrootcert=<file of the CA that signed "
                "the server's certificate> (the system store applies to verify-full only)"
            )
        verify = Verify.CA
    else:
        verify = Verify.FULL
    try:
        return client_tls(
            verify=verify,
            ca=ca if verify is not Verify.NONE else None,
            cert=query.get("sslcert"),
            key=query.get("sslkey"),
            key_password=query.get("sslpassword"),
            names=("sslrootcert", "sslcert", "sslkey", "sslpassword"),
        )
    except ConfigError as exc:
        raise ConfigError(f"{SETTING}: {exc}") from None


def _is_loopback(host: str) -> bool:
    if host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
