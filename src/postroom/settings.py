"""Settings from ``POSTROOM_*`` environment variables and ``*_FILE`` secret files.

This is the only module that reads the environment. Settings are built once at the
edge (the CLI) and passed in; an unknown ``POSTROOM_*`` variable is an error, because
a misspelt setting that is silently ignored is a production incident waiting to happen.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from postroom.broker import Broker
from postroom.database import Database
from postroom.errors import ConfigError
from postroom.redaction import mask
from postroom.redaction import redact_url as redact_url  # the relay and worker import it here

PREFIX = "POSTROOM_"
FILE_SUFFIX = "_FILE"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class _EnvWithFiles(PydanticBaseSettingsSource):
    """Read ``POSTROOM_X`` or the file named by ``POSTROOM_X_FILE`` from one mapping."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ below does the whole job at once

    def __call__(self) -> dict[str, Any]:
        fields = _env_names(self.settings_cls.model_fields)
        values: dict[str, Any] = {}
        for key, raw in self._environ.items():
            if not key.startswith(PREFIX) or is_service_link(key, raw):
                continue
            name = key[len(PREFIX) :].lower()
            from_file = False
            if name not in fields and name.endswith(FILE_SUFFIX.lower()):
                name = name[: -len(FILE_SUFFIX)]
                from_file = True
            if name not in fields:
                raise ConfigError(_unknown(key, fields))
            if from_file:
                if PREFIX + name.upper() in self._environ:
                    raise ConfigError(f"both {PREFIX}{name.upper()} and {key} are set; keep one")
                try:
                    raw = Path(raw).read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"{key}: cannot read {raw}: {exc.strerror}") from None
            values[name] = raw
        return values


_LINK_HOST = re.compile(r"^[0-9A-Fa-f.:]+$")
_LINK_PORT = re.compile(r"^[0-9]{1,5}$")
_LINK_URL = re.compile(r"^(tcp|udp|sctp)://(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f.:]+):[0-9]{1,5}$")
_LINK_PROTO = re.compile(r"^(tcp|udp|sctp)$")
_LINK_NAMES = (
    # (shape of the name after POSTROOM_, shape its value must have), after Kubernetes'
    # docker-links-compatible service environment variables.
    (re.compile(r"^(?:[A-Z0-9_]+_)?SERVICE_HOST$"), _LINK_HOST),
    (re.compile(r"^(?:[A-Z0-9_]+_)?SERVICE_PORT(?:_[A-Z0-9_]+)?$"), _LINK_PORT),
    (re.compile(r"^(?:[A-Z0-9_]+_)?PORT$"), _LINK_URL),
    (re.compile(r"^(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)$"), _LINK_URL),
    (re.compile(r"^(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_PROTO$"), _LINK_PROTO),
    (re.compile(r"^(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_PORT$"), _LINK_PORT),
    (re.compile(r"^(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_ADDR$"), _LINK_HOST),
)


def is_service_link(key: str, value: str) -> bool:
    """Return True if *key*=*value* is a variable Kubernetes injected for a Service.

    A Service named ``postroom`` or ``postroom-*`` in the namespace makes the kubelet set
    ``POSTROOM_*_SERVICE_HOST``, ``_SERVICE_PORT[_<name>]``, ``_PORT`` and
    ``_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]`` (unless ``enableServiceLinks: false``). Both
    the name and the value must have the injected shape (an IP, a port number, a
    ``tcp://ip:port`` URL), so a misspelt setting such as ``POSTROOM_HELTH_PORT=9000`` is
    still reported as unknown, and ``POSTROOM_HEALTH_PORT=9000`` is still the setting.
    """
    if not key.startswith(PREFIX):
        return False
    rest = key[len(PREFIX) :]
    return any(name.match(rest) and shape.match(value) for name, shape in _LINK_NAMES)


def _env_names(fields: Mapping[str, FieldInfo]) -> set[str]:
    """Names as they appear after the prefix: the alias where a field has one."""
    return {field.alias or name for name, field in fields.items()}


