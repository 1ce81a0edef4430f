"""A private three-node RabbitMQ cluster on loopback, and the faults that take nodes away.

Three :class:`~tests.faults.servers.PrivateRabbit` nodes with their own names, ports, data
directories and a private Erlang cookie, joined with ``rabbitmqctl join_cluster`` and set
to ``cluster_partition_handling = pause_minority`` as a production cluster of three would
be: a node cut off from the other two stops serving rather than diverge. Quorum queues
declared on it get a member on every node (their initial group size is the cluster's).

The faults stop the node leading a queue, SIGKILL the node a relay is connected to, and
partition one node from the other two. The partition is made at the Erlang distribution
layer, not through a TCP proxy: nodes find each other's distribution ports through epmd,
so a proxy cannot be put between them without a custom epmd module. Instead the node is
told a wrong cookie for its two peers and disconnected from them; every handshake either
way then fails until the right cookie is restored, which is what a partition looks like
to both sides. Each fault then commits a probe message and times how long until each consumer
applied it: the unordered consumer's time is the recovery reported in docs/guarantees.md,
the ordered consumer's adds the backlog its queue had (see :func:`probe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import time
import uuid
from typing import Any

import asyncpg

from postroom.tables import qualified
from tests.apps.faultapp import APPLY, AUDIT
from tests.faults import hazards
from tests.faults.servers import PrivateRabbit, amqp_ready
from tests.faults.workload import Chaos

PARTITION_HANDLING = "cluster_partition_handling = pause_minority\n"


class RabbitCluster:
    """Three private nodes joined into one cluster; start once, destroy at the end."""

    def __init__(self, size: int = 3) -> None:
        tag = uuid.uuid4().hex[:6]
        cookie = secrets.token_hex(16)
        self.nodes = [
            PrivateRabbit(
                name=f"postroom-cluster-{tag}-{i}", cookie=cookie, conf=PARTITION_HANDLING
            )
            for i in range(size)
        ]
        self.cookie = cookie

    async def start(self) -> None:
        await asyncio.gather(*(node.start() for node in self.nodes))
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            await node.ctl("stop_app")
            await node.ctl("join_cluster", seed.node)
            await node.ctl("start_app")
        running = await self.running_nodes(seed)
        if running != {n.node for n in self.nodes}:
            raise AssertionError(f"the cluster did not form: running {running}")

    async def running_nodes(self, via: PrivateRabbit) -> set[str]:
        status = json.loads(await via.ctl("cluster_status", "--formatter", "json"))
        return set(status["running_nodes"])

    async def add_vhost(self, vhost: str) -> str:
        """Create *vhost* (cluster-wide) and return the comma-separated URL of all nodes."""
        await self.nodes[0].add_vhost(vhost)
        return ",".join(f"{node.url.rstrip('/')}/{vhost}" for node in self.nodes)

    def node(self, name: str) -> PrivateRabbit:
        return next(n for n in self.nodes if n.node == name)

    async def queue_members(self, vhost: str, queue: str) -> tuple[str, list[str]]:
        """The queue's (leader, members), asked of any running node."""
        for node in self.nodes:
            if not node.running:
                continue
            with contextlib.suppress(AssertionError):
                rows = json.loads(
                    await node.ctl(
                        "list_queues",
                        "-p",
                        vhost,
                        "name",
                        "leader",
                        "members",
                        "--formatter",
                        "json",
                    )
                )
                for row in rows:
                    if row["name"] == queue:
                        return row["leader"], list(row["members"])
        raise AssertionError(f"no running node knows queue {queue}")

    async def whole(self, vhost: str, timeout: float = 120.0) -> None:
        """Wait until every queue of *vhost* has all its members online again.

        A restarted node is up (``await_startup``) before its quorum queue members have
        caught up with their leaders; a second node lost in that window leaves a queue
        without a majority, and the broker nacks every publish to it. The scenarios
        inject one node loss at a time, as a three-node cluster is built to survive.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        lagging: list[str] = []
        while loop.time() < deadline:
            for node in self.nodes:
                if not node.running:
                    continue
                with contextlib.suppress(AssertionError, ValueError):
                    rows = json.loads(
                        await node.ctl(
                            "list_queues",
                            "-p",
                            vhost,
                            "name",
                            "members",
                            "online",
                            "--formatter",
                            "json",
                        )
                    )
                    lagging = [
                        row["name"]
                        for row in rows
                        if isinstance(row.get("members"), list)
                        and set(row["members"]) - set(row.get("online") or [])
                    ]
                    if not lagging:
                        return
                    break
            await asyncio.sleep(0.5)
        raise AssertionError(f"queues without every member online after {timeout}s: {lagging}")

    async def holder_of(self, vhost: str, prefix: str) -> PrivateRabbit:
        """The node holding a client connection whose name starts with *prefix*.

        ``list_connections`` names no node, but each node listens on its own port and a
        connection's ``port`` is the one it reached. Asks each running node in turn, for
        up to a minute (the client may be between two connections).
        """
        by_port = {node.port: node for node in self.nodes}
        seen: list[str] = []
        for _ in range(60):
            for node in self.nodes:
                if not node.running:
                    continue
                try:
                    out = await node.ctl(
                        "list_connections",
                        "vhost",
                        "port",
                        "client_properties",
                        "--formatter",
                        "json",
                        timeout=20,
                    )
                except AssertionError as exc:
                    seen.append(str(exc)[:200])
                    continue
                for row in json.loads(out):
                    props = dict(_pairs(row.get("client_properties")))
                    named = str(props.get("connection_name", ""))
                    seen.append(f"{row.get('vhost')}:{row.get('port')}:{named}")
                    holder = by_port.get(int(row["port"]))
                    if row.get("vhost") == vhost and named.startswith(prefix) and holder:
                        return holder
            await asyncio.sleep(1.0)
        raise AssertionError(f"no {prefix} connection in {vhost}; saw {seen[-10:]}")

    async def kill(self, node: PrivateRabbit) -> None:
        """SIGKILL the node's Erlang VM (no clean shutdown), as a lost machine would."""
        pid = (node.dir / "pid").read_text().strip()
        os.kill(int(pid), signal.SIGKILL)
        node.running = False
        for _ in range(100):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 0)
                await asyncio.sleep(0.1)
                continue
            return

    async def partition(self, node: PrivateRabbit, *, heal: bool = False) -> None:
        """Cut *node* off from its peers (wrong cookie both ways), or restore it."""
        peers = [n.node for n in self.nodes if n is not node]
        cookie = self.cookie if heal else "partitioned"
        calls = [f"erlang:set_cookie('{p}', '{cookie}')" for p in peers]
        if not heal:
            calls += [f"erlang:disconnect_node('{p}')" for p in peers]
        await node.ctl("eval", ", ".join(calls) + ".")

    async def destroy(self) -> None:
        await asyncio.gather(*(node.destroy() for node in self.nodes), return_exceptions=True)


