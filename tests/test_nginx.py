"""The shipped nginx configuration (deploy/nginx.conf) in front of three real replicas.

A real nginx (the machine's; scripts/ensure-nginx.sh installs it) runs the file as the tests
render it (tests/nginx.py), in front of three `taskd serve` processes on the test's database
and Redis namespace. Every request of these tests goes through nginx."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from taskd.config import Settings
from tests.conftest import PASSWORD
from tests.live import WAIT, SseEvent, SseStream, raw_request
from tests.nginx import Nginx, nginx_binary
from tests.replicas import RECOVERY, Replica

pytestmark = pytest.mark.skipif(
    nginx_binary() is None, reason="no nginx: run scripts/ensure-nginx.sh (make test does)"
)

MAX_WRITES = 2000  # bound on a background writer; it is stopped long before
PROXY_ERRORS = {502: "bad_gateway", 503: "unavailable", 504: "gateway_timeout"}


@dataclass
class Cluster:
    nginx: Nginx
    replicas: list[Replica]

    def serving(self, response: aiohttp.ClientResponse) -> Replica:
        """The replica that answered (the last one nginx tried)."""
        address = response.headers["X-Upstream-Addr"].split(",")[-1].strip()
        port = int(address.rsplit(":", 1)[1])
        (replica,) = [r for r in self.replicas if r.port == port]
        return replica


@pytest.fixture
async def cluster(
    settings: Settings, replicas: list[Replica], tmp_path: Path
) -> AsyncIterator[Cluster]:
    started = [
        Replica(
            settings,
            # nginx connects from 127.0.0.1: its X-Forwarded-* headers are believed.
            TASKD_HTTP_TRUSTED_PROXIES="127.0.0.1/32",
            TASKD_HTTP_DRAIN_SECONDS="0.5",
            TASKD_HTTP_SHUTDOWN_GRACE="5",
        )
        for _ in range(3)
    ]
    replicas.extend(started)
    await asyncio.gather(*(replica.start() for replica in started))
    nginx = Nginx(tmp_path / "nginx", [f"127.0.0.1:{r.port}" for r in started])
    await nginx.start()
    try:
        yield Cluster(nginx, started)
    finally:
        await nginx.stop()


@dataclass
class ProxyUser:
    """A registered, logged-in user who talks to the service through nginx only."""

    http: aiohttp.ClientSession
    url: str
    username: str
    access: str = ""

    @classmethod
    async def create(cls, http: aiohttp.ClientSession, url: str, username: str) -> ProxyUser:
        user = cls(http, url, username)
        body = {"username": username, "password": PASSWORD}
        async with http.post(f"{url}/api/register/", json=body) as resp:
            assert resp.status == 201, await resp.text()
        async with http.post(f"{url}/api/login/", json=body) as resp:
            assert resp.status == 200, await resp.text()
            user.access = (await resp.json())["access"]
        return user

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}

    async def call(
        self, method: str, path: str, json_body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, Any]:
        kwargs: dict[str, Any] = {"headers": {**self.auth, **(headers or {})}}
        if json_body is not None:
            kwargs["json"] = json_body
        async with self.http.request(method, f"{self.url}{path}", **kwargs) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None, resp.headers

    @contextlib.asynccontextmanager
    async def sse(
        self, last_event_id: str | None = None
    ) -> AsyncIterator[tuple[SseStream, aiohttp.ClientResponse]]:
        headers = dict(self.auth)
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        async with self.http.get(f"{self.url}/api/stream/", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            yield SseStream(resp), resp

    async def position(self) -> str:
        status, _, headers = await self.call("GET", "/api/tasks/?limit=1")
        assert status == 200
        return str(headers["X-Stream-Position"])


@dataclass
class Writer:
    """Creates tasks through nginx, one after another, until stopped. A create that nginx
    answers with 502/503 (its replica died under it) is counted and the next one is sent."""

    user: ProxyUser
    created: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        for i in range(MAX_WRITES):
            if self._stop.is_set():
                return
            status, body, _ = await self.user.call("POST", "/api/tasks/", {"title": f"w{i}"})
            if status == 201:
                self.created.append(body["id"])
            else:
                # nginx's own error, as JSON: it does not resend a POST that reached a replica.
                assert status in PROXY_ERRORS, (status, body)
                assert body["code"] == PROXY_ERRORS[status], body
                self.failed.append(status)
            async with self._progress:
                self._progress.notify_all()

    async def wait_for(self, count: int) -> None:
        """Until `count` creates have succeeded in all."""
        async with asyncio.timeout(RECOVERY), self._progress:
            await self._progress.wait_for(lambda: len(self.created) >= count)

    async def stop(self) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


def assert_dense_and_complete(events: list[SseEvent], writer: Writer, last: str) -> None:
    """Ids 1..last with no gap and no duplicate; every successful create exactly once; any
    other event is a create whose answer was lost with its replica."""
    assert [e.seq for e in events] == list(range(1, int(last.split("-")[0]) + 1))
    assert all(e.event == "task.created" for e in events)
    announced = [e.json["task"]["id"] for e in events]
    assert len(set(announced)) == len(announced)
    assert set(writer.created) <= set(announced)
    assert len(announced) - len(writer.created) <= len(writer.failed)


async def read_until(stream: SseStream, last: str) -> list[SseEvent]:
    """Events up to and including the one with id `last`."""
    events: list[SseEvent] = []
    while not events or events[-1].id != last:
        (event,) = await stream.take(1)
        events.append(event)
    return events


async def test_api_sse_and_websocket_through_nginx(cluster: Cluster) -> None:
    nginx = cluster.nginx
    async with aiohttp.ClientSession() as http:
        user = await ProxyUser.create(http, nginx.url, "proxied")
        status, me, _ = await user.call("GET", "/api/me/", headers={"X-Request-ID": "req-abc.1"})
        assert status == 200
        assert me["username"] == "proxied"

        status, task, headers = await user.call("POST", "/api/tasks/", {"title": "via nginx"})
        assert status == 201
        # The service builds absolute URLs from nginx's X-Forwarded-Proto/-Host.
        assert headers["Location"] == f"{nginx.url}/api/tasks/{task['id']}/"

        # SSE: an event arrives while the stream stays open (nginx does not buffer it).
        async with user.sse() as (stream, resp):
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            await user.call("PATCH", f"/api/tasks/{task['id']}/", {"done": True})
            (event,) = await stream.take(1)
            assert event.event == "task.updated"
            assert event.json["task"]["done"] is True
            assert not stream.response.content.at_eof()

        # WebSocket: the upgrade goes through; the Origin the browser would send (nginx's
        # host:port, which the replica only knows from X-Forwarded-Host) is accepted.
        async with http.ws_connect(
            f"{nginx.url}/api/ws/", headers={**user.auth, "Origin": nginx.url}
        ) as ws:
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json(timeout=WAIT)) == {"type": "pong"}
            status, _, _ = await user.call("DELETE", f"/api/tasks/{task['id']}/")
            assert status == 204
            frame = await ws.receive_json(timeout=WAIT)
            assert frame["type"] == "task.deleted"
            assert frame["id"] == "3-0"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                f"{nginx.url}/api/ws/", headers={**user.auth, "Origin": "http://evil.example"}
            )
        assert refused.value.status == 403

    # The client's X-Request-ID is the one nginx logs (and sends upstream).
    assert any(entry["request_id"] == "req-abc.1" for entry in access_entries(nginx))


async def test_nginx_answers_its_own_errors_in_json(cluster: Cluster) -> None:
    nginx = cluster.nginx
    async with aiohttp.ClientSession() as http:
        user = await ProxyUser.create(http, nginx.url, "errors")
        async with http.post(
            f"{nginx.url}/api/tasks/",
            data=io.BytesIO(b"{" + b" " * (1024 * 1024) + b"}"),  # 1 MiB + 2 bytes
            headers={**user.auth, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 413
            assert resp.headers["Content-Type"] == "application/json"
            body = await resp.json()
            assert body["code"] == "too_large"
            assert body["detail"]
            assert resp.headers["X-Request-ID"]

        for replica in cluster.replicas:
            await replica.stop()
        for method, body_sent in (("GET", None), ("POST", {"title": "x"})):
            async with http.request(
                method, f"{nginx.url}/api/tasks/", json=body_sent, headers=user.auth
            ) as resp:
                assert resp.status in (502, 503), await resp.text()
                assert resp.headers["Content-Type"] == "application/json"
                body = await resp.json()
                assert body["code"] == PROXY_ERRORS[resp.status]
                assert body["detail"]
                if resp.status == 503:
                    assert int(resp.headers["Retry-After"]) >= 1
        async with http.get(f"{nginx.url}/api/stream/", headers=user.auth) as resp:
            assert resp.status in (502, 503)
            assert (await resp.json())["code"] == PROXY_ERRORS[resp.status]


async def failover(cluster: Cluster, sig: signal.Signals) -> None:
    """Stop the replica that serves an SSE client with `sig` while a writer keeps creating
    tasks through nginx; the client resumes through nginx with its Last-Event-ID."""
    async with aiohttp.ClientSession() as http:
        user = await ProxyUser.create(http, cluster.nginx.url, f"resumer-{sig.name.lower()}")
        writer = Writer(user)
        events: list[SseEvent] = []
        async with user.sse() as (stream, resp):
            serving = cluster.serving(resp)
            writer.start()
            events += await stream.take(3)
            serving.signal(sig)
            # The stream ends (cut, or ended by a graceful shutdown) and nothing after it is lost.
            events += await stream.ends(wait=RECOVERY)
        assert events
        written_before = len(writer.created)

        async with user.sse(last_event_id=events[-1].id) as (stream, resp):
            assert cluster.serving(resp) is not serving
            # Writes go on, through nginx, to the replicas that are left.
            await writer.wait_for(written_before + 20)
            await writer.stop()
            last = await user.position()
            if events[-1].id != last:
                events += await read_until(stream, last)

    assert_dense_and_complete(events, writer, last)
    if sig == signal.SIGTERM:
        # A graceful shutdown finishes what it accepted: a create that failed changed nothing.
        assert sorted(e.json["task"]["id"] for e in events) == sorted(writer.created)
        assert serving.proc is not None
        async with asyncio.timeout(RECOVERY):
            assert await serving.proc.wait() == 0


async def test_sigkill_of_the_serving_replica_loses_nothing(cluster: Cluster) -> None:
    await failover(cluster, signal.SIGKILL)


async def test_sigterm_of_the_serving_replica_hands_over_gracefully(cluster: Cluster) -> None:
    await failover(cluster, signal.SIGTERM)


def access_entries(nginx: Nginx) -> list[dict[str, Any]]:
    """nginx's access log: one JSON object per line."""
    return [json.loads(line) for line in nginx.access_log_text().splitlines() if line]


