"""Register, login, token refresh, logout, `me`; the password, logging out everywhere and
deleting the account."""

from __future__ import annotations

import contextlib
import hashlib
import uuid

from aiohttp import web

from taskd import db, keys, store
from taskd.errors import (
    LoginFailed,
    NotAuthenticated,
    TokenInvalid,
    Unavailable,
    ValidationFailed,
)
from taskd.models import Credentials, canonical_username
from taskd.responses import user_body
from taskd.schemas import (
    AccountDeletion,
    Login,
    RefreshIn,
    validate_body,
    validate_password_change,
    validate_register,
)
from taskd.views.common import client_address, read_json

NO_STORE = {"Cache-Control": "no-store"}
USERNAME_TAKEN = "A user with that username already exists."
OLD_PASSWORD_WRONG = "Your old password was entered incorrectly. Please enter it again."
PASSWORD_WRONG = "Wrong password."


def _tokens_response(
    request: web.Request, user_id: int, refresh_jti: uuid.UUID, generation: int
) -> web.Response:
    tokens = request.app[keys.TOKENS]
    body = {
        "access": tokens.issue(user_id, "access", generation=generation),
        "refresh": tokens.issue(user_id, "refresh", refresh_jti),
    }
    return web.json_response(body, headers=NO_STORE)


async def register(request: web.Request) -> web.Response:
    app = request.app
    limits = app[keys.SETTINGS].throttle
    await app[keys.THROTTLE].hit("register", client_address(request), limits.register_per_address)
    body = validate_register(await read_json(request))
    async with db.cursor(app[keys.PG_POOL]) as cur:
        # A cheap early answer; the unique index decides under a race.
        if await store.username_exists(cur, body.username):
            raise ValidationFailed.one("username", USERNAME_TAKEN)
    password_hash = await app[keys.PASSWORDS].hash(body.password)
    async with db.cursor(app[keys.PG_POOL]) as cur:
        try:
            user = await store.create_user(cur, body.username, body.email, password_hash)
        except store.UsernameTaken:
            raise ValidationFailed.one("username", USERNAME_TAKEN) from None
    return web.json_response(user_body(user), status=201)


def _username_ident(body: Login) -> str:
    """The per-username throttle identity: a digest of the name in the canonical form that
    registration and the account lookup use, so every spelling of one account shares it."""
    # Login takes any username (a 400 would tell why it fails): hashed, even 1 MiB, a NUL or a
    # lone surrogate makes a short key Redis can encode, and no client text sits in Redis. A
    # name no account can have is not normalised (that costs CPU for nothing).
    name = canonical_username(body.username) if body.possible_username else body.username
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


async def login(request: web.Request) -> web.Response:
    app = request.app
    limits = app[keys.SETTINGS].throttle
    throttle = app[keys.THROTTLE]
    await throttle.hit("login-address", client_address(request), limits.login_per_address)
    body = validate_body(Login, await read_json(request))
    await throttle.hit("login-username", _username_ident(body), limits.login_per_username)
    credentials = None
    if body.possible_username:  # else a 401 like any other, after the same bcrypt check
        async with db.cursor(app[keys.PG_POOL]) as cur:
            credentials = await store.get_credentials(cur, body.username)
    hashed = credentials.password_hash if credentials else None
    passwords = app[keys.PASSWORDS]
    if not await passwords.verify(body.password, hashed) or credentials is None:
        raise LoginFailed()
    # At the configured cost, a login takes as long as one for an unknown user (dummy hash).
    new_hash = None
    if passwords.needs_rehash(credentials.password_hash):
        with contextlib.suppress(Unavailable):  # busy: the next login re-hashes
            new_hash = await passwords.hash(body.password)
    jti = uuid.uuid4()
    async with db.cursor(app[keys.PG_POOL]) as cur:
        if new_hash is not None:
            await store.update_password_hash(cur, credentials, new_hash)
        ttl = app[keys.TOKENS].ttl("refresh")
        generation = credentials.token_generation
        if not await store.insert_refresh(cur, jti, credentials.user_id, ttl, generation):
            # The user's logins ended while this password was checked. After a password
            # change (or with the account gone) it is stale; after "log out everywhere" it
            # is not, and this is a new login: it starts in the new generation.
            current = await store.get_credentials_by_id(cur, credentials.user_id)
            checked = {credentials.password_hash, new_hash}
            if current is None or current.password_hash not in checked:
                raise LoginFailed()
            generation = current.token_generation
            if not await store.insert_refresh(cur, jti, credentials.user_id, ttl, generation):
                raise LoginFailed()  # ended once more meanwhile: the client may retry
    return _tokens_response(request, credentials.user_id, jti, generation)