def _pairs(value: Any) -> list[tuple[str, Any]]:
    """client_properties as JSON: a list of [name, type, value] triples or a mapping."""
    if isinstance(value, dict):
        return list(value.items())
    pairs = []
    for item in value or []:
        if isinstance(item, list) and len(item) >= 3:
            pairs.append((str(item[0]), item[2]))
    return pairs


def _cluster(chaos: Chaos) -> RabbitCluster:
    cluster: RabbitCluster = chaos.extra["cluster"]
    return cluster


def _vhost(chaos: Chaos) -> str:
    return chaos.amqp_url.rsplit("/", 1)[1]


async def probe(chaos: Chaos, kind: str, timeout: float = 120.0) -> None:
    """Commit a message now; record the seconds until each consumer applied it.

    The unordered consumer's time is the recovery: relay and workers failed over and
    messages flow end to end again. The ordered consumer's time adds its backlog: a
    single-active-consumer queue hands out one key's messages in order, so the probe
    waits behind every message committed before it, and while the writers run that
    backlog can grow faster than it drains (docs/guarantees.md has the figures).
    """
    started = time.monotonic()
    ids: list[str] = []
    while not ids and time.monotonic() - started < timeout:
        written = await hazards.commit(chaos, key=None, count=1)
        ids = [m for m in written if m in chaos.extra["writers"].ledger.committed]
    schema = chaos.extra["writers"].schema
    took: dict[str, float] = {}
    while time.monotonic() - started < timeout:
        conn = await asyncpg.connect(chaos.admin_dsn, timeout=10)
        try:
            rows = await conn.fetch(
                f"SELECT DISTINCT consumer FROM (SELECT consumer FROM "
                f"{qualified(schema, 'fault_effects')} WHERE message_id = ANY($1::uuid[]) "
                f"UNION ALL SELECT consumer FROM {qualified(schema, 'dead_letters')} "
                "WHERE message_id = ANY($2::text[])) AS s",
                ids,
                ids,
            )
        finally:
            await conn.close()
        for row in rows:
            took.setdefault(row["consumer"], round(time.monotonic() - started, 1))
        if {APPLY, AUDIT} <= took.keys():
            chaos.extra.setdefault("recovery", {}).setdefault(kind, []).append(took[AUDIT])
            chaos.extra.setdefault("ordered_lag", {}).setdefault(kind, []).append(took[APPLY])
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"a probe was not applied within {timeout}s of the fault: {took}")


async def stop_queue_leader(chaos: Chaos) -> None:
    """Stop (cleanly) the node leading the ordered consumer's queue, restart it later."""
    cluster = _cluster(chaos)
    queue = chaos.extra["leader_of"]
    leader, members = await cluster.queue_members(_vhost(chaos), queue)
    if len(members) != len(cluster.nodes):
        raise AssertionError(f"{queue} is not replicated on every node: {members}")
    node = cluster.node(leader)
    await node.stop()
    chaos.note("cluster_stop_queue_leader", f"{queue} led by {leader}")
    try:
        await probe(chaos, "stop_queue_leader")
    finally:
        await node.start()
    await cluster.whole(_vhost(chaos))


async def kill_relay_node(chaos: Chaos) -> None:
    """SIGKILL the node the (first found) relay is connected to, restart it later."""
    cluster = _cluster(chaos)
    node = await cluster.holder_of(_vhost(chaos), "postroom-relay")
    await cluster.kill(node)
    chaos.note("cluster_kill_relay_node", node.node)
    try:
        await probe(chaos, "kill_relay_node")
    finally:
        await node.start()
    await cluster.whole(_vhost(chaos))


async def partition_node(chaos: Chaos) -> None:
    """Partition one node from the other two for a while; pause_minority pauses it."""
    cluster = _cluster(chaos)
    node = chaos.rng.choice(cluster.nodes)
    hold = chaos.rng.uniform(10.0, 20.0)
    await cluster.partition(node)
    chaos.note("cluster_partition", f"{node.node} for {hold:.0f}s")
    try:
        await probe(chaos, "partition")
        await asyncio.sleep(max(0.0, hold - 5))
    finally:
        await cluster.partition(node, heal=True)
    # pause_minority restarts the node's broker once it sees a majority again.
    await node.ctl("await_startup", "--timeout", "120", timeout=130)
    await amqp_ready(node.url, timeout=60)
    await cluster.whole(_vhost(chaos))


CLUSTER_FAULTS = [stop_queue_leader, kill_relay_node, partition_node]
