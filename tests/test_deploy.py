"""The deployment files: docker-compose.yml, the Dockerfile and deploy/nginx.conf.

No Docker daemon is needed: the files are parsed and checked for what they promise, and the
nginx configuration is checked (`nginx -t`) by the machine's nginx, as the tests render it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.nginx import CONFIG, MARKER, Nginx, nginx_binary, render

PROJECT = Path(__file__).resolve().parent.parent
COMPOSE = PROJECT / "docker-compose.yml"
DOCKERFILE = PROJECT / "Dockerfile"

needs_nginx = pytest.mark.skipif(
    nginx_binary() is None, reason="no nginx: run scripts/ensure-nginx.sh (make test does)"
)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert {"postgres", "redis", "migrate", "taskd", "nginx"} <= set(services)


@pytest.mark.parametrize("name", ["postgres", "redis", "taskd"])
def test_compose_healthchecks(services: dict[str, dict[str, Any]], name: str) -> None:
    check = services[name].get("healthcheck")
    assert check, f"{name} has no healthcheck"
    assert check.get("test"), f"{name}'s healthcheck runs nothing"
    assert not check.get("disable", False)


def test_compose_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "image" in service and "build" not in service:
            image = service["image"]
            assert ":" in image, f"{name}: {image} has no tag"
            assert not image.endswith(":latest"), f"{name}: {image}"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert "pg_isready" in str(services["postgres"]["healthcheck"]["test"])
    assert "ping" in str(services["redis"]["healthcheck"]["test"])


def test_redis_fsyncs_every_write(services: dict[str, dict[str, Any]]) -> None:
    words = command_text(services["redis"]).split()
    assert words[words.index("--appendonly") + 1] == "yes"
    assert words[words.index("--appendfsync") + 1] == "always"
    assert any(str(v).endswith(":/data") for v in services["redis"].get("volumes", []))
    assert services["postgres"].get("volumes"), "postgres keeps its data in a volume"


def test_migrate_runs_once_before_the_replicas(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert command_text(migrate).split()[-2:] == ["taskd", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    taskd = services["taskd"]
    assert taskd["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert taskd["depends_on"]["redis"]["condition"] == "service_healthy"


def test_taskd_replicas_are_configured_and_scalable(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    taskd = services["taskd"]
    assert "build" in taskd
    assert "ports" not in taskd, "a fixed host port breaks `docker compose up --scale taskd=3`"
    assert "container_name" not in taskd
    env = environment(taskd)
    for key in (
        "TASKD_POSTGRES_DSN",
        "TASKD_REDIS_URL",
        "TASKD_AUTH_SECRET",
        "TASKD_HTTP_HOST",
        "TASKD_HTTP_TRUSTED_PROXIES",
    ):
        assert env.get(key), key
    assert env["TASKD_HTTP_HOST"] == "0.0.0.0"
    assert "@postgres:" in env["TASKD_POSTGRES_DSN"]
    assert env["TASKD_REDIS_URL"].startswith("redis://redis:")
    # The secret comes from the environment and compose refuses to start without it.
    assert re.fullmatch(r"\$\{TASKD_AUTH_SECRET:\?.+\}", env["TASKD_AUTH_SECRET"])
    # The replicas believe forwarded headers from the compose network (where nginx is).
    subnets = [
        pool["subnet"]
        for network in (compose.get("networks") or {}).values()
        for pool in ((network or {}).get("ipam") or {}).get("config", [])
    ]
    assert env["TASKD_HTTP_TRUSTED_PROXIES"] in subnets


def test_nginx_fronts_the_replicas_with_the_tested_config(
    services: dict[str, dict[str, Any]],
) -> None:
    nginx = services["nginx"]
    assert nginx["image"].startswith("nginx:1.")
    volumes = [str(v) for v in nginx["volumes"]]
    assert any(v.split(":")[0] == "./deploy/nginx.conf" for v in volumes), volumes
    assert any(v.split(":")[1] == "/etc/nginx/nginx.conf" for v in volumes), volumes
    assert nginx.get("ports"), "nginx is the way in"
    assert "taskd" in nginx["depends_on"]
    text = CONFIG.read_text()
    # The upstream names the compose service, re-resolved through Docker's DNS (--scale).
    assert re.search(r"^\s*server taskd:8080 resolve .*# @test:upstream$", text, re.M)
    assert re.search(r"^\s*resolver 127\.0\.0\.11 ", text, re.M)


def dockerfile_lines() -> list[str]:
    """Instructions, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_dockerfile() -> None:
    lines = dockerfile_lines()
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage: build, then a runtime image"
    for image in froms:
        _, _, tag = image.partition(":")
        assert tag, f"{image}: no tag"
        assert tag != "latest"
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{image}: pin the exact release"
    # The last stage is the image: it must drop root.
    runtime = lines[max(i for i, line in enumerate(lines) if line.upper().startswith("FROM ")) :]
    users = [line.split()[1] for line in runtime if line.upper().startswith("USER ")]
    assert users, "no USER in the runtime stage"
    assert users[-1] not in {"root", "0"}
    assert not users[-1].startswith("0:")
    assert any(line.upper().startswith("HEALTHCHECK ") and "/healthz" in line for line in runtime)
    assert any(line.upper().split()[:2] == ["EXPOSE", "8080"] for line in runtime)
    cmd = next(line for line in reversed(runtime) if line.upper().startswith("CMD "))
    assert '"serve"' in cmd
    assert "0.0.0.0" in cmd
    # The wheel ships the schema files (tests/test_packaging.py): the build needs sql/ in its
    # sources, and nothing copies it into the image by hand.
    build = lines[: max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))]
    assert "COPY sql/ sql/" in build
    assert not any("site-packages" in line for line in lines)


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((PROJECT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".dev"} <= ignored


def test_render_replaces_every_marker_and_nothing_else(tmp_path: Path) -> None:
    rendered = render(8123, ["127.0.0.1:9001", "127.0.0.1:9002"], tmp_path)
    assert not any(MARKER.search(line) for line in rendered.splitlines())
    assert "listen 127.0.0.1:8123;" in rendered
    assert "server 127.0.0.1:9001 max_fails=" in rendered
    assert "server 127.0.0.1:9002 max_fails=" in rendered
    assert not re.search(r"^\s*server taskd", rendered, re.M)
    original = [line for line in CONFIG.read_text().splitlines() if not MARKER.search(line)]
    kept = rendered.splitlines()
    assert all(line in kept for line in original)


def test_access_log_never_writes_the_raw_request() -> None:
    text = CONFIG.read_text()
    formats = re.findall(r"log_format\s+\w+[^;]*;", text, re.S)
    assert formats
    for fmt in formats:
        assert "$request_uri" not in fmt
        assert not re.search(r"\$request\b(?!_)", fmt)
        assert "$args" not in fmt
        assert "$query_string" not in fmt


@needs_nginx
def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    result = Nginx(tmp_path, ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]).check()
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr
