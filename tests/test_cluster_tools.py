"""devtools.cluster, seen through redis-py's cluster client: the cluster it forms, a master's
failover to its replica, the dead master's return as a replica, a lagging replica's promotion,
a stop that ends every node, a paused one too, and nothing else, and a new start on old files."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from devtools.cluster import FAILOVER_TIMEOUT, SLOTS, LocalCluster, Node

pytestmark = pytest.mark.cluster

REPLICATION = 5.0  # bound on an idle replica catching up with one write; not a goal
LAG = 1.0  # how long the replica is paused before its master dies


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> LocalCluster:
    """The module's cluster, whole and ok again whatever the test before broke."""
    local_cluster.heal()
    return local_cluster


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[RedisCluster]:
    """redis-py's sync cluster client, discovering the cluster from its startup nodes."""
    nodes = [ClusterNode(host, int(port)) for host, _, port in _split(cluster.startup_nodes)]
    client = RedisCluster(startup_nodes=nodes, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def _split(addresses: list[str]) -> Iterator[tuple[str, str, str]]:
    return (address.rpartition(":") for address in addresses)


def write(client: RedisCluster, name: str = "key", tag: str | None = None) -> tuple[str, str]:
    """A new key (in the slot of `{tag}` if given) set through the cluster client."""
    key, value = f"{{{tag or uuid.uuid4().hex}}}:{name}", uuid.uuid4().hex
    assert client.set(key, value)
    return key, value


def node_of(client: RedisCluster, key: str) -> Node:
    """The master that the cluster client sends key to."""
    node = client.get_node_from_key(key)
    return (node.host, int(node.port))


def wait_replicated(replica: Node, key: str, value: str) -> None:
    """Until replica holds key=value, read from the replica itself (READONLY)."""
    with redis.Redis(*replica, decode_responses=True, single_connection_client=True) as conn:
        conn.execute_command("READONLY")
        deadline = time.monotonic() + REPLICATION
        while conn.get(key) != value:
            assert time.monotonic() < deadline, f"{key} has not reached replica {replica}"
            time.sleep(0.05)  # nothing to wait on: replication is polled


def role(node: Node) -> dict[str, object]:
    with redis.Redis(*node, decode_responses=True) as conn:
        return dict(conn.info("replication"))


def test_slots_are_covered_by_three_masters_each_with_one_replica(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    masters = cluster.masters()
    assert len(masters) == 3
    replicas = {master: cluster.replica_of(master) for master in masters}
    everyone = {(host, int(port)) for host, _, port in _split(cluster.startup_nodes)}
    assert set(masters) | set(replicas.values()) == everyone
    for node in client.get_nodes():  # every node tells clients the same
        slots = client.cluster_slots(target_nodes=node)
        assert sorted(slots) == [(i * SLOTS // 3, (i + 1) * SLOTS // 3 - 1) for i in range(3)]
        for shard in slots.values():
            primary = tuple(shard["primary"])
            assert primary in masters
            assert [tuple(replica) for replica in shard["replicas"]] == [replicas[primary]]


def test_a_key_written_through_the_cluster_client_is_readable(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    key, value = write(client)
    assert client.get(key) == value
    master = node_of(client, key)
    with redis.Redis(*master, decode_responses=True) as conn:
        assert conn.get(key) == value
    wait_replicated(cluster.replica_of(master), key, value)


def test_a_killed_master_fails_over_to_its_replica(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    key, value = write(client)
    master = node_of(client, key)
    replica = cluster.replica_of(master)
    wait_replicated(replica, key, value)  # else the failover may lose it, as Redis allows

    cluster.kill(master)
    began = time.monotonic()
    promoted = cluster.wait_failover(master, FAILOVER_TIMEOUT)
    assert time.monotonic() - began < FAILOVER_TIMEOUT

    assert promoted == replica
    assert replica in cluster.masters()
    assert master not in cluster.masters()
    assert client.get(key) == value  # the client finds the new owner of the slot by itself
    assert node_of(client, key) == replica
    with redis.Redis(*replica, decode_responses=True) as conn:
        assert conn.get(key) == value  # served, not redirected: the former replica owns it


def test_a_restarted_master_rejoins_as_a_replica_of_the_promoted_node(
    cluster: LocalCluster,
) -> None:
    master = cluster.masters()[0]
    cluster.kill(master)
    promoted = cluster.wait_failover(master)

    cluster.restart(master)

    assert master not in cluster.masters()
    assert cluster.replica_of(promoted) == master
    info = role(master)
    assert info["role"] == "slave"
    assert (info["master_port"], info["master_link_status"]) == (promoted[1], "up")


def test_a_lagging_replica_is_promoted_with_what_it_had(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    tag = uuid.uuid4().hex  # both keys in one slot, on one master
    key, value = write(client, "before", tag)
    master = node_of(client, key)
    replica = cluster.replica_of(master)
    wait_replicated(replica, key, value)

    cluster.pause(replica)
    during, written = write(client, "during", tag)  # acknowledged by the master alone
    time.sleep(LAG)
    cluster.kill(master)
    cluster.resume(replica)

    assert cluster.wait_failover(master) == replica
    cluster.wait_ok()
    assert client.get(key) == value
    assert client.get(during) in {None, written}  # lost or not: replication is asynchronous


def test_nodes_it_did_not_start_are_left_alone(cluster: LocalCluster) -> None:
    shared: Node = ("127.0.0.1", 6379)
    for action in (cluster.kill, cluster.pause, cluster.resume, cluster.restart):
        with pytest.raises(ValueError, match="not a node of this cluster"):
            action(shared)
    cluster.wait_ok(timeout=0)


def test_stop_ends_every_node_even_a_paused_one(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    with cluster:
        master = cluster.masters()[0]
        cluster.pause(master)
        cluster.pause(cluster.replica_of(master))
        began = time.monotonic()
    assert time.monotonic() - began < 10  # not the SIGKILL after SIGTERM's timeout
    # redis-server removes its pid file on a clean exit: SIGTERM, not SIGKILL, ended each.
    assert sorted(tmp_path.glob("node-*/redis.pid")) == []
    for host, _, port in _split(cluster.startup_nodes):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=1).close()


def test_a_new_cluster_starts_over_the_files_of_a_stopped_one(tmp_path: Path) -> None:
    with LocalCluster(tmp_path) as first:
        old = set(first.startup_nodes)
    assert sorted(tmp_path.glob("node-*/nodes.conf"))  # naming old ports and node ids
    with LocalCluster(tmp_path) as second:
        assert not old & set(second.startup_nodes)
        assert len(second.masters()) == 3
        assert {second.replica_of(master) for master in second.masters()}.isdisjoint(old)