def _unknown(key: str, fields: set[str]) -> str:
    known = [PREFIX + name.upper() for name in sorted(fields)]
    close = difflib.get_close_matches(key.removesuffix(FILE_SUFFIX), known, n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown setting {key}{hint}; known: {', '.join(known)}"


class Settings(BaseSettings):
    """Everything a postroom process can be told, validated at start-up."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, validate_default=True)

    database_url: SecretStr = Field(
        description="PostgreSQL URL, e.g. postgresql+asyncpg://user:pw@host:5432/db."
    )
    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        description="RabbitMQ URL, amqp:// or amqps:// (TLS, certificate and host name "
        "verified); several (a cluster's nodes) comma-separated.",
    )
    amqp_tls_ca: str | None = Field(
        default=None,
        description="amqps: file of the CA that signed the broker's certificate; unset = "
        "the system trust store.",
    )
    amqp_tls_cert: str | None = Field(
        default=None, description="amqps: client certificate file (needs the key too)."
    )
    amqp_tls_key: str | None = Field(
        default=None, description="amqps: client private key file (needs the certificate too)."
    )
    amqp_tls_key_password: SecretStr | None = Field(
        default=None, description="amqps: password of an encrypted client key."
    )
    schema_name: str = Field(
        default="postroom", alias="schema", description="Postgres schema of postroom's tables."
    )
    exchange: str = Field(default="postroom.events", description="Topic exchange for events.")
    dead_letter_exchange: str = Field(
        default="postroom.dead",
        description="Exchange the broker dead-letters to when a delivery limit is reached.",
    )
    max_body_bytes: int = Field(
        default=1_048_576, gt=0, description="Largest encoded event body accepted, in bytes."
    )
    notify: bool = Field(
        default=True,
        description="Send one NOTIFY per publishing transaction so the relay wakes at once.",
    )
    poll_interval: float = Field(
        default=1.0, gt=0, description="Seconds between relay polls when no NOTIFY arrives."
    )
    relay_batch_size: int = Field(default=500, gt=0, le=10_000, description="Rows per claim.")
    relay_key_partitions: int = Field(
        default=64,
        gt=0,
        le=4096,
        description="Ordering-key partitions; every relay of one outbox must agree.",
    )
    worker_prefetch: int = Field(default=64, gt=0, description="Unacked messages per consumer.")
    worker_concurrency: int = Field(
        default=16, gt=0, description="Handlers running at once in one worker process."
    )
    worker_batch_size: int = Field(
        default=1,
        gt=0,
        le=1000,
        description=(
            "Messages handled in one transaction and acked after one commit (if a "
            "handler fails, the batch is rolled back and run a transaction per message); "
            "1 = a transaction per message. Ordered consumers use 1. "
            "A `batch=True` consumer's handler gets the batch in one call."
        ),
    )
    worker_batch_wait: float = Field(
        default=0.005,
        ge=0,
        le=10,
        description="Seconds a batch lingers for more messages before it takes a handler "
        "slot (fuller batches, more throughput); 0 = a batch is whatever arrived while "
        "the slots were busy (least latency).",
    )
    delivery_limit: int = Field(
        default=20,
        gt=0,
        description="Broker redeliveries before a message that crashes workers is dead-lettered.",
    )
    shutdown_timeout: float = Field(
        default=25.0,
        ge=0,
        description="Seconds a stopping process gets on SIGTERM to finish in-flight work "
        "(the relay's batch, the worker's handlers) before it gives up on it.",
    )
    health_host: str = Field(default="0.0.0.0", description="Address of the health server.")
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port for /livez, /readyz, /metrics; 0 = off; unset = 9000 for the "
        "relay and 9001 for the worker, so both run side by side on one host (if that "
        "default port is taken, a free one is used and logged as health.serving).",
    )
    metrics_interval: float = Field(
        default=10.0,
        gt=0,
        description="Seconds between the outbox queries (in relays and workers) for the "
        "backlog and lag gauges.",
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        default="auto",
        description="Event loop of the relay and worker processes: auto = uvloop where "
        "installed (a third less worker CPU per message, measured), else asyncio's own.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="Log renderer: console (readable, coloured) or json lines; auto = "
        "console when stderr is a terminal, json otherwise.",
    )
    log_interval: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between a worker's or relay's INFO summary line (outcomes per "
        "consumer, events relayed) and between warnings about one unroutable topic.",
    )
    unroutable_drop: str = Field(
        default="",
        description="Comma-separated topics (`*` matches any run of characters, e.g. "
        "`loyalty.*`) whose events the relay may drop when no queue is bound for them, "
        "counted in postroom_relay_dropped_total; other unroutable events wait in the "
        "outbox (docs/operations.md).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Minimum log level."
    )
    inbox_retention_days: float = Field(
        default=7.0, gt=0, description="Days an inbox row is kept for deduplication."
    )
    dead_letter_retention_days: float = Field(
        default=30.0, gt=0, description="Days replayed or purged dead letters are kept."
    )
    pause_poll_interval: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds between a worker's reads of the paused consumers "
        "(`postroom consumers pause`): how soon a pause or resume takes effect.",
    )
    console_host: str = Field(
        default="127.0.0.1",
        description="Address `postroom console` binds; loopback unless an ingress or proxy "
        "in front of it needs another.",
    )
    console_port: int = Field(default=8400, ge=1, le=65535, description="Port of the console.")
    console_token: SecretStr | None = Field(
        default=None,
        description="Token that logs in to the console as an operator (may change things); "
        "give it as a file (`_FILE`). Also accepted as `Authorization: Bearer`.",
    )
    console_read_token: SecretStr | None = Field(
        default=None,
        description="Token that logs in to the console read-only (sees everything, changes "
        "nothing); give it as a file (`_FILE`).",
    )
    console_trusted_header: str | None = Field(
        default=None,
        description="Header an authenticating proxy sets to the user's name (e.g. "
        "X-Forwarded-User); the console then trusts it. Only behind such a proxy.",
    )
    console_operators: str = Field(
        default="",
        description="With the trusted header: the users (comma-separated, `*` for all) "
        "who may change things; the others read only.",
    )
    crash_at: str | None = Field(
        default=None,
        description="Testing only: a fault point at which the process SIGKILLs itself.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only explicit keyword arguments: `from_env` feeds the environment in itself,
        # so tests can pass a mapping and nothing reads os.environ behind our back.
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from *environ* (default: the process environment).

        Raises :class:`ConfigError` naming the offending variable for unknown keys,
        unreadable secret files and invalid values; secrets never appear in the text.
        """
        environ = os.environ if environ is None else environ
        values = _EnvWithFiles(cls, environ)()
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme in ("postgresql", "postgres"):
            url = "postgresql+asyncpg" + url[len(scheme) :]
        try:
            Database.parse(url)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("POSTROOM_DATABASE_URL: ")) from None
        return SecretStr(url)

    @model_validator(mode="after")
    def _check_broker(self) -> Settings:
        _ = self.broker  # raises ConfigError for a bad URL or TLS file, at start
        return self

    @property
    def database(self) -> Database:
        """The database connection every component derives its connections from.

        Parsed once per URL (a copy of these settings with another URL gets its own).
        """
        return _parse_database(self.database_url.get_secret_value())

    @property
    def broker(self) -> Broker:
        """The broker connection (URL and TLS) every component connects with."""
        password = self.amqp_tls_key_password
        return _parse_broker(
            self.amqp_url.get_secret_value(),
            self.amqp_tls_ca,
            self.amqp_tls_cert,
            self.amqp_tls_key,
            password.get_secret_value() if password is not None else None,
        )

    def secrets(self) -> set[str]:
        """Every secret value these settings hold: masked in all that postroom prints."""
        found = self.database.secrets | self.broker.secrets
        urls = ("database_url", "amqp_url")  # their secrets are the passwords inside
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            secret = field.annotation in (SecretStr, SecretStr | None)
            if secret and value is not None and name not in urls:
                found.add(value.get_secret_value())
        return found

    def mask(self, text: str) -> str:
        """Return *text* with every secret of these settings replaced by ``***``."""
        return mask(text, self.secrets())

    @field_validator("schema_name")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("must be a lower-case SQL identifier ([a-z_][a-z0-9_]*)")
        return value

    @property
    def asyncpg_dsn(self) -> str:
        """The database URL in libpq's form, for tools such as psql and tests.

        postroom itself connects through :attr:`database`, never through this string.
        """
        return self.database_url.get_secret_value().replace(
            "postgresql+asyncpg://", "postgresql://", 1
        )

    def describe(self) -> dict[str, object]:
        """Return the settings with URLs redacted, for a start-up log line."""
        shown: dict[str, object] = self.model_dump(by_alias=True)
        shown["database_url"] = redact_url(self.database_url.get_secret_value())
        shown["amqp_url"] = redact_url(self.amqp_url.get_secret_value())
        if self.amqp_tls_key_password is not None:
            shown["amqp_tls_key_password"] = "***"
        return shown


