"""Keep secrets out of everything postroom prints: one place decides what is hidden.

:func:`redact_url` is the form of a URL fit for logs, errors and ``postroom check``: the
userinfo password and the ``password``/``sslpassword`` query values become ``***``.
:func:`mask` hides known secret values (passwords, whole secret settings, ``*_FILE``
contents) in any text, for what client libraries echo in their errors and tracebacks.

:class:`Redaction` is what a consumer (or its router) declares must never be stored in
dead_letters or shown: body fields and headers of a failed message, dropped or masked.
The worker applies it before a dead letter is written, so the secret never reaches the
table; the ops tools apply it again when showing older rows. A masked value becomes
``***`` whatever it was (its length is not kept either). A body that is not a JSON
object cannot be searched for the fields, so when body rules exist it is dropped whole
rather than risk keeping them. The values redacted are also masked in the error message
and traceback stored with the dead letter (a handler's ``ValueError(f"bad card
{number}")`` would otherwise carry the number there); values shorter than
:data:`MIN_MASKED` characters are not, they would garble unrelated text. A dead letter
whose body was redacted carries the header ``postroom-redacted: body``: it no longer
holds the message as sent, so a plain replay refuses it (edit-and-replay supplies it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

HIDDEN = "***"
MIN_MASKED = 4
H_REDACTED = "postroom-redacted"
"""Header of a dead letter naming what was redacted: ``body``, ``headers`` or both."""
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


@dataclass(frozen=True, slots=True)
class Redaction:
    """Fields and headers to drop or mask; body fields are dotted paths (``card.number``).

    A path through a list applies to each element of it. Header names match in any case.
    """

    drop: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()
    drop_headers: tuple[str, ...] = ()
    mask_headers: tuple[str, ...] = ()

    def apply(self, body: bytes, headers: Mapping[str, Any]) -> tuple[bytes, dict[str, Any]]:
        """Return *body* and *headers* redacted, with :data:`H_REDACTED` saying what changed."""
        done = [part for part in str(headers.get(H_REDACTED) or "").split(",") if part]
        new_body = self._body(body)
        if new_body != body and "body" not in done:
            done.append("body")
        new_headers = self._headers(headers)
        if new_headers != dict(headers) and "headers" not in done:
            done.append("headers")
        if done:
            new_headers[H_REDACTED] = ",".join(done)
        return new_body, new_headers

    def secrets(self, body: bytes, headers: Mapping[str, Any]) -> list[str]:
        """Return the values *body* and *headers* hold where this redaction applies."""
        found: list[Any] = []
        try:
            document = json.loads(body) if (self.drop or self.mask) else None
        except (ValueError, UnicodeDecodeError):
            document = None
        for path in (*self.drop, *self.mask):
            _collect(document, path.split("."), found)
        names = {name.lower() for name in (*self.drop_headers, *self.mask_headers)}
        found.extend(value for name, value in headers.items() if name.lower() in names)
        texts = {str(value) for value in found if not isinstance(value, dict | list | bool)}
        return sorted((t for t in texts if len(t) >= MIN_MASKED), key=len, reverse=True)

    def _body(self, body: bytes) -> bytes:
        if not (self.drop or self.mask):
            return body
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return b""
        if not isinstance(document, dict):
            return b""
        for path in self.drop:
            _walk(document, path.split("."), drop=True)
        for path in self.mask:
            _walk(document, path.split("."), drop=False)
        redacted = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        # Unchanged documents keep their exact bytes (key order, spacing).
        return body if json.loads(redacted) == json.loads(body) else redacted

    def _headers(self, headers: Mapping[str, Any]) -> dict[str, Any]:
        dropped = {name.lower() for name in self.drop_headers}
        masked = {name.lower() for name in self.mask_headers}
        kept: dict[str, Any] = {}
        for name, value in headers.items():
            if name.lower() in dropped:
                continue
            kept[name] = HIDDEN if name.lower() in masked else value
        return kept


def _walk(node: Any, path: list[str], *, drop: bool) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, path, drop=drop)
        return
    if not isinstance(node, dict) or path[0] not in node:
        return
    if len(path) > 1:
        _walk(node[path[0]], path[1:], drop=drop)
    elif drop:
        del node[path[0]]
    else:
        node[path[0]] = HIDDEN


def _collect(node: Any, path: list[str], found: list[Any]) -> None:
    if isinstance(node, list):
        for item in node:
            _collect(item, path, found)
    elif isinstance(node, dict) and path[0] in node:
        if len(path) > 1:
            _collect(node[path[0]], path[1:], found)
        else:
            found.append(node[path[0]])
