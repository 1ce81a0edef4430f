"""`postroom topology show|delete` on the demo's router, in this run's private vhost."""

from __future__ import annotations

import asyncio
import json
import subprocess

import aio_pika
import pytest

from examples.shop.consumers import router
from postroom import rabbit
from postroom.worker import _queue_spec
from tests.conftest import ROOT, postroom_cmd, settings_env

ROUTER = "examples.shop.consumers:router"


def cli(settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        postroom_cmd("topology", *args),
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def state(amqp, settings) -> dict[str, bool]:
    """Which of the router's queues and the two exchanges exist, by passive declares."""
    names = [n for c in router for n in (c.name, f"{c.name}.dead")]
    found = {n: (await rabbit.queue_state(amqp, n)).exists for n in names}
    for exchange in (settings.exchange, settings.dead_letter_exchange):
        found[exchange] = await rabbit.exchange_exists(amqp, exchange)
    return found


@pytest.fixture
async def declared(settings, amqp):
    """The demo's topology as its worker declares it; whatever is left is removed after."""
    await rabbit.declare_queues(
        amqp,
        exchange=settings.exchange,
        dead_letter_exchange=settings.dead_letter_exchange,
        queues=[_queue_spec(c, settings.delivery_limit) for c in router],
    )
    yield
    channel = await amqp.channel()
    for consumer in router:
        for name in (consumer.name, f"{consumer.name}.dead"):
            await channel.queue_delete(name)
    for exchange in (settings.exchange, settings.dead_letter_exchange):
        await channel.exchange_delete(exchange)
    await channel.close()


async def test_show_then_delete_leaves_no_queue_or_exchange(settings, amqp, declared):
    run = lambda *args: asyncio.to_thread(cli, settings, *args)  # noqa: E731
    shown = await run("show", ROUTER, "--json")
    assert shown.returncode == 0, shown.stderr
    items = json.loads(shown.stdout)["topology"]
    kinds = {(i["kind"], i["name"]) for i in items}
    assert ("queue", "shop.payments") in kinds and ("dead queue", "shop.payments.dead") in kinds
    assert ("exchange", settings.exchange) in kinds
    assert all(i["exists"] for i in items)
    assert any(
        i["kind"] == "binding" and i["detail"] == f"{settings.exchange} -> shop.payments "
        "(key shop.order-placed)"
        for i in items
    ), items

    # A queue holding a message is refused without --force, and nothing is deleted.
    channel = await amqp.channel()
    await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key="shop.shipping")
    await channel.close()

    async def shipping_holds_it() -> bool:
        return (await rabbit.queue_state(amqp, "shop.shipping")).messages == 1

    for _ in range(50):
        if await shipping_holds_it():
            break
        await asyncio.sleep(0.1)
    assert await shipping_holds_it()
    refused = await run("delete", ROUTER, "--exchanges")
    assert refused.returncode == 1
    assert "shop.shipping (1 messages, 0 consumers)" in refused.stderr
    assert "nothing was deleted" in refused.stderr and "--force" in refused.stderr
    assert all((await state(amqp, settings)).values())

    dry = await run("delete", ROUTER, "--exchanges", "--force", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run: nothing changed" in dry.stdout
    assert all((await state(amqp, settings)).values())

    deleted = await run("delete", ROUTER, "--exchanges", "--force", "--json")
    assert deleted.returncode == 0, deleted.stderr
    actions = {(i["kind"], i["name"]): i["action"] for i in json.loads(deleted.stdout)["topology"]}
    assert actions["queue", "shop.shipping"] == "deleted"
    assert actions["dead queue", "shop.shipping.dead"] == "deleted"
    assert actions["binding", "shop.shipping"] == "deleted (with its queue)"
    assert actions["exchange", settings.exchange] == "deleted"
    assert not any((await state(amqp, settings)).values())

    again = await run("show", ROUTER)
    assert again.returncode == 1  # nothing there any more


async def test_an_exchange_other_queues_use_is_kept(settings, amqp, declared, names):
    channel = await amqp.channel()
    other = await channel.declare_queue(f"other.{names}", exclusive=True)
    await other.bind(settings.exchange, routing_key="someone.elses")
    deleted = await asyncio.to_thread(cli, settings, "delete", ROUTER, "--exchanges", "--json")
    await channel.close()
    assert deleted.returncode == 1, deleted.stderr
    actions = {(i["kind"], i["name"]): i["action"] for i in json.loads(deleted.stdout)["topology"]}
    assert actions["exchange", settings.exchange].startswith("kept: other queues are bound")
    assert actions["exchange", settings.dead_letter_exchange] == "deleted"
    found = await state(amqp, settings)
    assert found[settings.exchange] and not found[settings.dead_letter_exchange]
    assert not any(found[c.name] or found[f"{c.name}.dead"] for c in router)
