"""One database URL, parsed once: libpq's parameters, their TLS and their refusals."""

from __future__ import annotations

import ssl

import pytest

from postroom.broker import Broker
from postroom.database import Database
from postroom.errors import ConfigError
from postroom.redaction import mask, redact_url
from postroom.settings import Settings
from postroom.tls import Verify


def parse(query: str, base: str = "postgresql://app@db.example.com/app") -> Database:
    return Database.parse(f"{base}?{query}" if query else base)


@pytest.mark.parametrize(
    ("query", "mode", "verify"),
    [
        ("", "prefer", Verify.NONE),  # libpq's default
        ("sslmode=disable", "disable", None),
        ("sslmode=allow", "allow", Verify.NONE),
        ("sslmode=require", "require", Verify.NONE),
        ("sslmode=verify-full", "verify-full", Verify.FULL),  # the system trust store
        ("sslmode=verify-full&sslrootcert=system", "verify-full", Verify.FULL),
        ("ssl=require", "require", Verify.NONE),  # SQLAlchemy's spelling
        ("ssl=true", "verify-full", Verify.FULL),  # asyncpg's meaning of ssl=True
        ("ssl=false", "disable", None),
    ],
)
def test_every_sslmode_gets_its_context(query, mode, verify):
    database = parse(query)
    assert database.sslmode == mode
    assert (database.tls.verify if database.tls else None) is verify
    if database.tls is not None:
        context = database.tls.context
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert context.check_hostname is (verify is Verify.FULL)
        assert (context.verify_mode == ssl.CERT_REQUIRED) is (verify is not Verify.NONE)


def test_require_with_a_root_certificate_checks_the_chain_like_libpq(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text(_system_ca_pem())  # any PEM CA will do: copy one from the system store
    assert parse(f"sslmode=require&sslrootcert={ca}").tls.verify is Verify.CA  # type: ignore[union-attr]
    assert parse(f"sslmode=verify-ca&sslrootcert={ca}").tls.verify is Verify.CA  # type: ignore[union-attr]


def _system_ca_pem() -> str:
    context = ssl.create_default_context()
    der = context.get_ca_certs(binary_form=True)
    if not der:
        pytest.skip("no CA in the system store to copy")
    return ssl.DER_cert_to_PEM_cert(der[0])


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("sslmode=bogus", "unknown sslmode 'bogus'; use one of disable, allow, prefer"),
        ("sslmode=verify-ca", "sslmode=verify-ca needs sslrootcert="),
        ("sslmode=verify-ca&sslrootcert=system", "sslmode=verify-ca needs sslrootcert="),
        (
            "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "sslrootcert=/nonexistent/ca.pem: cannot read it",
        ),
        ("sslmode=require&sslcert=/etc/hostname", "sslcert is set without sslkey"),
        ("sslmode=require&sslkey=/etc/hostname", "sslkey is set without sslcert"),
        ("ssl=require&sslmode=require", "both ssl= and sslmode= are given"),
        ("sslmod=require", "unknown parameter 'sslmod'"),
    ],
)
def test_impossible_combinations_are_config_errors(query, message):
    with pytest.raises(ConfigError, match=r"^POSTROOM_DATABASE_URL: ") as raised:
        parse(query)
    assert message in str(raised.value)


def test_a_unix_socket_with_a_password_in_the_query():
    database = Database.parse("postgresql://app@/app?host=/run/postgresql&password=s3cret")
    assert database.hosts == ("/run/postgresql",) and database.password == "s3cret"
    assert database.tls is None and database.loopback
    assert database.redacted == "postgresql://app@/app?host=/run/postgresql&password=***"
    assert "s3cret" not in repr(database)
    with pytest.raises(ConfigError, match="cannot apply to a Unix socket"):
        Database.parse("postgresql://app@/app?host=/run/postgresql&sslmode=verify-full")


def test_passwords_are_redacted_and_masked_in_every_form():
    url = "postgresql+asyncpg://app:p%40ss@db/app?sslmode=disable&sslpassword=k3y&password=q1"
    assert redact_url(url) == (
        "postgresql+asyncpg://app:***@db/app?sslmode=disable&sslpassword=***&password=***"
    )
    settings = Settings(database_url=url, amqp_url="amqp://u:amqp-pw@mq/")  # type: ignore[arg-type]
    text = "p@ss p%40ss k3y q1 amqp-pw " + settings.database_url.get_secret_value()
    assert mask(text, settings.secrets()).count("***") >= 5
    for secret in ("p@ss", "p%40ss", "k3y", "q1", "amqp-pw"):
        assert secret not in settings.mask(text)
    assert "guest" in settings.mask("user guest")  # the public default is not masked


def test_the_broker_verifies_amqps_and_refuses_mixed_tls_settings(tmp_path):
    broker = Broker.parse("amqps://app:pw@mq.example.com/")
    assert broker.tls is not None and broker.tls.verify is Verify.FULL
    assert broker.ssl_context is not None and broker.ssl_context.check_hostname
    assert not broker.loopback and Broker.parse("amqp://localhost/").loopback
    with pytest.raises(ConfigError, match="POSTROOM_AMQP_URL is amqp://; use amqps://"):
        Broker.parse("amqp://mq/", ca=str(tmp_path / "ca.pem"))
    with pytest.raises(ConfigError, match="TLS query keys \\(cafile\\) are not used"):
        Broker.parse("amqps://mq/?cafile=/x")
    with pytest.raises(
        ConfigError, match="POSTROOM_AMQP_TLS_CERT is set without POSTROOM_AMQP_TLS_KEY"
    ):
        Broker.parse("amqps://mq/", cert="/etc/hostname")


def test_a_malformed_url_never_quotes_its_password():
    # An unencoded "/" in the password makes the rest of it parse as the port.
    for environ in (
        {"POSTROOM_DATABASE_URL": "postgresql://u:Pa55/word@db/app"},
        {
            "POSTROOM_DATABASE_URL": "postgresql://u@db/app",
            "POSTROOM_AMQP_URL": "amqp://u:Pa55/word@mq/",
        },
    ):
        with pytest.raises(ConfigError) as raised:
            Settings.from_env(environ)
        assert "not a valid URL (percent-encode" in str(raised.value)
        assert "Pa55" not in str(raised.value)
