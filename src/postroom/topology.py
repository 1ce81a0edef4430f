"""A router's broker topology: what its worker declares, as the broker has it, and removal.

A worker declares, per consumer, a quorum queue bound to the consumer's topics on the
events exchange and a ``<consumer>.dead`` queue bound to the dead-letter exchange; the
two exchanges are shared by every consumer that uses them. :func:`inspect` looks each
one up with passive declares (nothing is created); :func:`delete` removes the queues
(their bindings go with them) and, if asked, the exchanges. It never deletes a queue
that holds messages or has consumers unless forced: it checks them all first and then deletes
nothing, and looks at each queue again just before deleting it (quorum queues do not
support the broker's ``if-empty`` flag); exchanges are deleted ``if-unused``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from postroom import rabbit
from postroom.errors import TopologyRefusedError
from postroom.router import Router
from postroom.settings import Settings


@dataclass(frozen=True, slots=True)
class Item:
    """One queue, binding or exchange of the router's topology, and what became of it."""

    kind: str
    """queue, dead queue, binding or exchange."""
    name: str
    exists: bool
    messages: int = 0
    consumers: int = 0
    detail: str = ""
    action: str = ""
    """Empty for ``show``; for ``delete``: deleted, would delete, kept, absent."""

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "exists": self.exists,
            "messages": self.messages,
            "consumers": self.consumers,
            "detail": self.detail,
            "action": self.action,
        }


async def inspect(settings: Settings, router: Router) -> list[Item]:
    """Return the router's queues, bindings and exchanges as the broker has them now."""
    connection = await rabbit.connect(settings.broker, name="postroom-ops")
    try:
        return await _inspect(connection, settings, router)
    finally:
        await connection.close()


async def _inspect(connection: Any, settings: Settings, router: Router) -> list[Item]:
    items: list[Item] = []
    for consumer in router:
        live = await rabbit.queue_state(connection, consumer.name)
        dead = await rabbit.queue_state(connection, f"{consumer.name}.dead")
        items.append(Item("queue", live.name, live.exists, live.messages, live.consumers))
        items.append(Item("dead queue", dead.name, dead.exists, dead.messages, dead.consumers))
        for topic in consumer.topics:
            detail = f"{settings.exchange} -> {live.name} (key {topic})"
            items.append(Item("binding", topic, live.exists, detail=detail))
        detail = f"{settings.dead_letter_exchange} -> {dead.name} (key {consumer.name})"
        items.append(Item("binding", consumer.name, dead.exists, detail=detail))
    for name, kind in ((settings.exchange, "topic"), (settings.dead_letter_exchange, "direct")):
        exists = await rabbit.exchange_exists(connection, name)
        items.append(Item("exchange", name, exists, detail=f"{kind}, shared by its consumers"))
    return items


async def delete(
    settings: Settings,
    router: Router,
    *,
    exchanges: bool = False,
    force: bool = False,
    dry_run: bool = False,
) -> list[Item]:
    """Delete the router's queues (with their bindings) and, with *exchanges*, the exchanges.

    Raises TopologyRefusedError, deleting nothing, if a queue holds messages or has
    consumers and *force* is not set. An exchange other queues are still bound to is
    kept (reported ``kept``) unless *force*. *dry_run* reports and changes nothing.
    """
    connection = await rabbit.connect(settings.broker, name="postroom-ops")
    try:
        items = await _inspect(connection, settings, router)
        busy = [i for i in items if i.kind.endswith("queue") and (i.messages or i.consumers)]
        if busy and not force:
            held = ", ".join(
                f"{i.name} ({i.messages} messages, {i.consumers} consumers)" for i in busy
            )
            raise TopologyRefusedError(
                "queue",
                busy[0].name,
                f"in use: {held}; nothing was deleted. Stop the workers and replay or drain "
                "the messages, or pass --force to delete them with the queues",
            )
        done: list[Item] = []
        for item in items:
            done.append(
                await _act(connection, item, exchanges=exchanges, force=force, dry_run=dry_run)
            )
        return done
    finally:
        await connection.close()


async def _act(connection: Any, item: Item, *, exchanges: bool, force: bool, dry_run: bool) -> Item:
    if not item.exists:
        return replace(item, action="absent")
    if item.kind == "binding":
        return replace(item, action="would delete" if dry_run else "deleted (with its queue)")
    if item.kind == "exchange" and not exchanges:
        return replace(item, action="kept (pass --exchanges to delete)")
    if dry_run:
        return replace(item, action="would delete")
    if item.kind == "exchange":
        try:
            await rabbit.delete_exchange(connection, item.name, if_unused=not force)
        except TopologyRefusedError:
            return replace(item, action="kept: other queues are bound to it (--force deletes it)")
        return replace(item, action="deleted")
    await rabbit.delete_queue(connection, item.name, force=force)
    return replace(item, action="deleted")
