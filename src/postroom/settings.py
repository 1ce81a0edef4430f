"""Settings from ``POSTROOM_*`` environment variables and ``*_FILE`` secret files.

This is the only module that reads the environment. Settings are built once at the
edge (the CLI) and passed in; an unknown ``POSTROOM_*`` variable is an error, because
a misspelt setting that is silently ignored is a production incident waiting to happen.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from postroom.errors import ConfigError

PREFIX = "POSTROOM_"
FILE_SUFFIX = "_FILE"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def redact_url(url: str) -> str:
    """Return *url* with its password replaced, safe to log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


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
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :].lower()
            from_file = False
            if name not in fields and name.endswith(FILE_SUFFIX.lower()):
                name = name[: -len(FILE_SUFFIX)]
                from_file = True
            if name not in fields:
                raise ConfigError(f"unknown setting {key}; known: {_known_names(fields)}")
            if from_file:
                if PREFIX + name.upper() in self._environ:
                    raise ConfigError(f"both {PREFIX}{name.upper()} and {key} are set; keep one")
                try:
                    raw = Path(raw).read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"{key}: cannot read {raw}: {exc.strerror}") from None
            values[name] = raw
        return values


def _env_names(fields: Mapping[str, FieldInfo]) -> set[str]:
    """Names as they appear after the prefix: the alias where a field has one."""
    return {field.alias or name for name, field in fields.items()}


def _known_names(fields: set[str]) -> str:
    return ", ".join(PREFIX + name.upper() for name in sorted(fields))


class Settings(BaseSettings):
    """Everything a postroom process can be told, validated at start-up."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, validate_default=True)

    database_url: SecretStr = Field(
        description="PostgreSQL URL, e.g. postgresql+asyncpg://user:pw@host:5432/db."
    )
    amqp_url: SecretStr = Field(
        default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        description="RabbitMQ URL, amqp:// or amqps://.",
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
    delivery_limit: int = Field(
        default=20,
        gt=0,
        description="Broker redeliveries before a message that crashes workers is dead-lettered.",
    )
    shutdown_timeout: float = Field(
        default=25.0, ge=0, description="Seconds in-flight handlers get to finish on SIGTERM."
    )
    health_host: str = Field(default="0.0.0.0", description="Address of the health server.")
    health_port: int = Field(
        default=9000, ge=0, le=65535, description="Port for /livez, /readyz, /metrics; 0 = off."
    )
    log_format: Literal["json", "console"] = Field(default="json", description="Log renderer.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Minimum log level."
    )
    inbox_retention_days: float = Field(
        default=7.0, gt=0, description="Days an inbox row is kept for deduplication."
    )
    dead_letter_retention_days: float = Field(
        default=30.0, gt=0, description="Days replayed or purged dead letters are kept."
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
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme in ("postgresql", "postgres"):
            url = "postgresql+asyncpg" + url[len(scheme) :]
        elif scheme != "postgresql+asyncpg":
            raise ValueError(
                f"must start with postgresql+asyncpg:// (got scheme {scheme or 'none'!r})"
            )
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError("has no host")
        return SecretStr(url)

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(
                f"must start with amqp:// or amqps:// (got {parts.scheme or 'none'!r})"
            )
        if not parts.hostname:
            raise ValueError("has no host")
        return value

    @field_validator("schema_name")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError("must be a lower-case SQL identifier ([a-z_][a-z0-9_]*)")
        return value

    @property
    def asyncpg_dsn(self) -> str:
        """The database URL in the form asyncpg itself accepts."""
        return self.database_url.get_secret_value().replace(
            "postgresql+asyncpg://", "postgresql://", 1
        )

    def describe(self) -> dict[str, object]:
        """Return the settings with URLs redacted, for a start-up log line."""
        shown: dict[str, object] = self.model_dump(by_alias=True)
        shown["database_url"] = redact_url(self.database_url.get_secret_value())
        shown["amqp_url"] = redact_url(self.amqp_url.get_secret_value())
        return shown


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = str(error["loc"][0]) if error["loc"] else "?"
        name = "schema" if field == "schema_name" else field
        problems.append(f"{PREFIX}{name.upper()}: {error['msg']}")
    return "invalid settings: " + "; ".join(problems)
