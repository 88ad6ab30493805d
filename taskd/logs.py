"""Logging set-up (text or JSON lines) and an access log that never writes a token."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from taskd.config import LogSettings

# The id of the request being handled, added to every log line written meanwhile.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

# `?token=` carries an access token for EventSource clients: it must not reach any log.
_SECRET_PARAM = re.compile(r"([?&](?:token|access|refresh)=)[^&#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace the value of any token-bearing query parameter."""
    return _SECRET_PARAM.sub(r"\1[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if (rid := request_id.get()) is not None:
            entry["request_id"] = rid
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class AccessLogger(AbstractAccessLogger):
    """One line per request, with the query string redacted."""

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


def setup_logging(settings: LogSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