async def test_access_log_never_holds_the_query_token(cluster: Cluster) -> None:
    nginx = cluster.nginx
    async with aiohttp.ClientSession() as http:
        user = await ProxyUser.create(http, nginx.url, "tokenlog")
        url = f"{nginx.url}/api/stream/?token={user.access}&last_event_id=0-0"
        async with http.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
        async with http.get(f"{nginx.url}/api/stream/?x=1&token=forged.token.x") as resp:
            assert resp.status == 401
        async with http.get(f"{nginx.url}/api/ws/?token={user.access}") as resp:
            assert resp.status in (400, 426)  # not an upgrade: refused, but logged

    # nginx writes a request's line when the request ends: wait for the three.
    async with asyncio.timeout(WAIT):
        while len(streamed := [e for e in access_entries(nginx) if "token" in e["query"]]) < 3:  # noqa: ASYNC110 - a log file: nothing to await
            await asyncio.sleep(0.05)
    queries = sorted(e["query"] for e in streamed)
    assert queries == sorted(
        [
            "token=[redacted]&last_event_id=0-0",
            "x=1&token=[redacted]",
            "token=[redacted]",
        ]
    )
    logs = nginx.access_log_text() + nginx.error_log.read_text()
    for secret in (user.access, user.access.split(".")[2], "forged.token.x"):
        assert secret not in logs


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /api/tasks/ HTTP/1.1\r\nHost: x\r\nBroken header line\r\n\r\n", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    ],
    ids=["malformed", "uri-too-long", "headers-too-large"],
)
async def test_nginx_answers_malformed_requests_in_json(
    cluster: Cluster, request_bytes: bytes, status: int
) -> None:
    got, headers, body = await raw_request(cluster.nginx.port, request_bytes)
    assert got == status
    assert headers["Content-Type"] == "application/json"
    assert isinstance(json.loads(body), dict)