async def _refresh_claims(request: web.Request) -> uuid.UUID:
    body = validate_body(RefreshIn, await read_json(request))
    claims = request.app[keys.TOKENS].verify(body.refresh, "refresh")
    # Each refresh leaves a row (kept until it expires, so that a replay is recognised as
    # theft): a login refreshing in a loop must not grow the table without bound.
    limit = request.app[keys.SETTINGS].throttle.refresh_per_user
    await request.app[keys.THROTTLE].hit("refresh-user", str(claims.user_id), limit)
    return claims.jti


async def refresh(request: web.Request) -> web.Response:
    """Rotate: the presented token is consumed atomically and a successor issued."""
    jti, new_jti = await _refresh_claims(request), uuid.uuid4()
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        ttl = request.app[keys.TOKENS].ttl("refresh")
        grant = await store.rotate_refresh(cur, jti, new_jti, ttl)
    if grant is None:
        raise TokenInvalid("Token is invalid, expired, revoked or already used.")
    return _tokens_response(request, grant.user_id, new_jti, grant.token_generation)


async def logout(request: web.Request) -> web.Response:
    """Revoke the refresh token's whole family (every replica reads revocation from Postgres)."""
    jti = await _refresh_claims(request)
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        if not await store.revoke_family(cur, jti):
            raise TokenInvalid("Token is invalid, expired, revoked or already used.")
    return web.Response(status=204, headers=NO_STORE)


async def me(request: web.Request) -> web.Response:
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        user = await store.get_user(cur, request[keys.USER_ID])
    if user is None:
        raise NotAuthenticated("User not found.", code="user_not_found")
    return web.json_response(user_body(user))


async def _credentials(request: web.Request) -> Credentials:
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        credentials = await store.get_credentials_by_id(cur, request[keys.USER_ID])
    if credentials is None:
        raise NotAuthenticated("User not found.", code="user_not_found")
    return credentials


async def _check_password(
    request: web.Request, credentials: Credentials, password: str, field: str, message: str
) -> None:
    """A 400 on `field` unless `password` is the user's; counted per user (a stolen access
    token must not become a way to guess the password)."""
    app = request.app
    limit = app[keys.SETTINGS].throttle.password_per_user
    await app[keys.THROTTLE].hit("password-user", str(credentials.user_id), limit)
    if not await app[keys.PASSWORDS].verify(password, credentials.password_hash):
        raise ValidationFailed.one(field, message)


async def change_password(request: web.Request) -> web.Response:
    """A new password ends every login of the user (here and on every replica); the caller
    gets the first tokens of a new one."""
    app = request.app
    raw = await read_json(request)
    credentials = await _credentials(request)
    body = validate_password_change(raw, credentials.username)
    await _check_password(
        request, credentials, body.old_password, "old_password", OLD_PASSWORD_WRONG
    )
    new_hash = await app[keys.PASSWORDS].hash(body.new_password)
    user_id, jti = credentials.user_id, uuid.uuid4()
    async with db.cursor(app[keys.PG_POOL]) as cur:
        ttl = app[keys.TOKENS].ttl("refresh")
        generation = await store.change_password(
            cur, user_id, credentials.password_hash, new_hash, jti, ttl
        )
    if generation is None:  # changed by another request since it was checked
        raise ValidationFailed.one("old_password", OLD_PASSWORD_WRONG)
    await app[keys.CUTOFFS].logins_ended(user_id, generation)
    return _tokens_response(request, user_id, jti, generation)


async def logout_all(request: web.Request) -> web.Response:
    """End every login of the user: refresh families revoked, access tokens refused."""
    user_id = request[keys.USER_ID]
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        generation = await store.end_logins(cur, user_id)
    if generation is None:
        raise NotAuthenticated("User not found.", code="user_not_found")
    await request.app[keys.CUTOFFS].logins_ended(user_id, generation)
    return web.Response(status=204, headers=NO_STORE)


async def delete_me(request: web.Request) -> web.Response:
    """Delete the account and everything of it; its username is free again."""
    body = validate_body(AccountDeletion, await read_json(request))
    credentials = await _credentials(request)
    await _check_password(request, credentials, body.password, "password", PASSWORD_WRONG)
    async with db.cursor(request.app[keys.PG_POOL]) as cur:
        deleted = await store.delete_user(cur, credentials.user_id, credentials.password_hash)
    if not deleted:  # the password changed since it was checked
        raise ValidationFailed.one("password", PASSWORD_WRONG)
    await request.app[keys.CUTOFFS].account_deleted(credentials.user_id)
    return web.Response(status=204, headers=NO_STORE)
