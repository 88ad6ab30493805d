"""Passwords (bcrypt, off the event loop), JWT issue/verify, and the authentication middleware."""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import bcrypt
import jwt
from aiohttp import web

from taskd import keys
from taskd.config import AuthSettings
from taskd.errors import NotAuthenticated, TokenInvalid, Unavailable
from taskd.schemas import PASSWORD_MAX_BYTES, canonical_id

TokenType = Literal["access", "refresh"]
REQUIRED_CLAIMS = ["sub", "type", "jti", "iat", "exp"]
# Marks on a route's handler, set by `app.add_routes` from the route table's `auth`: open to
# anonymous clients; may take the access token from `?token=` (EventSource sends no headers).
PUBLIC = "_taskd_public"
QUERY_TOKEN = "_taskd_query_token"

R = TypeVar("R")


MIN_ROUNDS = 4  # bcrypt's lowest cost
# Access tokens remembered as verified, per process: more than the clients one process serves.
VERIFIED_TOKENS_KEPT = 50_000


def _cost(hashed: bytes) -> int | None:
    """The cost of a stored `$2b$NN$...` hash."""
    digits = hashed[4:6]
    return int(digits) if digits.isdigit() else None


class Passwords:
    """bcrypt in a bounded thread pool: ~100-300 ms of CPU per call never runs on the loop.

    Work is admitted only while the pool can finish it within `max_wait` seconds: past that a
    login storm is answered 503 at once instead of queueing without bound. Every check costs
    the work of one hash at the configured cost, whether the account exists or not and
    whatever cost its stored hash has (when that is lower), so timing tells nothing.
    """

    def __init__(
        self,
        executor: ThreadPoolExecutor,
        parallel: int,
        rounds: int,
        max_wait: float,
        dummies: dict[int, bytes],
        seconds_per_hash: float,
    ) -> None:
        self._executor = executor
        self._parallel = parallel  # hashes that truly run at once
        self._rounds = rounds
        self._max_wait = max_wait
        self._dummies = dummies  # one hash per cost up to the configured one
        self._seconds_per_hash = seconds_per_hash  # at the configured cost, measured
        self._queued = 0.0  # admitted work not yet finished, in hashes at the configured cost

    @classmethod
    async def start(
        cls, settings: AuthSettings, executor: ThreadPoolExecutor, processes: int = 1
    ) -> Passwords:
        """Make the dummy hashes now (every cost up to the configured one: together about
        the work of one more hash), so no login pays for them or races to."""
        secret = uuid.uuid4().hex.encode()
        rounds = settings.bcrypt_rounds

        def make() -> tuple[dict[int, bytes], float]:
            dummies = {
                c: bcrypt.hashpw(secret, bcrypt.gensalt(c)) for c in range(MIN_ROUNDS, rounds)
            }
            started = time.perf_counter()
            dummies[rounds] = bcrypt.hashpw(secret, bcrypt.gensalt(rounds))
            return dummies, time.perf_counter() - started

        dummies, seconds = await asyncio.get_running_loop().run_in_executor(executor, make)
        # Hashes run in parallel only as far as the CPUs go, which the serving processes of
        # this machine share: counting threads alone admitted twice the work that fits.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        parallel = max(1, min(settings.bcrypt_threads, (cpus or 1) // processes))
        return cls(executor, parallel, rounds, settings.bcrypt_max_wait, dummies, seconds)

    @property
    def busy(self) -> float:
        """Seconds the admitted hashing work will take the pool to finish."""
        return self._queued * self._seconds_per_hash / self._parallel

    async def _run(self, work: float, fn: Callable[[], R]) -> R:
        """Run `fn` (costing `work` hashes) in the pool, or 503 if it would wait too long."""
        wait = (self._queued + work) * self._seconds_per_hash / self._parallel
        # A free thread always takes the work, however slow one hash is on this machine.
        if self._queued + work > self._parallel and wait > self._max_wait:
            raise Unavailable("Too many logins right now.", retry_after=max(1, math.ceil(wait)))
        self._queued += work

        def timed() -> tuple[R, float]:
            started = time.perf_counter()
            return fn(), time.perf_counter() - started

        try:
            result, seconds = await asyncio.get_running_loop().run_in_executor(
                self._executor, timed
            )
        finally:
            self._queued -= work
        # Follow the machine's real speed (load, CPU steal): a moving average per hash.
        self._seconds_per_hash += 0.2 * (seconds / work - self._seconds_per_hash)
        return result

    async def hash(self, password: str) -> bytes:
        salt = bcrypt.gensalt(self._rounds)
        return await self._run(1.0, lambda: bcrypt.hashpw(password.encode(), salt))

    def needs_rehash(self, hashed: bytes) -> bool:
        """Whether a stored hash has another cost than the configured one."""
        return _cost(hashed) != self._rounds

    async def verify(self, password: str, hashed: bytes | None) -> bool:
        """Check a password; with no hash (unknown user) spend the same work and fail."""
        try:
            candidate: bytes | None = password.encode()
        except UnicodeEncodeError:  # a lone surrogate, which registration refuses
            candidate = None
        if candidate is None or len(candidate) > PASSWORD_MAX_BYTES:
            # No account can have it (bcrypt 5 raises on over-long ones); still spend a check.
            candidate, hashed = b"x", None
        target = hashed or self._dummies[self._rounds]
        cost = _cost(target) or self._rounds
        # A hash at a lower cost (the cost was raised since) is padded with dummy checks at
        # costs cost .. rounds-1: 2^cost + (2^cost + ... + 2^(rounds-1)) = 2^rounds.
        padding = [self._dummies[c] for c in range(max(cost, MIN_ROUNDS), self._rounds)]
        work = max(1.0, 2.0 ** (cost - self._rounds))

        def check() -> bool:
            ok = bcrypt.checkpw(candidate, target)
            for dummy in padding:
                bcrypt.checkpw(b"x", dummy)
            return ok

        ok = await self._run(work, check)
        return ok and hashed is not None


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: int
    jti: uuid.UUID
    exp: int
    generation: int  # `gen`: the user's token generation when it was issued (absent: 0)


