"""Error types, and the one middleware that renders every error as API.md's JSON."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus

from aiohttp import web

log = logging.getLogger(__name__)

NON_FIELD = "non_field_errors"


class ApiError(Exception):
    """An error a client is told about: `{"detail", "code"}` with a status."""

    status = 400
    code = "error"
    detail = "A client error occurred."

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.detail = detail or self.detail
        self.code = code or self.code
        self.headers = dict(headers or {})
        super().__init__(self.detail)

    def body(self) -> object:
        return {"detail": self.detail, "code": self.code}


class ValidationFailed(ApiError):
    """400 with DRF's field map: `{"field": ["message", ...]}`."""

    status = 400
    code = "invalid"

    def __init__(self, errors: Mapping[str, Sequence[str]]) -> None:
        super().__init__("Invalid input.")
        self.errors = {field: list(messages) for field, messages in errors.items()}

    @classmethod
    def one(cls, field: str, message: str) -> ValidationFailed:
        return cls({field: [message]})

    def body(self) -> object:
        return self.errors


class NotAuthenticated(ApiError):
    status = 401
    code = "not_authenticated"
    detail = "Authentication credentials were not provided."

    def __init__(
        self, detail: str | None = None, *, code: str | None = None, error: str | None = None
    ) -> None:
        challenge = 'Bearer realm="api"'
        if error:
            challenge += f', error="{error}"'
        super().__init__(detail, code=code, headers={"WWW-Authenticate": challenge})


class TokenInvalid(NotAuthenticated):
    code = "token_not_valid"
    detail = "Token is invalid or expired."

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, error="invalid_token")


class LoginEnded(TokenInvalid):
    """An access token issued before every login of its user ended (or the account went)."""

    def __init__(self) -> None:
        super().__init__("Token is no longer valid: this login has ended.")


class LoginFailed(NotAuthenticated):
    code = "no_active_account"
    detail = "No active account found with the given credentials."


class Forbidden(ApiError):
    status = 403
    code = "forbidden"
    detail = "You do not have permission to perform this action."


class NotFound(ApiError):
    status = 404
    code = "not_found"
    detail = "Not found."


class PreconditionFailed(ApiError):
    status = 412
    code = "precondition_failed"
    detail = "The task has changed: its version does not match If-Match."


class IdempotencyConflict(ApiError):
    status = 409
    code = "conflict"
    detail = "A request with this Idempotency-Key is still being processed; retry shortly."


class IdempotencyKeyReused(ApiError):
    status = 422
    code = "idempotency_key_reused"
    detail = "This Idempotency-Key was used for another request (method, path or body)."


class Throttled(ApiError):
    status = 429
    code = "throttled"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            f"Request was throttled. Expected available in {retry_after} seconds.",
            headers={"Retry-After": str(retry_after)},
        )


class Unavailable(ApiError):
    status = 503
    code = "unavailable"
    detail = "The service is temporarily unavailable. Try again shortly."

    def __init__(self, detail: str | None = None, *, retry_after: int = 2) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})


# aiohttp's own exceptions (router misses, oversized bodies) in API.md's shape.
_HTTP_CODES = {
    404: ("not_found", "Not found."),
    405: ("method_not_allowed", None),
    413: ("too_large", "Request body is too large."),
}


def protocol_error_body(status: int) -> object:
    """The body for an error aiohttp's HTTP parser raised before any handler ran."""
    if status == 400:
        return {NON_FIELD: ["Malformed HTTP request."]}
    if status >= 500:
        return {"detail": "A server error occurred.", "code": "error"}
    code, detail = _HTTP_CODES.get(status, ("error", None))
    return {"detail": detail or HTTPStatus(status).phrase, "code": code}


def error_response(status: int, body: object, headers: Mapping[str, str] = {}) -> web.Response:
    """One JSON error response."""
    return web.json_response(body, status=status, headers=headers)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    code, detail = _HTTP_CODES.get(exc.status, ("error", None))
    headers: dict[str, str] = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        detail = f'Method "{request.method}" not allowed.'
        headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    return error_response(
        exc.status, {"detail": detail or exc.reason, "code": code}, headers=headers
    )


def render_error(request: web.Request, exc: Exception) -> web.Response:
    """The JSON answer to an error a handler raised (an `ApiError`, aiohttp's own 4xx/5xx);
    the unexpected is logged once and answered 500 without details."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.body(), exc.headers)
    if isinstance(exc, web.HTTPException):
        return _from_http_exception(request, exc)
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, {"detail": "A server error occurred.", "code": "error"})
