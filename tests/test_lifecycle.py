"""Graceful shutdown of a real `taskd serve` process, and `--workers`."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from taskd.app import create_app
from taskd.config import Settings
from tests.conftest import PASSWORD, ClientFactory, register_and_login
from tests.live import WAIT, SseStream
from tests.replicas import RECOVERY, Replica


async def test_sigterm_drains_then_ends_streams_and_exits_zero(
    aiohttp_client: ClientFactory, settings: Settings, replicas: list[Replica]
) -> None:
    replica = Replica(settings, TASKD_HTTP_DRAIN_SECONDS="1", TASKD_HTTP_SHUTDOWN_GRACE="5")
    replicas.append(replica)
    await replica.start()
    other = await aiohttp_client(create_app(settings))  # the replica clients move to
    user = await register_and_login(other, "mover")
    auth = {"Authorization": f"Bearer {user.access}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{replica.url}/api/stream/", headers=auth) as resp,
    ):
        stream = SseStream(resp)
        await user.create_task("before")
        (first,) = await stream.take(1)

        replica.signal(signal.SIGTERM)
        # While draining it still serves, but tells the load balancer to go away.
        async with asyncio.timeout(WAIT):
            while True:
                async with http.get(f"{replica.url}/readyz") as ready:
                    if ready.status == 503:
                        assert (await ready.json())["status"] == "draining"
                        break
        async with http.get(f"{replica.url}/healthz") as health:
            assert health.status == 200
        await user.create_task("during the drain")
        rest = await stream.ends()
    # The stream delivered what it could, then ended with a short retry hint.
    assert [e.json["task"]["title"] for e in rest] == ["during the drain"]
    assert stream.retry == 250
    assert replica.proc is not None
    assert await asyncio.wait_for(replica.proc.wait(), RECOVERY) == 0
    # The client resumes on another replica from its last id: no gap, no duplicate.
    await user.create_task("after")
    async with user.sse(last_event_id=rest[-1].id) as resumed:
        (after,) = await resumed.take(1)
    assert (first.id, rest[-1].id, after.id) == ("1-0", "2-0", "3-0")


async def test_workers_share_one_port(settings: Settings, replicas: list[Replica]) -> None:
    replica = Replica(settings, TASKD_HTTP_DRAIN_SECONDS="0")
    replica.args = ["--workers", "2"]
    replicas.append(replica)
    await replica.start()
    await replica.wait_for("taskd is serving at", count=2)
    async with aiohttp.ClientSession() as http:
        body = {"username": "worker", "password": PASSWORD}
        async with http.post(f"{replica.url}/api/register/", json=body) as resp:
            assert resp.status == 201
        for _ in range(10):
            async with http.post(f"{replica.url}/api/login/", json=body) as resp:
                assert resp.status == 200
    replica.signal(signal.SIGTERM)
    assert replica.proc is not None
    assert await asyncio.wait_for(replica.proc.wait(), RECOVERY) == 0


async def test_workers_stop_when_their_supervisor_is_killed(
    settings: Settings, replicas: list[Replica]
) -> None:
    """A SIGKILLed supervisor cannot forward a signal: its workers get SIGTERM from the
    kernel (PR_SET_PDEATHSIG) and stop, rather than serve on, unsupervised."""
    replica = Replica(settings, TASKD_HTTP_DRAIN_SECONDS="0")
    replica.args = ["--workers", "2"]
    replicas.append(replica)
    await replica.start()
    await replica.wait_for("taskd is serving at", count=2)
    replica.signal(signal.SIGKILL)
    # The workers share the supervisor's output: it ends once both have exited.
    await replica.wait_for("taskd stopped", count=2)
    await replica.stop()


async def test_a_connection_without_a_request_is_closed(
    settings: Settings, replicas: list[Replica]
) -> None:
    """Idle sockets and headers sent a byte at a time cannot hold a replica's descriptors."""
    replica = Replica(settings, TASKD_HTTP_KEEPALIVE_TIMEOUT="1")
    replicas.append(replica)
    await replica.start()
    idle = await asyncio.open_connection("127.0.0.1", replica.port)
    dribble = await asyncio.open_connection("127.0.0.1", replica.port)
    dribble[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    await dribble[1].drain()
    for reader, writer in (idle, dribble):
        async with asyncio.timeout(RECOVERY):
            assert await reader.read() == b""  # the server closed it
        writer.close()