@functools.lru_cache(maxsize=32)
def _parse_database(url: str) -> Database:
    return Database.parse(url)


@functools.lru_cache(maxsize=32)
def _parse_broker(
    url: str, ca: str | None, cert: str | None, key: str | None, key_password: str | None
) -> Broker:
    return Broker.parse(url, ca=ca, cert=cert, key=key, key_password=key_password)


_NO_DATABASE = "postgresql+asyncpg://unused.invalid/unused"


def publishing_values(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the settings the write path needs (schema, body limit, NOTIFY) from *environ*.

    For a web process that publishes but runs no relay or worker, so need not set
    ``POSTROOM_DATABASE_URL``. Validated exactly like :meth:`Settings.from_env` (unknown
    keys included); returns ``{"schema": ..., "max_body_bytes": ..., "notify": ...}``.
    """
    environ = os.environ if environ is None else environ
    values = _EnvWithFiles(Settings, environ)()
    values.setdefault("database_url", _NO_DATABASE)  # not used here; validated if given
    try:
        settings = Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    return {
        "schema": settings.schema_name,
        "max_body_bytes": settings.max_body_bytes,
        "notify": settings.notify,
    }


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = str(error["loc"][0]) if error["loc"] else "?"
        name = "schema" if field == "schema_name" else field
        problems.append(f"{PREFIX}{name.upper()}: {error['msg'].removeprefix('Value error, ')}")
    return "invalid settings: " + "; ".join(problems)


_REFERENCE_INTRO = """\
# Configuration reference

<!-- Generated from postroom.settings.Settings by `postroom config-reference`; do not edit.
     Regenerate: postroom config-reference > docs/configuration.md -->

A postroom process reads its settings once, at start-up, from `POSTROOM_*` environment
variables, and validates them before doing anything else. An unknown `POSTROOM_*` variable is
an error (exit code 2), so a misspelt name stops the process instead of being ignored.

Every variable can instead name a file that holds its value, with the suffix `_FILE`, e.g.
`POSTROOM_DATABASE_URL_FILE=/run/secrets/postroom/database-url` (surrounding whitespace is
stripped). Use this for secrets; setting both `X` and `X_FILE` is an error. Durations are in
seconds; booleans accept `true`/`false`/`1`/`0`. No secret is ever printed: URLs appear with
their userinfo password and `password=`/`sslpassword=` values as `***`, and every secret
value (passwords, `*_FILE` contents of secret settings) is masked in logs at every level,
errors, tracebacks (`--debug`), `postroom check`, `--help` and this reference.

A web process that only publishes reads three of them, `POSTROOM_SCHEMA`,
`POSTROOM_MAX_BODY_BYTES` and `POSTROOM_NOTIFY`, when it calls `postroom.configure()` at
start-up (or at its first `postroom.publish`), and needs no database or broker URL here:
give it the same values as the service's relay and worker, so its events land where the
relay reads. `postroom check` warns of outbox rows waiting in a schema no relay serves.

"""

_REFERENCE_OUTRO = """
## Kubernetes service links

A Service named `postroom` or `postroom-*` in the namespace makes
the kubelet inject `POSTROOM_*_SERVICE_HOST`, `POSTROOM_*_SERVICE_PORT[_<name>]`,
`POSTROOM_*_PORT` and `POSTROOM_*_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]` variables. postroom
ignores exactly those shapes (name *and* value: an IP address, a port number, a
`tcp://ip:port` URL), so they never count as unknown settings while a misspelt setting still
does. The manifests under `deploy/` also set `enableServiceLinks: false`.
"""


def reference() -> str:
    """Return the Markdown reference of every setting, generated from :class:`Settings`.

    ``docs/configuration.md`` is this text; a test fails when the two differ.
    """
    rows = ["| Variable | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        variable = PREFIX + (field.alias or name).upper()
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{variable}` | {_type_of(field)} | {_default_of(field)} | {description} |")
    # The prose between the table and the outro (URLs, TLS, ports, exit codes) ships as a
    # Markdown file in the package, so it stays readable and out of this module.
    guide = resources.files("postroom").joinpath("configuration.md").read_text()
    return _REFERENCE_INTRO + "\n".join(rows) + "\n\n" + guide + _REFERENCE_OUTRO.lstrip("\n")


def _type_of(field: FieldInfo) -> str:
    annotation = field.annotation
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if annotation is SecretStr or SecretStr in get_args(annotation):
        text = "string, secret"
    elif get_origin(annotation) is Literal:
        text = "one of " + ", ".join(f"`{choice}`" for choice in get_args(annotation))
    else:
        args = [arg for arg in get_args(annotation) if arg is not type(None)] or [annotation]
        text = " or ".join(names.get(arg, getattr(arg, "__name__", str(arg))) for arg in args)
    bounds = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    for constraint in field.metadata:
        for attr, symbol in bounds.items():
            value = getattr(constraint, attr, None)
            if value is not None:
                text += f", {symbol} {value}"
    return text


def _default_of(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        value = redact_url(value.get_secret_value())
    if isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"
