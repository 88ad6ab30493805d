"""Passwords (bcrypt, off the event loop), JWT issue/verify, and the authentication middleware."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import bcrypt
import jwt
from aiohttp import web
from aiohttp.typedefs import Handler

from taskd import keys
from taskd.config import AuthSettings
from taskd.errors import NotAuthenticated, TokenInvalid
from taskd.schemas import PASSWORD_MAX_BYTES, canonical_id

TokenType = Literal["access", "refresh"]
REQUIRED_CLAIMS = ["sub", "type", "jti", "iat", "exp"]
PUBLIC = "_taskd_public"
QUERY_TOKEN = "_taskd_query_token"

F = TypeVar("F", bound=Callable[..., Any])


def public(handler: F) -> F:
    """Mark a handler as open to anonymous clients."""
    setattr(handler, PUBLIC, True)
    return handler


def query_token(handler: F) -> F:
    """Let a handler take the access token from `?token=` (EventSource cannot send headers)."""
    setattr(handler, QUERY_TOKEN, True)
    return handler


class Passwords:
    """bcrypt in a bounded thread pool: ~100-300 ms of CPU per call never runs on the loop."""

    def __init__(self, executor: ThreadPoolExecutor, rounds: int, dummy_hash: bytes) -> None:
        self._executor = executor
        self._rounds = rounds
        self._dummy_hash = dummy_hash  # at the current cost: checked when there is no account

    @classmethod
    async def start(cls, executor: ThreadPoolExecutor, rounds: int) -> Passwords:
        """A checker whose dummy hash is made now, so no login pays for it (or races to)."""
        salt = bcrypt.gensalt(rounds)
        dummy = await asyncio.get_running_loop().run_in_executor(
            executor, bcrypt.hashpw, uuid.uuid4().hex.encode(), salt
        )
        return cls(executor, rounds, dummy)

    async def _run(self, fn: Callable[..., bytes | bool], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def hash(self, password: str) -> bytes:
        salt = bcrypt.gensalt(self._rounds)
        return bytes(await self._run(bcrypt.hashpw, password.encode(), salt))

    def needs_rehash(self, hashed: bytes) -> bool:
        """Whether a stored hash (`$2b$NN$...`) has another cost than the configured one."""
        return hashed[4:7] != b"%02d$" % self._rounds

    async def verify(self, password: str, hashed: bytes | None) -> bool:
        """Check a password; with no hash (unknown user) spend the same time and fail."""
        try:
            candidate: bytes | None = password.encode()
        except UnicodeEncodeError:  # a lone surrogate, which registration refuses
            candidate = None
        if candidate is None or len(candidate) > PASSWORD_MAX_BYTES:
            # No account can have it (bcrypt 5 raises on over-long ones); still spend a check.
            candidate, hashed = b"x", None
        ok = bool(await self._run(bcrypt.checkpw, candidate, hashed or self._dummy_hash))
        return ok and hashed is not None


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: int
    jti: uuid.UUID
    exp: int


class Tokens:
    """Issue and verify HS* JWTs; the algorithm is pinned and the `type` claim checked."""

    def __init__(self, settings: AuthSettings) -> None:
        self._key = settings.secret.get_secret_value()
        self._algorithm = settings.algorithm
        self._ttl = {"access": settings.access_ttl, "refresh": settings.refresh_ttl}

    def ttl(self, kind: TokenType) -> int:
        return self._ttl[kind]

    def issue(self, user_id: int, kind: TokenType, jti: uuid.UUID | None = None) -> str:
        now = int(time.time())
        claims = {
            "sub": str(user_id),
            "type": kind,
            "jti": str(jti or uuid.uuid4()),
            "iat": now,
            "exp": now + self._ttl[kind],
        }
        return jwt.encode(claims, self._key, algorithm=self._algorithm)

    def verify(self, token: str, kind: TokenType) -> Claims:
        """Decode and check a token of the given type; `TokenInvalid` on anything wrong."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                options={"require": REQUIRED_CLAIMS},
            )
            if claims["type"] != kind:
                raise TokenInvalid(f"Token has wrong type: {kind} token required.")
            sub, exp = claims["sub"], claims["exp"]
            user_id = canonical_id(sub) if isinstance(sub, str) else None
            if user_id is None or not isinstance(exp, int):
                raise TokenInvalid()
            return Claims(user_id, uuid.UUID(str(claims["jti"])), exp)
        except jwt.ExpiredSignatureError:
            raise TokenInvalid("Token is expired.") from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise TokenInvalid() from None


def bearer_token(request: web.Request, allow_query: bool) -> str:
    """The access token from `Authorization: Bearer`, or `?token=` where allowed."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenInvalid("Authorization header must be 'Bearer <token>'.")
        return token.strip()
    if allow_query and (from_query := request.query.get("token")):
        return from_query
    raise NotAuthenticated()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every matched route needs an access token unless its handler is marked `public`."""
    match = request.match_info
    if match.http_exception is None:
        target = match.handler
        if not getattr(target, PUBLIC, False):
            token = bearer_token(request, getattr(target, QUERY_TOKEN, False))
            claims = request.app[keys.TOKENS].verify(token, "access")
            request[keys.USER_ID] = claims.user_id
            request[keys.TOKEN_EXPIRES] = claims.exp
    return await handler(request)


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    """The bcrypt thread pool, the password checker and the token service."""
    settings = app[keys.SETTINGS].auth
    executor = ThreadPoolExecutor(settings.bcrypt_threads, thread_name_prefix="bcrypt")
    app[keys.TOKENS] = Tokens(settings)
    try:
        app[keys.PASSWORDS] = await Passwords.start(executor, settings.bcrypt_rounds)
        yield
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
