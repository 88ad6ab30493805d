"""Operations: metrics, request ids, structured logs."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskd.config import Settings
from tests.conftest import PASSWORD, User
from tests.live import WAIT, raw_request
from tests.replicas import Replica

Client = TestClient[web.Request, web.Application]


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in metric for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


async def test_metrics_count_requests_streams_and_the_relay(alice: User) -> None:
    await alice.create_task("x")
    await alice.call("GET", "/api/tasks/999/")
    async with alice.sse() as stream:
        await alice.create_task("y")
        await stream.take(1)  # by now the relay has published and the hub delivered
        async with alice.client.get("/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    route = "/api/tasks/"
    assert sample(text, "taskd_http_requests_total", method="POST", route=route, status="201") == 2
    assert (
        sample(
            text, "taskd_http_requests_total", method="GET", route="/api/tasks/{id}/", status="404"
        )
        == 1
    )
    assert (
        sample(text, "taskd_http_request_duration_seconds_count", method="POST", route=route) == 2
    )
    assert sample(text, "taskd_live_connections", kind="sse") == 1
    assert sample(text, "taskd_relay_leader") == 1
    assert sample(text, "taskd_relay_events_published") >= 1
    assert sample(text, "taskd_hub_events_delivered") >= 1
    assert sample(text, "taskd_hub_redis_connected") == 1
    # The event was published; its outbox row may be a moment away from its delete.
    assert sample(text, "taskd_outbox_backlog") in (0, 1)
    assert sample(text, "taskd_outbox_oldest_age_seconds") < 60
    assert sample(text, "taskd_redis_connections") >= 1


async def test_request_id_is_kept_or_made(client: Client) -> None:
    async with client.get("/healthz", headers={"X-Request-ID": "abc-123"}) as resp:
        assert resp.headers["X-Request-ID"] == "abc-123"
    async with client.get("/healthz") as resp:
        made = resp.headers["X-Request-ID"]
    async with client.get("/healthz", headers={"X-Request-ID": "bad id\twith junk"}) as resp:
        replaced = resp.headers["X-Request-ID"]
    assert len(made) == 32
    assert replaced != "bad id\twith junk"
    async with client.get("/nowhere", headers={"X-Request-ID": "on-errors-too"}) as resp:
        assert resp.status == 404
        assert resp.headers["X-Request-ID"] == "on-errors-too"


async def test_stream_responses_carry_the_request_id(alice: User) -> None:
    headers = {"Authorization": f"Bearer {alice.access}", "X-Request-ID": "stream-1"}
    async with alice.client.get("/api/stream/", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-ID"] == "stream-1"


async def test_json_logs_carry_request_ids_and_no_secrets(
    settings: Settings, replicas: list[Replica]
) -> None:
    replica = Replica(settings, TASKD_LOG_FORMAT="json")
    replicas.append(replica)
    await replica.start()
    body = {"username": "jsonlogger", "password": PASSWORD}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{replica.url}/api/register/", json=body, headers={"X-Request-ID": "reg-42"}
        ) as resp:
            assert resp.status == 201
        async with http.post(f"{replica.url}/api/login/", json=body) as resp:
            tokens = await resp.json()
    await replica.wait_for('"reg-42"', limit=WAIT)
    await replica.wait_for("/api/login/", limit=WAIT)
    entries = [json.loads(line) for line in replica.output if line.startswith("{")]
    access = [e for e in entries if e.get("path") == "/api/register/"]
    assert access[0]["request_id"] == "reg-42"
    assert access[0]["status"] == 201
    log = "".join(replica.output)
    assert PASSWORD not in log
    assert tokens["access"] not in log
    assert tokens["refresh"] not in log


async def test_metric_labels_stay_bounded_whatever_the_client_sends(client: Client) -> None:
    for i, method in enumerate(("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "COPY")):
        async with client.request(method, f"/nowhere/{i}") as resp:
            assert resp.status == 404
    async with client.get("/metrics") as resp:
        text = await resp.text()
    assert "PROPFIND" not in text
    assert "/nowhere" not in text
    assert sample(text, "taskd_http_requests_total", method="other", route="unmatched") == 5


@pytest.mark.parametrize(
    ("request_bytes", "body"),
    [
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBroken header line\r\n\r\n",
            {"non_field_errors": ["Malformed HTTP request."]},
        ),
        (
            b"INVENTED /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            {"non_field_errors": ["Malformed HTTP request."]},
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
            {"non_field_errors": ["Malformed HTTP request."]},
        ),
    ],
    ids=["malformed-header", "unknown-method", "header-too-large"],
)
async def test_http_parser_errors_are_json_too(
    settings: Settings, replicas: list[Replica], request_bytes: bytes, body: object
) -> None:
    replica = Replica(settings)
    replicas.append(replica)
    await replica.start()
    status, headers, raw = await raw_request(replica.port, request_bytes)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(raw) == body
