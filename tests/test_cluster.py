"""postroom on a three-node RabbitMQ cluster: nodes stopped, killed and partitioned.

The relay and workers are given every node's address (``POSTROOM_AMQP_URL`` lists them)
and fail over between them; the consumers' quorum queues have a member on every node.
The cluster starts once for the module (three Erlang VMs on a 2-core machine) and is
torn down after it. ``pytest -s`` prints the history table, the figures and the time each
fault took to recover from (until a message committed after it was applied by the
unordered consumer; the ordered consumer's time, which adds its queue's backlog, is
printed beside it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import pytest
from pydantic import SecretStr

from postroom import rabbit
from postroom.settings import Settings
from tests.faults import servers
from tests.faults.cluster import CLUSTER_FAULTS, RabbitCluster
from tests.faults.scenario import Stage, private_database, run_scenario


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[tuple[RabbitCluster, servers.PrivatePostgres]]:
    """The cluster, and a private PostgreSQL (the fleet's connections stay off the shared one)."""
    nodes = RabbitCluster()
    postgres = servers.PrivatePostgres()
    try:
        await asyncio.gather(nodes.start(), postgres.init())
        yield nodes, postgres
    finally:
        await asyncio.gather(nodes.destroy(), postgres.destroy())


@pytest.fixture
async def on_cluster(
    settings: Settings, names: str, cluster: tuple[RabbitCluster, servers.PrivatePostgres]
) -> Stage:
    """A fresh database and a fresh vhost on the cluster, known by every node's URL."""
    nodes, postgres = cluster
    urls = await nodes.add_vhost(f"postroom-test-{names}")
    dsn, database_url = await private_database(postgres, f"cluster_{names}", settings)
    return Stage(
        procs=settings.model_copy(
            update={"amqp_url": SecretStr(urls), "database_url": SecretStr(database_url)}
        ),
        writer_url=database_url,
        dsn=dsn,
        amqp_url=urls,
        extra={"cluster": nodes, "leader_of": "faults.apply"},
    )


async def test_connect_fails_over_past_a_dead_address(amqp_url):
    dead = f"amqp://guest:guest@127.0.0.1:{servers.free_port()}/"
    for _ in range(6):  # the order is random: both orders come up
        connection = await rabbit.connect(f"{dead},{amqp_url}", name="postroom-test", timeout=5)
        assert isinstance(connection, aio_pika.abc.AbstractConnection)
        await connection.close()
    with pytest.raises(OSError):
        await rabbit.connect(f"{dead},{dead}", name="postroom-test", timeout=5)


@pytest.mark.timeout(900)  # the liveness bound is asserted inside, tighter
async def test_cluster_loses_nodes_without_losing_messages(on_cluster, tmp_path, seed):
    """Stop the queue leader's node, SIGKILL the relay's node, partition a node."""
    figures = await run_scenario(
        "cluster",
        on_cluster,
        tmp_path,
        seed=seed,
        messages=2_000,
        duration=60,
        faults=CLUSTER_FAULTS,
        gap=(2.0, 5.0),
        min_faults=len(CLUSTER_FAULTS),
        drain_timeout=180,
    )
    recovery = on_cluster.extra.get("recovery", {})
    print(f"recovery seconds by fault (unordered consumer): {recovery}")
    print(f"ordered consumer, backlog included: {on_cluster.extra.get('ordered_lag', {})}")
    assert figures.effective.keys() == {f.__name__ for f in CLUSTER_FAULTS}, figures.effective
    assert set(recovery) == {"stop_queue_leader", "kill_relay_node", "partition"}
