"""Logs never hold a token: `redact()` on tricky inputs, both formatters on every field of a
record, and a real `taskd serve` process fed requests that carry a token in their query."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import aiohttp
import jwt
import pytest

from taskd.config import Settings
from taskd.logs import JsonFormatter, RedactingFormatter, RedactingHandler, redact
from tests.conftest import PASSWORD
from tests.live import WAIT, raw_request
from tests.replicas import Replica

# A real-looking token: what redaction must catch is its shape, not its validity.
TOKEN = jwt.encode(
    {"sub": "42", "type": "access", "jti": "0" * 32, "iat": 1, "exp": 2},
    "k" * 32,
    algorithm="HS256",
)
HEADER, PAYLOAD, SIGNATURE = TOKEN.split(".")


def percent_encode(text: str) -> str:
    return "".join(f"%{ord(c):02X}" for c in text)


def assert_no_token(text: str) -> None:
    for secret in (TOKEN, PAYLOAD, SIGNATURE):
        assert secret not in text, text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f"GET /api/stream/?token={TOKEN}", "GET /api/stream/?token=[redacted]"),
        (
            f"/api/stream/?last_event_id=1-0&token={TOKEN}&x=1",
            "/api/stream/?last_event_id=1-0&token=[redacted]&x=1",
        ),
        # Names with percent-encoded letters, which aiohttp decodes before reading them.
        (f"/s/?%74oken={TOKEN}", "/s/?%74oken=[redacted]"),
        (f"/s/?%74%6F%6b%65%6E={TOKEN}", "/s/?%74%6F%6b%65%6E=[redacted]"),
        (f"/s/?T%4fKeN={TOKEN} HTTP/1.1", "/s/?T%4fKeN=[redacted] HTTP/1.1"),
        ("/s/?x=1&%61ccess=abc&%52EFRESH=def", "/s/?x=1&%61ccess=[redacted]&%52EFRESH=[redacted]"),
        # The value runs to the next `&`, as aiohttp reads it (`;` separates nothing there).
        ("/s/?refresh_token=abc;x=def&a=1", "/s/?refresh_token=[redacted]&a=1"),
        ("/s/?a=1;access_token=def", "/s/?a=1;access_token=[redacted]"),
        # The value ends where the request line or a quoted repr does.
        (
            f"b'GET /api/stream/?token={TOKEN}\\x7f HTTP/1.1\\r\\nHost: x'",
            "b'GET /api/stream/?token=[redacted] HTTP/1.1\\r\\nHost: x'",
        ),
        ("/s/?token=abc\x7f HTTP/1.1", "/s/?token=[redacted] HTTP/1.1"),
        ("/s/?token=#frag", "/s/?token=[redacted]#frag"),
        # A JWT anywhere, whatever carries it.
        (f"Authorization: Bearer {TOKEN}\r\n", "Authorization: Bearer [redacted]\r\n"),
        (f'{{"refresh": "{TOKEN}"}}', '{"refresh": "[redacted]"}'),
        (f"/s/?note={TOKEN}&a=1", "/s/?note=[redacted]&a=1"),
        (f"/s/?%6eote={TOKEN}", "/s/?%6eote=[redacted]"),
        (f"x{TOKEN}y", "[redacted]"),  # the whole run of token characters goes
        # ... also when some of its characters are percent-encoded.
        (f"/s/?n={HEADER}%2E{PAYLOAD}%2e{SIGNATURE}", "/s/?n=[redacted]"),
        (f"/s/?n=%65%79%4A{TOKEN[3:]}", "/s/?n=[redacted]"),
        (f"/s/?n={TOKEN[:10]}%5F{TOKEN[10:]}", "/s/?n=[redacted]"),
        (f"/s/?n={HEADER}.{PAYLOAD}.", "/s/?n=[redacted]"),  # unsigned (`alg: none`)
        # What carries no token stays as it was.
        ("/api/tasks/?done=false&search=report&ordering=-updated_at", None),
        ("/api/stream/?last_event_id=0-0", None),
        ("/s/?tok=1&acces=2&refres=3&%74oke=4", None),
        ("/api/tokens/?x=1 and /access/refresh/?y=2", None),
        ("eyJ is how every JWT starts; eyJhbGciOiJIUzI1NiJ9 alone is no token", None),
        ("applied migration 001_schema.sql", None),
    ],
)
def test_redact(line: str, expected: str | None) -> None:
    assert redact(line) == (line if expected is None else expected)


@pytest.mark.parametrize(
    "line",
    [
        "eyJ" * 70_000,
        "%41eyJ" * 35_000,
        "eyJa" + "." * 200_000,
        "?" + "token" * 40_000,
        "?" + "%74" * 70_000,
        "&t" * 100_000,
        "?a=" + "?token" * 35_000,
    ],
    ids=["eyJ-run", "escaped-eyJ-run", "dots", "name", "escapes", "params", "nested"],
)
def test_redact_takes_linear_time(line: str) -> None:
    """A rejected request is logged as received: no line may make redaction crawl."""
    started = time.perf_counter()
    redact(line)
    assert time.perf_counter() - started < 1.0  # quadratic would be minutes


def test_percent_encoded_names_are_caught_in_any_mix() -> None:
    for name in ("token", "access", "refresh"):
        for mask in range(2 ** len(name)):
            encoded = "".join(
                percent_encode(c.upper() if i % 2 else c) if mask >> i & 1 else c
                for i, c in enumerate(name)
            )
            assert redact(f"/s/?{encoded}=secret") == f"/s/?{encoded}=[redacted]", encoded


def record_with_everything() -> logging.LogRecord:
    """A record that carries the token in its message, arguments, exception, stack and extra."""
    try:
        raise ValueError(f"bad request line b'GET /s/?x={TOKEN}\\x7f HTTP/1.1'")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "rejected %s", (f"?token={TOKEN}",), exc_info
    )
    record.stack_info = f"Stack (most recent call last):\n  frame with {TOKEN}"
    record.fields = {  # type: ignore[attr-defined]
        "path": f"/s/?%74oken={TOKEN}",
        "nested": {"list": [f"Bearer {TOKEN}", 3]},
        "status": 400,
    }
    return record


def test_json_lines_redact_every_field() -> None:
    line = JsonFormatter().format(record_with_everything())
    entry = json.loads(line)
    assert_no_token(line)
    assert entry["message"] == "rejected ?token=[redacted]"
    assert "x=[redacted]" in entry["exc"]
    assert "ValueError" in entry["exc"]
    assert entry["stack"].endswith("frame with [redacted]")
    assert entry["path"] == "/s/?%74oken=[redacted]"
    assert entry["nested"] == {"list": ["Bearer [redacted]", 3]}
    assert entry["status"] == 400


def test_text_lines_redact_every_part() -> None:
    formatter = RedactingFormatter("%(levelname)s %(name)s %(message)s")
    text = formatter.format(record_with_everything())
    assert_no_token(text)
    assert text.startswith("ERROR aiohttp.server rejected ?token=[redacted]")
    assert "x=[redacted]" in text
    assert "frame with [redacted]" in text


def test_a_logger_writes_nothing_unredacted() -> None:
    """Through a real logger and handler, as setup_logging() wires them."""
    for formatter in (JsonFormatter(), RedactingFormatter("%(message)s")):
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        logger = logging.getLogger(f"taskd.test.{type(formatter).__name__}")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            try:
                raise RuntimeError(TOKEN)
            except RuntimeError:
                logger.exception("failed on %s", f"/s/?access={TOKEN}", stack_info=True)
        finally:
            logger.removeHandler(handler)
        assert "[redacted]" in out.getvalue()
        assert_no_token(out.getvalue())


async def log_in(replica: Replica) -> str:
    """A real access token from the replica."""
    body = {"username": "tokenlogger", "password": PASSWORD}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{replica.url}/api/register/", json=body) as resp:
            assert resp.status == 201, await resp.text()
        async with http.post(f"{replica.url}/api/login/", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["access"])


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_a_served_process_never_logs_a_query_token(
    settings: Settings, replicas: list[Replica], log_format: str
) -> None:
    # Short-lived tokens: the stream below ends by itself (reauth), and only a finished
    # request reaches the access log.
    replica = Replica(settings, TASKD_LOG_FORMAT=log_format, TASKD_AUTH_ACCESS_TTL="4")
    replicas.append(replica)
    await replica.start()
    access = await log_in(replica)

    # aiohttp's parser rejects this line; its error, logged, quotes the line as received.
    status, _, _ = await raw_request(
        replica.port,
        b"GET /api/stream/?token=" + access.encode() + b"\x7f HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert status == 400
    # aiohttp decodes `%74oken` to `token`: this stream is served, and its line logged as sent.
    status, _, body = await raw_request(
        replica.port,
        f"GET /api/stream/?%74oken={access}&last_event_id=0-0 HTTP/1.1\r\n"
        "Host: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 200
    assert b"event: reauth" in body

    await replica.wait_for("Error handling request", limit=WAIT)
    await replica.wait_for("/api/stream/?%74oken=[redacted]&last_event_id=0-0", limit=WAIT)
    log = "".join(replica.output)
    assert "/api/stream/?token=[redacted]" in log  # the rejected line, in the logged error
    assert "Traceback" not in log  # a client's junk is one line, not a traceback at ERROR
    if log_format == "json":
        assert all(json.loads(line) for line in replica.output if line.startswith("{"))
    for secret in (access, *access.split(".")[1:]):
        assert secret not in log


def test_a_broken_log_call_is_reported_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    handler = RedactingHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logger = logging.getLogger("taskd.test.broken")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("%s and %s", f"/api/stream/?token={TOKEN}")  # one argument missing
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "logging error in taskd.test.broken" in err
    assert TOKEN not in err


@pytest.mark.parametrize(
    "line",
    [
        # A control byte inside the token, as a repr writes it.
        f"b'GET /api/stream/?token={TOKEN[:40]}\\x7f{TOKEN[40:]} HTTP/1.1'",
        # A stray `%` right before a JWT, in a path or a value.
        f"GET /api/x%{TOKEN} HTTP/1.1",
        f"/api/stream/?q=%{TOKEN}",
    ],
)
def test_redaction_holes_found_in_review(line: str) -> None:
    redacted = redact(line)
    assert TOKEN.split(".")[1] not in redacted
    assert TOKEN.split(".")[2] not in redacted
    assert "[redacted]" in redacted


def test_bare_jwt_pattern_is_linear_on_hostile_runs() -> None:
    for line in ("eyJ" * 300_000, "eyJ." * 200_000, "%eyJ" * 200_000):
        started = time.perf_counter()
        redact(line)
        assert time.perf_counter() - started < 1.0
