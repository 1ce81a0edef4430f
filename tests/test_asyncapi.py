"""`postroom asyncapi`: documents valid against the official AsyncAPI 3.0.0 JSON Schema.

The schema is vendored (tests/data/README.md says from where) and validated offline:
a $ref that would need the network fails the test instead of fetching.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from jsonschema_specifications import REGISTRY as METASCHEMAS
from referencing import Registry
from typer.testing import CliRunner

from postroom import testing
from postroom.asyncapi import HEADERS_SCHEMA, document
from postroom.cli import app
from postroom.router import Router
from tests.apps import billing, wallet

SCHEMA = json.loads(
    (Path(__file__).parent / "data" / "asyncapi-3.0.0.schema.json").read_text(encoding="utf-8")
)


def _offline(uri: str) -> Any:
    raise LookupError(f"{uri} is not in the vendored schema; validation must work offline")


def validate_asyncapi(doc: dict[str, Any]) -> None:
    """Validate *doc* against the official schema, then check what a schema cannot.

    JSON Schema does not follow the document's own $refs, nor check AsyncAPI's rule that
    an operation's messages are messages of its channel: both are checked here.
    """
    validator = Draft7Validator(
        SCHEMA,
        registry=Registry(retrieve=_offline).combine(METASCHEMAS),
        format_checker=Draft7Validator.FORMAT_CHECKER,
    )
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errors[:10]
    )
    for ref in _refs(doc):
        assert _resolve(doc, ref) is not None, f"dangling $ref {ref}"
    for name, operation in doc["operations"].items():
        channel = operation["channel"]["$ref"]
        for message in operation["messages"]:
            assert message["$ref"].startswith(channel + "/messages/"), (name, message)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node.get(part.replace("~1", "/").replace("~0", "~"))
        if node is None:
            return None
    return node


def schema_validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft7Validator:
    """A validator for *schema* whose `#/components/...` refs resolve inside *doc*."""
    return Draft7Validator({**doc, **schema}, format_checker=Draft7Validator.FORMAT_CHECKER)


def test_billing_router_document_is_valid_asyncapi():
    doc = document(billing.router, title="billing", exchange="ev.billing")
    validate_asyncapi(doc)
    assert set(doc["channels"]) == {
        "topic.billing.charge",
        "queue.billing.charge",
        "queue.billing.audit",
    }
    topic = doc["channels"]["topic.billing.charge"]
    assert topic["address"] == "billing.charge"
    assert topic["bindings"]["amqp"]["exchange"] == {
        "name": "ev.billing",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
    }
    queue = doc["channels"]["queue.billing.audit"]["bindings"]["amqp"]
    assert queue["is"] == "queue" and queue["queue"]["name"] == "billing.audit"
    assert set(doc["operations"]) == {"receive.billing.charge", "receive.billing.audit"}
    charge = doc["operations"]["receive.billing.charge"]
    assert charge["action"] == "receive"
    assert charge["x-postroom-consumer"]["maxAttempts"] == 3
    assert charge["x-postroom-consumer"]["deadLetterQueue"] == "billing.charge.dead"


def test_payload_and_header_schemas_describe_what_postroom_sends():
    doc = document(wallet.router, title="wallet")
    validate_asyncapi(doc)
    credited = doc["components"]["messages"]["wallet.credited"]
    payload = schema_validator(doc, credited["payload"])
    headers = schema_validator(doc, credited["headers"])

    sent = testing.message(wallet.WalletCredited(customer_id=1, cents=5, balance_cents=5))
    payload.validate(json.loads(sent.body))
    headers.validate(sent.amqp_headers())
    assert not payload.is_valid({"customer_id": 1, "cents": 5})  # missing field
    assert not payload.is_valid({"customer_id": 1, "cents": 5, "balance_cents": 5, "x": 1})
    assert not payload.is_valid({"customer_id": "one", "cents": 5, "balance_cents": 5})
    other_topic = testing.message(wallet.WalletOpened(customer_id=1)).amqp_headers()
    assert not headers.is_valid(other_topic)  # cloudEvents_type is pinned per message
    assert not headers.is_valid(
        {k: v for k, v in sent.amqp_headers().items() if k != "postroom-attempt"}
    )
    assert credited["bindings"]["amqp"]["messageType"] == "wallet.credited"
    assert HEADERS_SCHEMA in doc["components"]["schemas"]


def test_declared_publications_become_send_operations():
    doc = document(wallet.router, title="wallet")
    send = doc["operations"]["send.wallet.credited"]
    assert send["action"] == "send"
    assert send["channel"] == {"$ref": "#/channels/topic.wallet.credited"}
    assert send["bindings"]["amqp"]["mandatory"] is True
    assert "`wallet.refund`" in send["description"]
    receive = doc["operations"]["receive.wallet.refund"]
    assert receive["messages"] == [
        {"$ref": "#/channels/queue.wallet.refund/messages/shop.order-cancelled"}
    ]


def test_two_events_named_alike_keep_distinct_schemas():
    import postroom

    def event(topic: str, field: type) -> type[postroom.Event]:
        namespace = {"__annotations__": {"value": field}, "__module__": f"svc_{topic[:1]}"}
        return type("Placed", (postroom.Event,), namespace, topic=topic)

    first, second = event("a.placed", int), event("b.placed", str)
    router = Router()
    router.consumer("svc.a", first, publishes=(second,))(_noop)
    doc = document(router, title="clash")
    validate_asyncapi(doc)
    messages = doc["components"]["messages"]
    a = schema_validator(doc, messages["a.placed"]["payload"])
    b = schema_validator(doc, messages["b.placed"]["payload"])
    assert a.is_valid({"value": 1}) and not a.is_valid({"value": "x"})
    assert b.is_valid({"value": "x"}) and not b.is_valid({"value": 1})


async def _noop(event: Any, ctx: Any) -> None:
    return None


def test_shop_demo_router_document_is_valid_asyncapi():
    if (
        importlib.util.find_spec("examples") is None
        or not (Path(__file__).parents[1] / "examples" / "shop" / "consumers.py").is_file()
    ):
        pytest.skip("examples/shop is not in this checkout")
    shop = importlib.import_module("examples.shop.consumers")
    doc = document(shop.router, title="shop")
    validate_asyncapi(doc)
    assert {op["action"] for op in doc["operations"].values()} >= {"receive"}
    assert len([k for k in doc["operations"] if k.startswith("receive.")]) == len(shop.router)


def test_cli_writes_the_document(tmp_path):
    out = tmp_path / "asyncapi.json"
    result = CliRunner().invoke(
        app,
        [
            "asyncapi",
            "tests.apps.wallet:router",
            "--output",
            str(out),
            "--title",
            "Wallet service",
            "--api-version",
            "2.1.0",
            "--exchange",
            "ev.shop",
        ],
    )
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written == document(
        wallet.router, title="Wallet service", version="2.1.0", exchange="ev.shop"
    )
    validate_asyncapi(written)


def test_cli_defaults_and_bad_router(monkeypatch):
    for key in [k for k in os.environ if k.startswith("POSTROOM_")]:
        monkeypatch.delenv(key)
    result = CliRunner().invoke(app, ["asyncapi", "tests.apps.billing:router"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["info"] == {"title": "tests.apps.billing:router", "version": "1.0.0"}
    assert doc["channels"]["topic.billing.charge"]["bindings"]["amqp"]["exchange"]["name"] == (
        "postroom.events"
    )
    bad = CliRunner().invoke(app, ["asyncapi", "tests.apps.nowhere:router"])
    assert bad.exit_code == 2 and "cannot import 'tests.apps.nowhere'" in bad.stderr


def test_the_validation_catches_broken_documents():
    doc = document(billing.router, title="billing")
    doc["channels"]["topic.billing.charge"]["bindings"]["amqp"]["exchange"]["type"] = "topics"
    with pytest.raises(AssertionError, match="bindings"):
        validate_asyncapi(doc)
    doc = document(billing.router, title="billing")
    doc["operations"]["receive.billing.audit"]["channel"] = {"$ref": "#/channels/nowhere"}
    with pytest.raises(AssertionError, match="dangling"):
        validate_asyncapi(doc)