NOT_FOUND = {"detail": "Not found.", "code": "not_found"}


async def test_metrics_are_not_served_through_nginx(cluster: Cluster) -> None:
    nginx = cluster.nginx
    async with aiohttp.ClientSession() as http:
        for path in ("/metrics", "/metrics?format=text", "/metrics/"):
            async with http.get(f"{nginx.url}{path}") as resp:
                assert resp.status == 404, path
                assert resp.headers["Content-Type"] == "application/json"
                assert resp.headers["X-Request-ID"]
                assert await resp.json() == NOT_FOUND
        # Spellings that nginx normalises to /metrics but would pass upstream as sent.
        for target in (b"//metrics", b"/%6Detrics", b"/./metrics", b"/api/../metrics"):
            status, headers, body = await raw_request(
                nginx.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert status == 404, target
            assert headers["Content-Type"] == "application/json"
            assert json.loads(body) == NOT_FOUND
        # Everything else is still proxied; the replicas still serve /metrics to a scraper.
        async with http.get(f"{nginx.url}/healthz") as resp:
            assert resp.status == 200
            assert cluster.serving(resp) in cluster.replicas
        for replica in cluster.replicas:
            async with http.get(f"{replica.url}/metrics") as resp:
                assert resp.status == 200
                assert "taskd_http_requests_total" in await resp.text()

    # nginx answered every one of them itself: no replica was asked.
    async with asyncio.timeout(WAIT):
        while len(entries := [e for e in access_entries(nginx) if "etrics" in e["path"]]) < 7:  # noqa: ASYNC110 - a log file: nothing to await
            await asyncio.sleep(0.05)
    assert all(e["status"] == 404 and e["upstream"] == "" for e in entries), entries
