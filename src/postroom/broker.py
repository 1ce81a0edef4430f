"""One description of the broker connection: the AMQP URL and its TLS, parsed once.

``amqps://`` connections verify the broker's certificate and host name, against
``POSTROOM_AMQP_TLS_CA`` or else the system trust store, and may present a client
certificate (``POSTROOM_AMQP_TLS_CERT`` and ``POSTROOM_AMQP_TLS_KEY``, the key's password
in ``POSTROOM_AMQP_TLS_KEY_PASSWORD`` or its ``_FILE``). TLS settings with an ``amqp://``
URL, or aiormq's own TLS query keys in the URL, are a :class:`ConfigError`: one way to say
it. :func:`postroom.rabbit.connect` opens connections from this.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from postroom.errors import ConfigError
from postroom.redaction import amqp_urls, redact_url, url_secrets
from postroom.tls import ClientTLS, Verify, client_tls

SETTING = "POSTROOM_AMQP_URL"
TLS_SETTINGS = (
    "POSTROOM_AMQP_TLS_CA",
    "POSTROOM_AMQP_TLS_CERT",
    "POSTROOM_AMQP_TLS_KEY",
    "POSTROOM_AMQP_TLS_KEY_PASSWORD",
)
_CLIENT_TLS_KEYS = frozenset({"cafile", "capath", "certfile", "keyfile", "no_verify_ssl"})


@dataclass(frozen=True, slots=True)
class Broker:
    """The RabbitMQ URL and the TLS it is reached with (None for ``amqp://``)."""

    url: str = field(repr=False)
    host: str
    user: str
    tls: ClientTLS | None

    @classmethod
    def parse(
        cls,
        url: str,
        *,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        key_password: str | None = None,
    ) -> Broker:
        """Check *url* and the TLS files; raise :class:`ConfigError` naming the setting.

        *url* may list several brokers (a cluster's nodes), comma-separated: each is
        checked, they share the TLS settings, and :func:`postroom.rabbit.connect` fails
        over between them.
        """
        if len(urls := amqp_urls(url)) > 1:
            tls_files = {"ca": ca, "cert": cert, "key": key, "key_password": key_password}
            first, *rest = [cls.parse(one, **tls_files) for one in urls]
            if any((b.tls is None) != (first.tls is None) for b in rest):
                raise ConfigError(f"{SETTING}: list brokers of one scheme, amqp:// or amqps://")
            return cls(url=",".join(urls), host=first.host, user=first.user, tls=first.tls)
        try:
            parts = urlsplit(url)
            _ = parts.port
        except ValueError:  # its text may quote part of a password: not shown
            raise ConfigError(
                f"{SETTING}: not a valid URL (percent-encode '/', '@', ':' and '#' in the "
                "user name and password)"
            ) from None
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigError(
                f"{SETTING}: must start with amqp:// or amqps:// (got {parts.scheme or 'none'!r})"
            )
        if not parts.hostname:
            raise ConfigError(f"{SETTING}: has no host")
        keys = {key for key, _ in parse_qsl(parts.query)} & _CLIENT_TLS_KEYS
        if keys:
            raise ConfigError(
                f"{SETTING}: TLS query keys ({', '.join(sorted(keys))}) are not used; set "
                "POSTROOM_AMQP_TLS_CA, POSTROOM_AMQP_TLS_CERT and POSTROOM_AMQP_TLS_KEY"
            )
        tls = None
        if parts.scheme == "amqps":
            tls = client_tls(
                verify=Verify.FULL,
                ca=ca,
                cert=cert,
                key=key,
                key_password=key_password,
                names=TLS_SETTINGS,
            )
        elif any(value is not None for value in (ca, cert, key, key_password)):
            raise ConfigError(
                f"TLS settings are given but {SETTING} is amqp://; use amqps:// to connect "
                "with TLS, or unset the POSTROOM_AMQP_TLS_* settings"
            )
        user = unquote(parts.username) if parts.username else "guest"
        return cls(url=url, host=parts.hostname, user=user, tls=tls)

    @property
    def urls(self) -> list[str]:
        """Each broker's URL (one, or a cluster's nodes)."""
        return amqp_urls(self.url)

    @property
    def redacted(self) -> str:
        """The URL, password hidden."""
        return redact_url(self.url)

    @property
    def secrets(self) -> set[str]:
        """The password in the URL, for masking free text."""
        return url_secrets(self.url)

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The context to hand the AMQP client, None for a plain connection."""
        return self.tls.context if self.tls is not None else None

    @property
    def loopback(self) -> bool:
        """True if the host is a loopback name or address."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
