"""The OpenAPI document: valid 3.1, in step with the router, and true of the running service."""

from __future__ import annotations

import asyncio

import hypothesis
import hypothesis.errors
import requests
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from openapi_spec_validator import validate
from schemathesis import GenerationMode

from taskd.app import create_app
from taskd.auth import PUBLIC
from taskd.config import Settings
from taskd.openapi import build_document
from tests.conftest import User

# Streams never end, /metrics and the web page are not JSON: the fuzz covers the REST routes.
NOT_FUZZED = r"^/(api/stream/|api/ws/|metrics$|$)"
# Ends every login of its caller: fuzzed last, with a token of its own, so that the other
# operations are not all answered 401.
ENDS_LOGINS = r"^/api/logout/all/$"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
)
EXAMPLES_PER_OPERATION = 25
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def test_document_is_valid_openapi_3_1() -> None:
    document = build_document()
    validate(document)
    assert document["openapi"] == "3.1.0"


def test_every_route_is_documented_with_its_security(base_settings: Settings) -> None:
    paths = build_document()["paths"]
    routes = [r for r in create_app(base_settings).router.routes() if r.method != "HEAD"]
    assert routes
    for route in routes:
        path, method = route.resource.canonical if route.resource else "", route.method.lower()
        assert method in paths.get(path, {}), f"{route.method} {path} is not in the document"
        public = getattr(route.handler, PUBLIC, False)
        assert (paths[path][method]["security"] == []) == public, f"{route.method} {path}"


async def test_document_is_served_without_a_token(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/api/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == build_document()


def _fuzz_operation(
    operation: schemathesis.APIOperation, mode: GenerationMode, base_url: str, token: str
) -> str | None:
    """Run one operation's generated cases through the checks; the failure, if any."""
    strategy = operation.as_strategy(
        generation_mode=mode, headers={"Authorization": f"Bearer {token}"}
    )
    checks = [getattr(schemathesis.checks, name) for name in CHECKS]
    with requests.Session() as session:

        @hypothesis.given(strategy)
        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],  # no shrinking
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base_url, session=session, checks=checks)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            return None  # nothing to negate: no parameters, no body
        except Exception as exc:  # the first failing case, with a curl line to reproduce it
            return f"{operation.label} [{mode.value}]: {exc}"
    return None


def _fuzz(base_url: str, token: str, last_token: str) -> list[str]:
    """Every REST operation of the served document, valid and invalid input; the failures.
    The one that ends its caller's logins comes last, with `last_token`."""
    schema = schemathesis.openapi.from_url(f"{base_url}/api/openapi.json", timeout=10)
    rest = schema.exclude(path_regex=NOT_FUZZED).exclude(path_regex=ENDS_LOGINS)
    last = schema.include(path_regex=ENDS_LOGINS)
    failures = []
    for operations, bearer in ((rest, token), (last, last_token)):
        for result in operations.get_all_operations():
            operation = result.ok()
            for mode in MODES:
                if failure := _fuzz_operation(operation, mode, base_url, bearer):
                    failures.append(failure)
    return failures


async def test_service_conforms_to_its_document(
    client: TestClient[web.Request, web.Application], alice: User, bob: User
) -> None:
    for n in range(3):  # ids the fuzz can hit, so the 200 paths are exercised too
        await alice.create_task(f"seed {n}")
    base_url = str(client.make_url("")).rstrip("/")
    # schemathesis calls with `requests`: off the loop that runs the server.
    fuzz = asyncio.to_thread(_fuzz, base_url, alice.access, bob.access)
    failures = await asyncio.wait_for(fuzz, 90)
    assert not failures, "\n\n".join(failures)
    # The fuzz ran with a live login: it did not end itself on the way.
    status, _, _ = await alice.call("GET", "/api/me/")
    assert status == 200
