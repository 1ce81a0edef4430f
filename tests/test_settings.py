"""Settings: validated at start-up, unknown keys refused, secrets never shown."""

from __future__ import annotations

import pytest

from postroom.errors import ConfigError
from postroom.redaction import amqp_urls
from postroom.settings import Settings, redact_url

URL = "postgresql+asyncpg://app:s3cret@db.internal:5432/app"


def test_reads_prefixed_variables_and_normalises_the_driver():
    settings = Settings.from_env(
        {
            "POSTROOM_DATABASE_URL": "postgresql://app:s3cret@db/app",
            "POSTROOM_RELAY_BATCH_SIZE": "50",
        }
    )
    assert settings.database_url.get_secret_value().startswith("postgresql+asyncpg://")
    assert settings.asyncpg_dsn.startswith("postgresql://")
    assert settings.relay_batch_size == 50
    assert settings.schema_name == "postroom"


def test_unknown_variable_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="unknown setting POSTROOM_BATCH_SIZE"):
        Settings.from_env({"POSTROOM_DATABASE_URL": URL, "POSTROOM_BATCH_SIZE": "5"})


def test_secret_file_variant(tmp_path):
    secret = tmp_path / "db-url"
    secret.write_text(URL + "\n")
    settings = Settings.from_env({"POSTROOM_DATABASE_URL_FILE": str(secret)})
    assert settings.database_url.get_secret_value() == URL


def test_missing_secret_file_and_double_definition_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="POSTROOM_DATABASE_URL_FILE: cannot read"):
        Settings.from_env({"POSTROOM_DATABASE_URL_FILE": str(tmp_path / "nope")})
    secret = tmp_path / "db-url"
    secret.write_text(URL)
    with pytest.raises(ConfigError, match="keep one"):
        Settings.from_env({"POSTROOM_DATABASE_URL": URL, "POSTROOM_DATABASE_URL_FILE": str(secret)})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"POSTROOM_DATABASE_URL": "mysql://u:pw@h/db"},
            "POSTROOM_DATABASE_URL: .*postgresql\\+asyncpg",
        ),
        (
            {"POSTROOM_DATABASE_URL": URL, "POSTROOM_AMQP_URL": "http://x"},
            "POSTROOM_AMQP_URL: .*amqp",
        ),
        ({"POSTROOM_DATABASE_URL": URL, "POSTROOM_SCHEMA": "Robert'); DROP"}, "POSTROOM_SCHEMA"),
        (
            {"POSTROOM_DATABASE_URL": URL, "POSTROOM_RELAY_BATCH_SIZE": "0"},
            "POSTROOM_RELAY_BATCH_SIZE",
        ),
        ({"POSTROOM_DATABASE_URL": URL, "POSTROOM_LOG_FORMAT": "xml"}, "POSTROOM_LOG_FORMAT"),
        ({}, "POSTROOM_DATABASE_URL: Field required"),
    ],
)
def test_invalid_values_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message) as caught:
        Settings.from_env(env)
    assert "s3cret" not in str(caught.value) and "pw@" not in str(caught.value)


def test_secrets_never_appear_in_repr_or_description():
    settings = Settings.from_env(
        {"POSTROOM_DATABASE_URL": URL, "POSTROOM_AMQP_URL": "amqp://u:hunter2@mq/"}
    )
    shown = repr(settings) + str(settings) + str(settings.describe())
    assert "s3cret" not in shown and "hunter2" not in shown
    assert (
        settings.describe()["database_url"] == "postgresql+asyncpg://app:***@db.internal:5432/app"
    )
    assert redact_url("amqp://guest@localhost/") == "amqp://guest@localhost/"


def test_several_broker_urls_are_checked_each_and_redacted_each():
    nodes = (
        "amqp://app:pw,1@rabbit-0:5672/v, amqp://app:pw2@rabbit-1:5672/v,amqp://app:pw3@rabbit-2/v"
    )
    settings = Settings.from_env({"POSTROOM_DATABASE_URL": URL, "POSTROOM_AMQP_URL": nodes})
    assert amqp_urls(settings.amqp_url.get_secret_value()) == [
        "amqp://app:pw,1@rabbit-0:5672/v",  # a comma inside a URL stays in it
        "amqp://app:pw2@rabbit-1:5672/v",
        "amqp://app:pw3@rabbit-2/v",
    ]
    shown = str(settings.describe())
    assert "pw" not in shown and "rabbit-2" in shown
    assert settings.broker.urls == amqp_urls(nodes) and "pw3" not in settings.broker.redacted
    assert {"pw,1", "pw2", "pw3"} <= settings.secrets()
    for bad, why in (
        ("amqp://h/,amqp:///nohost", "has no host"),
        ("amqp://h/,amqps://i/", "scheme"),
    ):
        with pytest.raises(ConfigError, match=f"POSTROOM_AMQP_URL.*{why}"):
            Settings.from_env({"POSTROOM_DATABASE_URL": URL, "POSTROOM_AMQP_URL": bad})