class Tokens:
    """Issue and verify HS* JWTs; the algorithm is pinned and the `type` claim checked."""

    def __init__(self, settings: AuthSettings) -> None:
        self._key = settings.secret.get_secret_value()
        self._algorithm = settings.algorithm
        self._ttl = {"access": settings.access_ttl, "refresh": settings.refresh_ttl}
        self._verified: OrderedDict[str, Claims] = OrderedDict()

    def ttl(self, kind: TokenType) -> int:
        return self._ttl[kind]

    def issue(
        self, user_id: int, kind: TokenType, jti: uuid.UUID | None = None, generation: int = 0
    ) -> str:
        """A signed token; an access token carries the user's token `generation` (`gen`),
        which `cutoffs.Cutoffs` compares with the user's current one."""
        now = int(time.time())
        claims: dict[str, str | int] = {
            "sub": str(user_id),
            "type": kind,
            "jti": str(jti or uuid.uuid4()),
            "iat": now,
            "exp": now + self._ttl[kind],
        }
        if kind == "access":
            claims["gen"] = generation
        return jwt.encode(claims, self._key, algorithm=self._algorithm)

    def verify(self, token: str, kind: TokenType) -> Claims:
        """Decode and check a token of the given type; `TokenInvalid` on anything wrong.

        Access tokens already verified are remembered (by their exact text, so nothing can
        be forged into a hit) until they expire: a client sends the same one with every
        request, and checking its signature again was a tenth of a request's CPU.
        """
        if kind == "access" and (known := self._verified.get(token)) is not None:
            if known.exp > time.time():
                return known
            del self._verified[token]
            raise TokenInvalid("Token is expired.")
        claims = self._decode(token, kind)
        if kind == "access":
            self._verified[token] = claims
            if len(self._verified) > VERIFIED_TOKENS_KEPT:
                self._verified.popitem(last=False)  # the oldest
        return claims

    def _decode(self, token: str, kind: TokenType) -> Claims:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                options={"require": REQUIRED_CLAIMS},
            )
            if claims["type"] != kind:
                raise TokenInvalid(f"Token has wrong type: {kind} token required.")
            sub, exp, generation = claims["sub"], claims["exp"], claims.get("gen", 0)
            user_id = canonical_id(sub) if isinstance(sub, str) else None
            if user_id is None or not isinstance(exp, int) or not _is_count(generation):
                raise TokenInvalid()
            return Claims(user_id, uuid.UUID(str(claims["jti"])), exp, generation)
        except jwt.ExpiredSignatureError:
            raise TokenInvalid("Token is expired.") from None
        except (jwt.InvalidTokenError, ValueError, TypeError):
            raise TokenInvalid() from None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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


def authenticate(request: web.Request) -> Awaitable[None] | None:
    """Every matched route needs an access token unless its handler is marked `PUBLIC`:
    the caller's id and the token's expiry go into the request; `ApiError` otherwise.

    The token must also be of its user's current generation (logins not ended since): known
    at once from the per-process cache, or else an awaitable that reads it (await it).
    Remembered tokens are checked too: the check comes after `verify`, whatever it recalls.
    """
    match = request.match_info
    if match.http_exception is None:
        target = match.handler
        if not getattr(target, PUBLIC, False):
            token = bearer_token(request, getattr(target, QUERY_TOKEN, False))
            claims = request.app[keys.TOKENS].verify(token, "access")
            request[keys.USER_ID] = claims.user_id
            request[keys.TOKEN_EXPIRES] = claims.exp
            request[keys.TOKEN_GENERATION] = claims.generation
            return request.app[keys.CUTOFFS].check(claims.user_id, claims.generation)
    return None


async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
    """The bcrypt thread pool, the password checker and the token service."""
    settings = app[keys.SETTINGS].auth
    executor = ThreadPoolExecutor(settings.bcrypt_threads, thread_name_prefix="bcrypt")
    app[keys.TOKENS] = Tokens(settings)
    try:
        app[keys.PASSWORDS] = await Passwords.start(settings, executor, app[keys.PROCESSES])
        yield
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
