"""A private Redis Cluster (3 masters, 3 replicas) for tests that kill, pause and restart nodes.
Each node is a devtools RedisServer: started, cleaned up after and stopped as every one is."""

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.servers import RedisServer, free_port

log = logging.getLogger(__name__)

Node = tuple[str, int]  # (host, port), as CLUSTER NODES and redis-py's ClusterNode name one

HOST = "127.0.0.1"
SLOTS = 16384
NODE_TIMEOUT_MS = 2000  # failure detection: a failover takes about twice this
FORM_TIMEOUT = 60.0  # to form or heal the cluster on a busy 2-core machine
FAILOVER_TIMEOUT = 15.0
_PROBE = 2.0  # a live node answers a status query within this
_POLL = 0.05
_DOWN_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})


@dataclass(frozen=True)
class _Entry:
    """One line of CLUSTER NODES: a node as the answering node sees it."""

    node_id: str
    node: Node
    flags: frozenset[str]
    master_id: str
    slots: tuple[tuple[int, int], ...]  # inclusive ranges; slots in migration are left out

    @classmethod
    def parse(cls, line: str) -> Self:
        node_id, address, flags, master_id, *fields = line.split()
        host, _, port = address.split("@")[0].rpartition(":")
        ranges = [item.partition("-") for item in fields[4:] if not item.startswith("[")]
        slots = tuple((int(first), int(last or first)) for first, _, last in ranges)
        return cls(node_id, (host, int(port)), frozenset(flags.split(",")), master_id, slots)


