"""Keep secrets out of everything postroom prints: one place decides what is hidden.

:func:`redact_url` is the form of a URL fit for logs, errors and ``postroom check``: the
userinfo password and the ``password``/``sslpassword`` query values become ``***``.
:func:`mask` hides known secret values (passwords, whole secret settings, ``*_FILE``
contents) in any text, for what client libraries echo in their errors and tracebacks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

HIDDEN = "***"
SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})
PUBLIC_VALUES = frozenset({"", "guest"})
"""Values never masked in free text: the broker's well-known default is no secret, and
masking the word would garble every line naming the ``guest`` user."""


def amqp_urls(value: str) -> list[str]:
    """Split ``POSTROOM_AMQP_URL``'s comma-separated broker list (the nodes of a cluster).

    Only a comma followed by ``amqp://`` or ``amqps://`` separates two URLs, so a comma
    inside a URL (a password, a query) stays in it. One URL gives a list of one.
    """
    return [part.strip() for part in _URL_SEPARATOR.split(value.strip())]


_URL_SEPARATOR = re.compile(r",\s*(?=amqps?://)")


def redact_url(url: str) -> str:
    """Return *url* (each URL of a broker list) with passwords replaced by ``***``."""
    if _URL_SEPARATOR.search(url):
        return ",".join(redact_url(one) for one in amqp_urls(url))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hosts = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{HIDDEN}@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{quote(key, safe='')}="
            + (HIDDEN if key.lower() in SECRET_QUERY_KEYS else quote(value, safe="/:,"))
            for key, value in pairs
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_secrets(url: str) -> set[str]:
    """Return the secret values inside *url* (or each URL of a broker list)."""
    if _URL_SEPARATOR.search(url):
        return set().union(*(url_secrets(one) for one in amqp_urls(url)))
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        if parts.password:
            found |= {parts.password, unquote(parts.password)}
    except ValueError:
        return found
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key.lower() in SECRET_QUERY_KEYS and value:
            found |= {value, quote(value, safe="")}
    return found


def mask(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each of *secrets* in *text* by ``***``, longest first."""
    for secret in sorted(set(secrets) - PUBLIC_VALUES, key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text
