"""Pre-flight checks for ``postroom check``: database, schema at head, broker.

Each check is bounded by a timeout, so an init container or an exec probe never hangs,
and reports a reason a person can act on. URLs are shown redacted and any secret that a
client library echoes in an error is masked before it is printed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from alembic.script import ScriptDirectory

from postroom import migrate, rabbit
from postroom.diagnosis import broker_error, database_error
from postroom.errors import ConfigError
from postroom.outbox import RELAY_PRESENCE, relay_presence_key
from postroom.settings import Settings
from postroom.tls import Verify

DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check: its name, whether it passed and why."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        """Return the one-line form ``postroom check`` prints."""
        return f"{'OK' if self.ok else 'FAIL':<4} {self.name:<11} {self.detail}"


def check_config(environ: Mapping[str, str] | None = None) -> tuple[Settings | None, CheckResult]:
    """Build settings from *environ* (default: the process environment) as the first check."""
    try:
        settings = Settings.from_env(environ)
    except ConfigError as exc:
        return None, CheckResult("config", False, str(exc))
    shown = settings.describe()
    return settings, CheckResult(
        "config", True, f"schema {shown['schema']!r}, exchange {shown['exchange']!r}"
    )


async def run_checks(settings: Settings, *, timeout: float = DEFAULT_TIMEOUT) -> list[CheckResult]:
    """Check the database, the schema's migration revision and the broker, in that order.

    Never raises for an unreachable or misconfigured dependency: each problem becomes a
    failed :class:`CheckResult`. The schema is only checked once the database answered.
    """
    db_url = settings.database.redacted
    amqp_url = settings.broker.redacted
    database = await _bounded("database", db_url, _database(settings), timeout, settings)
    if database.ok:
        schema = await _bounded("migrations", db_url, _migrations(settings), timeout, settings)
        relays = await _bounded("relays", db_url, _relays(settings), timeout, settings)
    else:
        schema = CheckResult("migrations", False, "not checked: the database is unreachable")
        relays = CheckResult("relays", False, "not checked: the database is unreachable")
    broker = await _bounded("broker", amqp_url, _broker(settings), timeout, settings)
    return [database, schema, relays, broker]


async def _bounded(
    name: str,
    target: str,
    check: Coroutine[Any, Any, tuple[bool, str]],
    timeout: float,
    settings: Settings,
) -> CheckResult:
    try:
        ok, detail = await asyncio.wait_for(check, timeout)
    except TimeoutError:
        return CheckResult(name, False, f"{target}: no answer within {timeout:g}s")
    except Exception as exc:  # every failure is the check's answer, reported with its reason
        explain = broker_error if name == "broker" else database_error
        reason = str(explain(exc, settings)).removeprefix("database ").removeprefix("broker ")
        return CheckResult(name, False, _mask(reason, settings))
    return CheckResult(name, ok, detail)


async def _database(settings: Settings) -> tuple[bool, str]:
    database = settings.database
    connection = await database.connect(application_name="postroom-check", timeout=DEFAULT_TIMEOUT)
    try:
        version = await connection.fetchval("SHOW server_version")
        autovacuum = await connection.fetchval("SHOW autovacuum")
        tls = await connection.fetchrow(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await connection.close(timeout=2)
    detail = f"{database.redacted} (PostgreSQL {version}); "
    encrypted = bool(tls and tls["ssl"])
    if encrypted:
        assert tls is not None and database.tls is not None  # encrypted means we offered TLS
        detail += f"TLS {tls['version']}, {database.tls.describe()}"
    else:
        detail += "not encrypted"
    if not database.loopback and not encrypted:
        detail += (
            "; warning: a remote database without TLS; add sslmode=verify-full and "
            "sslrootcert=<CA file> to POSTROOM_DATABASE_URL"
        )
    elif not database.loopback and database.tls is not None and database.tls.verify is Verify.NONE:
        detail += (
            "; warning: the server's certificate is not verified; use sslmode=verify-full "
            "with sslrootcert=<CA file> in POSTROOM_DATABASE_URL"
        )
    if autovacuum != "on":
        # Not a failure (the relay and workers run fine), but the outbox would bloat.
        detail += (
            "; warning: autovacuum is off, so the outbox's and inbox's dead rows pile up "
            "unless something vacuums them (schedule `postroom prune --vacuum`)"
        )
    return True, detail


async def _migrations(settings: Settings) -> tuple[bool, str]:
    head = migrate.head_revision()
    current = await migrate.current_revision(settings)
    schema = settings.schema_name
    if current == head:
        return True, f"schema {schema!r} is at head ({head})"
    if current is None:
        return (
            False,
            f"schema {schema!r} has no postroom tables (head is {head}); run `postroom migrate`",
        )
    known = {
        rev.revision for rev in ScriptDirectory(str(migrate.migrations_dir())).walk_revisions()
    }
    if current not in known:
        return False, (
            f"schema {schema!r} is at {current}, a revision this postroom does not know "
            f"(head is {head}); a newer version migrated it"
        )
    return False, f"schema {schema!r} is at {current}, behind head {head}; run `postroom migrate`"


STRANDED_AFTER = 60.0
"""Seconds an outbox row may be due, in a schema no relay serves, before check warns."""

_PRESENCE = (
    "SELECT objid::bigint AS key, count(*) AS relays FROM pg_locks "
    "WHERE locktype = 'advisory' AND classid::bigint = $1 AND objsubid = 2 GROUP BY objid"
)
_OUTBOXES = (
    "SELECT n.nspname, quote_ident(n.nspname) AS quoted "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relname = 'outbox' AND c.relkind IN ('r', 'p') AND EXISTS ("
    "SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'routing_key')"
)


async def _relays(settings: Settings) -> tuple[bool, str]:
    """Say which relays serve our schema, and warn of waiting rows in schemas none serves.

    Relays hold a shared advisory lock per schema (``outbox.relay_presence_key``). Rows
    due for over a minute in another schema's outbox that no relay serves are, most
    likely, a producer configured with another ``POSTROOM_SCHEMA``: never silent, but a
    warning, not a failure, since this relay's own work is unaffected.
    """
    connection = await settings.database.connect(
        application_name="postroom-check", timeout=DEFAULT_TIMEOUT
    )
    try:
        served = {r["key"]: r["relays"] for r in await connection.fetch(_PRESENCE, RELAY_PRESENCE)}
        stranded = []
        for schema, quoted in await connection.fetch(_OUTBOXES):
            if schema == settings.schema_name or relay_presence_key(schema) in served:
                continue
            waiting = await connection.fetchval(
                f"SELECT count(*) FROM {quoted}.outbox "  # noqa: S608 -- quote_ident
                "WHERE available_at <= now() - make_interval(secs => $1)",
                STRANDED_AFTER,
            )
            if waiting:
                stranded.append(f"{schema!r} ({waiting})")
    finally:
        await connection.close(timeout=2)
    count = served.get(relay_presence_key(settings.schema_name), 0)
    detail = f"{count} relay(s) serve schema {settings.schema_name!r}"
    if stranded:
        detail += (
            f"; warning: outbox rows due for over {STRANDED_AFTER:g}s in schema(s) no relay "
            f"serves: {', '.join(stranded)}. A producer configured with another "
            "POSTROOM_SCHEMA? Give producers, relays and workers the same one"
        )
    return True, detail


async def _broker(settings: Settings) -> tuple[bool, str]:
    broker = settings.broker
    connection = await rabbit.connect(broker, name="postroom-check", timeout=DEFAULT_TIMEOUT)
    await connection.close()
    detail = broker.redacted + "; "
    if broker.tls is not None:
        # aiormq refuses an amqps:// connection whose handshake failed, so this one is
        # encrypted, and checked as far as our context asks (always CA and host name).
        detail += f"TLS, {broker.tls.describe()}"
    else:
        detail += "not encrypted"
    if not broker.loopback and broker.tls is None:
        detail += "; warning: a remote broker without TLS; use amqps:// in POSTROOM_AMQP_URL"
    if not broker.loopback and broker.user == "guest":
        detail += (
            "; warning: the guest user on a remote broker; create a user of your own and "
            "put it in POSTROOM_AMQP_URL"
        )
    return True, detail


def _mask(text: str, settings: Settings) -> str:
    """Replace any secret of the settings that *text* might echo."""
    return settings.mask(text).replace("\n", " ")[:500]
