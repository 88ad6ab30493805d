"""Logging set-up (text or JSON lines) and an access log that never writes a token."""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar, Token
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from taskd import keys
from taskd.config import LogSettings

# The id of the request being handled, added to every log line written meanwhile.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# Ids this process makes: a random prefix per process and a counter, unique across replicas
# without a system call per request (uuid4 reads the kernel's random source).
_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count()
# A client's X-Request-ID is kept when it is a plausible id (it goes into logs verbatim).
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def bind_request_id(request: web.Request) -> Token[str | None]:
    """Give the request its id (the client's X-Request-ID when plausible, else a new one) and
    make it the id of every log line written while it is handled; reset with the token."""
    incoming = request.headers.get("X-Request-ID", "")
    rid = incoming if REQUEST_ID_RE.match(incoming) else f"{_ID_PREFIX}{next(_id_counter):016x}"
    request[keys.REQUEST_ID] = rid
    return request_id.set(rid)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streams included, carries its X-Request-ID."""
    if keys.REQUEST_ID in request:
        response.headers["X-Request-ID"] = request[keys.REQUEST_ID]


# A query parameter whose name contains one of these words carries a credential (`?token=` is
# how EventSource clients authenticate; nginx's access log uses the same rule).
_SECRET_WORDS = ("token", "access", "refresh")


def _spelled(word: str, any_case: bool) -> str:
    """A pattern for `word` in which any character may also be percent-encoded (`%74oken`), as
    aiohttp decodes a parameter's name before reading it."""
    parts = []
    for char in word:
        forms = sorted({char.lower(), char.upper()} if any_case else {char})
        encoded = ["%" + "".join(f"[{h}{h.upper()}]" for h in f"{ord(f):02x}") for f in forms]
        parts.append(f"(?:{'|'.join([*map(re.escape, forms), *encoded])})")
    return "".join(parts)


# Every pattern below runs in linear time whatever the line (a rejected request is logged
# as received): a match starts only where a name or a run of token characters begins,
# quantifiers are possessive or atomic, and nothing is scanned twice from one start.
_NAME = r"[^=&;#?/\s'\"]"
# A name starts the text or follows `?`, `&`, `;`, white space or a quote; its value runs to
# the next `&` as aiohttp reads it, or to where a request line or a quoted repr ends.
_SECRET_PARAM = re.compile(
    rf"(?<![^?&;\s'\"])(?={_NAME}*?"
    rf"(?:{'|'.join(_spelled(word, any_case=True) for word in _SECRET_WORDS)}))"
    # The value runs on through the `\xNN` escapes of a repr (a control byte sent inside it).
    rf"({_NAME}++=)(?:[^&#\s'\"\\]|\\x[0-9A-Fa-f]{{2}})*+"
)
# A JWT wherever it appears (an Authorization header quoted in a parser error, a body): a run
# of base64url characters, dots and %XX escapes in which `eyJ` (a JSON header, `{"`) is
# followed by `.<segment>.`. The whole run is redacted.
_RUN = r"(?:[A-Za-z0-9_.-]|%[0-9A-Fa-f]{2})"
_B64URL = r"(?:[A-Za-z0-9_-]|%(?!2[Ee])[0-9A-Fa-f]{2})"
_DOT = r"(?:\.|%2[Ee])"
_JWT = re.compile(
    rf"(?<![A-Za-z0-9_.%-])(?>{_RUN}*?{_spelled('eyJ', any_case=False)})"
    rf"{_RUN}*?{_DOT}{_B64URL}++{_DOT}{_RUN}*+"
)
# And a plain JWT whatever precedes it (a stray `%` in a path); it starts a run of token
# characters, so one attempt per run: linear time.
_BARE_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]*+\.[A-Za-z0-9_-]++\.[A-Za-z0-9_-]*+")
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """Replace the value of any token-bearing query parameter, and anything shaped like a JWT."""
    text = _JWT.sub(REDACTED, _SECRET_PARAM.sub(rf"\1{REDACTED}", text))
    return _BARE_JWT.sub(REDACTED, text)


def _redact_all(value: Any) -> Any:
    """`value` with every string in it redacted, however deeply nested."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {_redact_all(k): _redact_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_all(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line; every string in it is redacted, whichever field holds it."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (rid := request_id.get()) is not None:
            entry["request_id"] = rid
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # A value JSON cannot hold is logged as its str(), which is redacted too.
        return json.dumps(
            _redact_all(entry), ensure_ascii=False, default=lambda obj: redact(str(obj))
        )


class RedactingFormatter(logging.Formatter):
    """Text lines, redacted as a whole: message, exception and stack alike."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class AccessLogger(AbstractAccessLogger):
    """One line per request, with the query string redacted."""

    @property
    def enabled(self) -> bool:
        """Whether aiohttp should call `log` at all (not at `[log] level` WARNING or above)."""
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = {
            "request_id": response.headers.get("X-Request-ID"),
            "method": request.method,
            "path": redact(request.path_qs),
            "status": response.status,
            "duration_ms": round(time * 1000, 2),
            "remote": request.remote,
        }
        self.logger.info(
            "%s %s %s %.1fms",
            request.method,
            fields["path"],
            response.status,
            time * 1000,
            extra={"fields": fields},
        )


class RedactingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose report of a broken log call (arguments that do not fit the
    message) is redacted too: logging's own prints the raw message and arguments."""

    def handleError(self, record: logging.LogRecord) -> None:
        message = f"--- logging error in {record.name}: {record.msg!r} % {record.args!r}\n"
        self.stream.write(redact(message))


def setup_logging(settings: LogSettings) -> None:
    handler = RedactingHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