class LocalCluster:
    """Redis Cluster of `masters` masters, each with one replica, in base_dir/node-<i>/."""

    def __init__(self, base_dir: Path, masters: int = 3) -> None:
        self.base_dir = Path(base_dir).absolute()
        self._masters = masters
        found: set[int] = set()
        while len(found) < 4 * masters:  # a bus port of its own: port + 10000 may pass 65535
            found.add(free_port())
        ports = list(found)
        self._bus_ports = {(HOST, p): b for p, b in zip(ports[::2], ports[1::2], strict=True)}
        self._servers: dict[Node, RedisServer] = {}
        for i, ((_, port), bus_port) in enumerate(self._bus_ports.items()):
            node_dir = self.base_dir / f"node-{i}"
            args = _node_args(bus_port, node_dir / "redis.pid")
            self._servers[(HOST, port)] = RedisServer(node_dir, port, args=args)
        self._paused: set[Node] = set()
        self._lost_slot: dict[Node, int | None] = {}  # a slot it served when it went down
        # No retries: a status query is repeated by the waiting loop, not by the client.
        probe: dict[str, Any] = {"socket_timeout": _PROBE, "socket_connect_timeout": _PROBE}
        probe |= {"decode_responses": True, "retry": Retry(NoBackoff(), 0)}
        self._clients = {node: redis.Redis(*node, **probe) for node in self._servers}

    @property
    def startup_nodes(self) -> list[str]:
        """Every node as "127.0.0.1:port", for a cluster client to discover the cluster from."""
        return [f"{host}:{port}" for host, port in self._servers]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = FORM_TIMEOUT) -> None:
        """Start every node, form the cluster and wait until it is ok; stop all if that fails."""
        began = time.monotonic()
        try:
            for server in self._servers.values():
                server.start()
            self._form(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("redis cluster %s ok in %.1f s", self.startup_nodes, time.monotonic() - began)

    def stop(self) -> None:
        """SIGTERM every node (SIGCONT first if paused; SIGKILL after the timeout) and wait."""
        with contextlib.ExitStack() as stops:  # stops every node even if one fails
            for node in self._servers:
                stops.callback(self._stop_node, node)
                stops.callback(self._clients[node].close)  # its connections; it can reconnect

    def masters(self) -> list[Node]:
        """The masters that serve slots now, as a live node sees them, by first slot."""
        serving = [entry for entry in self._view() if "master" in entry.flags and entry.slots]
        return [entry.node for entry in sorted(serving, key=lambda entry: entry.slots)]

    def replica_of(self, master: Node) -> Node:
        """A replica of master, as a live node sees it (LookupError if it has none)."""
        view = self._view()
        ids = {entry.node_id for entry in view if entry.node == master}
        for entry in view:
            if entry.master_id in ids and not entry.flags & _DOWN_FLAGS:
                return entry.node
        raise LookupError(f"no replica of {master} in the cluster")

    def kill(self, node: Node) -> None:
        """SIGKILL node's process, as a crash would, and wait until it is gone."""
        self._lost_slot[node] = self._first_slot(node)
        self._servers[node].kill()
        self._paused.discard(node)

    def pause(self, node: Node) -> None:
        """SIGSTOP node's process: it keeps its sockets but answers nothing."""
        self._lost_slot[node] = self._first_slot(node)
        self._servers[node].send_signal(signal.SIGSTOP)
        self._paused.add(node)

    def resume(self, node: Node) -> None:
        """SIGCONT node's process after `pause`."""
        self._server(node).send_signal(signal.SIGCONT)
        self._paused.discard(node)

    def restart(self, node: Node, timeout: float = FORM_TIMEOUT) -> None:
        """Start a killed node again on its port and files; wait until the cluster is ok."""
        self._stop_node(node)  # if it is not dead yet
        self._servers[node].start()  # its nodes.conf makes it rejoin, a replica if it lost slots
        self.wait_ok(timeout)

    def heal(self, timeout: float = FORM_TIMEOUT) -> None:
        """Resume paused nodes, restart killed ones and wait until the cluster is ok."""
        for node in list(self._paused):
            self.resume(node)
        for server in (server for server in self._servers.values() if not server.running()):
            server.start()
        self.wait_ok(timeout)

    def wait_failover(self, old_master: Node, timeout: float = FAILOVER_TIMEOUT) -> Node:
        """Wait until another node serves the slots that old_master served when it was killed
        or paused (else now) and the cluster is ok again; return that node."""
        slot = self._lost_slot.get(old_master)
        if slot is None and (slot := self._first_slot(old_master)) is None:
            raise ValueError(f"{old_master} served no slots")
        owners: set[Node] = set()

        def problem() -> str | None:
            nonlocal owners
            masters = [e for view in self._views().values() for e in view if "master" in e.flags]
            owners = {e.node for e in masters for a, b in e.slots if a <= slot <= b}
            if len(owners) != 1 or old_master in owners:
                return f"slot {slot} is served by {sorted(owners)}"
            return self._problem()

        _wait(problem, timeout, f"failover of {old_master}")
        return owners.pop()

    def wait_ok(self, timeout: float = FORM_TIMEOUT) -> None:
        """Wait until every live node (running, not paused) is ok, sees the same live masters serve
        all slots and no live node down, lists all live replicas in CLUSTER SLOTS, whose links
        to their masters are up."""
        _wait(self._problem, timeout, "cluster ok")

    def _form(self, timeout: float) -> None:
        nodes = list(self._servers)
        masters, replicas = nodes[: self._masters], nodes[self._masters :]
        ids: dict[Node, str] = {}
        for node in nodes:  # forget an earlier run's nodes.conf (never data) in a reused dir
            self._run(node, "CLUSTER", "RESET", "HARD")
            ids[node] = self._run(node, "CLUSTER", "MYID")
        for i, master in enumerate(masters):
            first, last = i * SLOTS // len(masters), (i + 1) * SLOTS // len(masters) - 1
            self._run(master, "CLUSTER", "ADDSLOTSRANGE", first, last)
            # Distinct epochs up front: no collision to resolve (redis-cli --cluster does so).
            self._run(master, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for node in nodes[1:]:
            self._run(nodes[0], "CLUSTER", "MEET", HOST, node[1], self._bus_ports[node])
        # A replica must know its master's id before CLUSTER REPLICATE: gossip spreads them.
        _wait(lambda: self._unknown(set(ids.values())), timeout, "nodes meeting")
        for replica, master in zip(replicas, masters, strict=True):
            self._run(replica, "CLUSTER", "REPLICATE", ids[master])
        self.wait_ok(timeout)

    def _unknown(self, ids: set[str]) -> str | None:
        for node, view in self._views().items():
            if missing := ids - {e.node_id for e in view if not e.flags & _DOWN_FLAGS}:
                return f"{node} does not know {sorted(missing)} yet"
        return None

    def _problem(self) -> str | None:
        """What keeps the cluster from being ok (see `wait_ok`), or None."""
        if not (views := self._views()):
            return "no node is live"
        shapes = []
        for node, view in views.items():
            if problem := self._node_problem(node, view, views):
                return problem
            serving = {r: e.node for e in view if "master" in e.flags for r in e.slots}
            if (served := sum(b - a + 1 for a, b in serving)) != SLOTS:
                return f"{node} sees {served} slots served"
            ids = {e.node_id: e.node for e in view}
            roles = {e.node: ids.get(e.master_id, e.master_id) for e in view if e.node in views}
            if idle := {n for n, of in roles.items() if of == "-"} - set(serving.values()):
                return f"{node} sees {sorted(idle)} as masters of no slots"  # REPLICATE news
            shapes.append((serving, roles))  # who serves what, whose replica each live node is
            if shapes[-1] != shapes[0]:
                return f"{node} sees another cluster than {next(iter(views))}"
        if down := set(shapes[0][0].values()) - set(views):
            return f"masters {sorted(down)} are down or paused"
        return None

    def _node_problem(self, node: Node, view: list[_Entry], live: Collection[Node]) -> str | None:
        if "cluster_state:ok" not in self._run(node, "CLUSTER", "INFO"):
            return f"{node} says cluster_state is not ok"
        if down := sorted(e.node for e in view if e.node in live and e.flags & _DOWN_FLAGS):
            return f"{node} sees live nodes {down} as failing or unknown"
        myself = next(entry for entry in view if "myself" in entry.flags)
        replication = self._clients[node].info("replication") if "slave" in myself.flags else {}
        if replication.get("master_link_status", "up") != "up":
            return f"replica {node} has no link to its master"
        replicas = {entry.node for entry in view if "slave" in entry.flags and entry.node in live}
        slots = self._run(node, "CLUSTER", "SLOTS")  # [first, last, master, *replicas] each
        listed = {(host, port) for _, _, _, *nodes in slots for host, port, *_ in nodes}
        if unlisted := replicas - listed:
            return f"{node} does not list replicas {sorted(unlisted)} in CLUSTER SLOTS yet"
        return None

    def _views(self) -> dict[Node, list[_Entry]]:
        return {node: self._view(node) for node in self._live()}

    def _view(self, node: Node | None = None) -> list[_Entry]:
        node = node or next(self._live(), None)
        if node is None:
            raise RuntimeError("no node of the cluster is running")
        text = self._run(node, "CLUSTER", "NODES")
        return [_Entry.parse(line) for line in text.splitlines() if line.strip()]

    def _live(self) -> Iterator[Node]:
        for node, server in self._servers.items():
            if server.running() and node not in self._paused:
                yield node

    def _first_slot(self, node: Node) -> int | None:
        self._server(node)  # ours, or ValueError
        view = self._view(node if node in set(self._live()) else None)
        slots = next((entry.slots for entry in view if entry.node == node), ())
        return slots[0][0] if slots else None

    def _server(self, node: Node) -> RedisServer:
        if node not in self._servers:
            raise ValueError(f"{node} is not a node of this cluster: left alone")
        return self._servers[node]

    def _run(self, node: Node, *args: str | int) -> Any:
        """One command on node, its answer unparsed (redis-py keys CLUSTER NODES by address)."""
        return self._clients[node].execute_command(*args)  # type: ignore[no-untyped-call]

    def _stop_node(self, node: Node) -> None:
        if node in self._paused and self._server(node).running():
            self.resume(node)  # a stopped process would not act on SIGTERM
        self._paused.discard(node)
        self._server(node).stop()


def _node_args(bus_port: int, pidfile: Path) -> list[str]:
    """redis-server options of a cluster node, beyond those of every private RedisServer."""
    args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    args += ["--cluster-port", str(bus_port), "--cluster-announce-ip", HOST]
    args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
    args += ["--cluster-require-full-coverage", "no", "--pidfile", str(pidfile)]
    # A replica (re)joining syncs at once, not after 5 s of diskless delay; CLUSTER SLOTS (where
    # clients find replicas) lists one once its offset passes 0, on an idle master after 1 ping.
    args += ["--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1"]
    return [*args, "--repl-diskless-load", "swapdb"]  # no dump.rdb: a node starts empty


def _wait(problem: Callable[[], str | None], timeout: float, what: str) -> None:
    """Poll problem() until it returns None; TimeoutError with its last answer after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (last := problem()) is None:
                return
        except (redis.RedisError, OSError) as exc:  # a node restarting or failing over
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s: {last}")
        time.sleep(_POLL)
