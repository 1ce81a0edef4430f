"""Build the client TLS contexts for PostgreSQL and RabbitMQ, once, at start-up.

Both connections get an :class:`ssl.SSLContext` made here rather than by their client
libraries, so one set of rules holds: TLS 1.2 or newer; a CA file that cannot be read, a
client certificate without its key (or the reverse) and a key whose password is wrong are
a :class:`ConfigError` naming the setting at start, never a failure on the first connect.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from postroom.errors import ConfigError

SYSTEM = "system"
"""The CA value meaning "the operating system's trust store" (libpq's ``sslrootcert=system``)."""


class Verify(Enum):
    """How much of the server's certificate a connection checks."""

    NONE = "none"
    """Encrypted, peer not verified (libpq ``require`` without a CA, ``prefer``, ``allow``)."""
    CA = "ca"
    """The certificate chains to the given CA; the host name is not checked (``verify-ca``)."""
    FULL = "full"
    """The chain and the host name are checked (``verify-full``; AMQPS always)."""


@dataclass(frozen=True, slots=True)
class ClientTLS:
    """What a TLS client presents and checks; ``context`` is ready for the client library."""

    context: ssl.SSLContext
    verify: Verify

    def describe(self) -> str:
        """Return e.g. ``verified (CA and host name)``, for ``postroom check``."""
        return {
            Verify.NONE: "peer not verified",
            Verify.CA: "peer verified (CA, not host name)",
            Verify.FULL: "peer verified (CA and host name)",
        }[self.verify]


def client_tls(
    *,
    verify: Verify,
    ca: str | None,
    cert: str | None,
    key: str | None,
    key_password: str | None,
    names: tuple[str, str, str, str],
) -> ClientTLS:
    """Return a client context checking *verify* against *ca* (a file, or ``system``).

    *names* are the setting names of (ca, cert, key, key_password), used in errors. A CA
    of None with a verifying mode means the system store, which must hold certificates.
    """
    ca_name, cert_name, key_name, password_name = names
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify is Verify.NONE:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = verify is Verify.FULL
        context.verify_mode = ssl.CERT_REQUIRED
        if ca is None or ca == SYSTEM:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if not context.cert_store_stats()["x509_ca"]:
                raise ConfigError(
                    f"{ca_name} is not set and the system trust store is empty; give the "
                    "file of the CA that signed the server's certificate"
                )
        else:
            try:
                context.load_verify_locations(cafile=_readable(ca, ca_name))
            except ssl.SSLError as exc:
                raise ConfigError(
                    f"{ca_name}={ca}: not a PEM CA certificate ({exc.reason})"
                ) from None
    if (cert is None) != (key is None):
        given, missing = (cert_name, key_name) if key is None else (key_name, cert_name)
        raise ConfigError(f"{given} is set without {missing}; a client certificate needs both")
    if key_password is not None and key is None:
        raise ConfigError(f"{password_name} is set without {key_name}")
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(
                _readable(cert, cert_name),
                _readable(key, key_name),
                # Always a callable: with None, OpenSSL would prompt on a terminal.
                password=lambda: key_password or "",
            )
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{cert_name}/{key_name}: cannot load the client certificate and key "
                f"({exc.reason}); check they match, and {password_name} if the key is encrypted"
            ) from None
    return ClientTLS(context=context, verify=verify)


def _readable(path: str, name: str) -> str:
    try:
        with Path(path).expanduser().open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{name}={path}: cannot read it ({exc.strerror})") from None
    return str(Path(path).expanduser())
