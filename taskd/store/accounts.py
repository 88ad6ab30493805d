"""Accounts and the refresh-token families of their logins."""

from __future__ import annotations

import uuid

import psycopg2
from psycopg2 import errorcodes

from taskd.models import Credentials, TokenGrant, User, canonical_username
from taskd.store.cursor import Cursor


class UsernameTaken(Exception):
    """The username exists already (compared case-insensitively)."""


# --- users -----------------------------------------------------------------------------------

INSERT_USER = """
INSERT INTO users (username, username_key, email, password_hash) VALUES (%s, %s, %s, %s)
RETURNING id, username, email
"""
USERNAME_EXISTS = "SELECT 1 FROM users WHERE username_key = %s"
GET_USER = "SELECT id, username, email FROM users WHERE id = %s"
_CREDENTIALS = "SELECT id, username, password_hash, token_generation FROM users"
GET_CREDENTIALS = f"{_CREDENTIALS} WHERE username_key = %s"
GET_CREDENTIALS_BY_ID = f"{_CREDENTIALS} WHERE id = %s"
# Only over the hash that was checked: a concurrent change of it wins.
UPDATE_PASSWORD_HASH = "UPDATE users SET password_hash = %s WHERE id = %s AND password_hash = %s"


async def username_exists(cur: Cursor, username: str) -> bool:
    await cur.execute(USERNAME_EXISTS, (canonical_username(username),))
    return bool(await cur.fetchone())


async def create_user(cur: Cursor, username: str, email: str, password_hash: bytes) -> User:
    """Insert an account; `UsernameTaken` when the name's canonical form is in use."""
    params = (username, canonical_username(username), email, password_hash.decode())
    try:
        await cur.execute(INSERT_USER, params)
    except psycopg2.IntegrityError as exc:
        if exc.pgcode == errorcodes.UNIQUE_VIOLATION:
            raise UsernameTaken(username) from None
        raise
    return User(*await cur.fetchone())


async def get_user(cur: Cursor, user_id: int) -> User | None:
    await cur.execute(GET_USER, (user_id,))
    row = await cur.fetchone()
    return User(*row) if row else None


def _credentials(row: tuple[int, str, str, int] | None) -> Credentials | None:
    return Credentials(row[0], row[1], row[2].encode(), int(row[3])) if row else None


async def get_credentials(cur: Cursor, username: str) -> Credentials | None:
    await cur.execute(GET_CREDENTIALS, (canonical_username(username),))
    return _credentials(await cur.fetchone())


async def get_credentials_by_id(cur: Cursor, user_id: int) -> Credentials | None:
    await cur.execute(GET_CREDENTIALS_BY_ID, (user_id,))
    return _credentials(await cur.fetchone())


async def update_password_hash(cur: Cursor, credentials: Credentials, new_hash: bytes) -> None:
    """Replace the hash just checked (e.g. at a new bcrypt cost); a no-op if it changed since."""
    params = (new_hash.decode(), credentials.user_id, credentials.password_hash.decode())
    await cur.execute(UPDATE_PASSWORD_HASH, params)


USERS_WITHOUT_KEY = "SELECT id, username FROM users WHERE username_key IS NULL ORDER BY id"
TAKEN_KEYS = "SELECT username_key FROM users WHERE username_key = ANY(%s)"
SET_USERNAME_KEYS = """
UPDATE users u SET username_key = k.key FROM unnest(%s::bigint[], %s::text[]) AS k(id, key)
WHERE u.id = k.id
"""
USERNAME_KEY_REQUIRED = "ALTER TABLE users ALTER COLUMN username_key SET NOT NULL"


async def backfill_username_keys(cur: Cursor) -> list[int]:
    """Migration 003: give every account its canonical username; return the ids that clash.

    Two old accounts may share a canonical form (`Straße` and `STRASSE` were distinct under
    `lower()`): the older keeps it, a newer one gets `<key>#<id>`, which no login can type
    (`#` is not a username character) until an operator renames one of them.
    """
    await cur.execute(USERS_WITHOUT_KEY)
    rows = await cur.fetchall()
    wanted = {user_id: canonical_username(name) for user_id, name in rows}
    await cur.execute(TAKEN_KEYS, (list(set(wanted.values())),))
    taken = {row[0] for row in await cur.fetchall()}
    clashes, keys = [], []
    for user_id, key in wanted.items():
        if key in taken:
            clashes.append(user_id)
            key = f"{key}#{user_id}"
        taken.add(key)
        keys.append(key)
    if wanted:
        await cur.execute(SET_USERNAME_KEYS, (list(wanted), keys))
    await cur.execute(USERNAME_KEY_REQUIRED)
    return clashes


# --- refresh tokens --------------------------------------------------------------------------

# A login also forgets the user's expired families and tokens, so the tables stay the size of
# the live logins (an expired token is refused by its `exp` before any lookup). Its family is
# created only while the user's token generation is the one read with the password that was
# checked: FOR SHARE waits for a password change or "log out everywhere" under way on that
# row and then sees its new generation, so no login it ended can slip a family in after it.
INSERT_REFRESH = """
WITH live_user AS (
    SELECT id FROM users
    WHERE id = %(user_id)s AND token_generation = %(generation)s
    FOR SHARE
), expired_families AS (
    DELETE FROM refresh_families WHERE user_id = %(user_id)s AND expires_at < now()
), expired_tokens AS (
    DELETE FROM refresh_tokens WHERE user_id = %(user_id)s AND expires_at < now()
), family AS (
    INSERT INTO refresh_families (id, user_id, expires_at)
    SELECT %(family)s, id, now() + make_interval(secs => %(ttl)s) FROM live_user
    RETURNING id, user_id, expires_at
)
INSERT INTO refresh_tokens (jti, family, user_id, expires_at)
SELECT %(jti)s, id, user_id, expires_at FROM family
RETURNING jti
"""
# Consume the presented token and issue its successor in one statement. Of two concurrent
# refreshes with one token exactly one finds `used_at IS NULL`. The successor is issued only
# through an UPDATE of the family row that finds it unrevoked: that UPDATE waits for a
# concurrent revocation and re-checks after it, so rotation and revocation are serialised,
# and a family revoked at any point never gains a live token.
ROTATE_REFRESH = """
WITH expired AS (
    DELETE FROM refresh_tokens
    WHERE family = (SELECT family FROM refresh_tokens WHERE jti = %(jti)s)
      AND expires_at < now()
), consumed AS (
    UPDATE refresh_tokens SET used_at = now()
    WHERE jti = %(jti)s AND used_at IS NULL AND expires_at > now()
    RETURNING family
), family AS (
    UPDATE refresh_families f SET expires_at = now() + make_interval(secs => %(ttl)s)
    FROM consumed c
    WHERE f.id = c.family AND f.revoked_at IS NULL
    RETURNING f.id, f.user_id
), issued AS (
    INSERT INTO refresh_tokens (jti, family, user_id, expires_at)
    SELECT %(new_jti)s, id, user_id, now() + make_interval(secs => %(ttl)s) FROM family
    RETURNING user_id
)
SELECT i.user_id, u.token_generation FROM issued i JOIN users u ON u.id = i.user_id
"""
# A consumed token presented again is taken as theft: the whole family goes.
REVOKE_FAMILY_IF_REUSED = """
UPDATE refresh_families SET revoked_at = now()
WHERE id = (SELECT family FROM refresh_tokens WHERE jti = %s AND used_at IS NOT NULL)
  AND revoked_at IS NULL
"""
# Logout: revoke the family of a token that is still live; report whether it was.
REVOKE_FAMILY_OF_LIVE = """
UPDATE refresh_families f SET revoked_at = now()
FROM refresh_tokens t
WHERE t.jti = %s AND t.used_at IS NULL AND t.expires_at > now()
  AND f.id = t.family AND f.revoked_at IS NULL
RETURNING f.id
"""


async def insert_refresh(
    cur: Cursor, jti: uuid.UUID, user_id: int, ttl: int, generation: int
) -> bool:
    """Record a new login's refresh token, the first of a new family; False when the user's
    logins ended (or the account went) since `generation` was read."""
    params = {
        "jti": str(jti),
        "family": str(uuid.uuid4()),
        "user_id": user_id,
        "ttl": ttl,
        "generation": generation,
    }
    await cur.execute(INSERT_REFRESH, params)
    return bool(await cur.fetchall())


async def rotate_refresh(
    cur: Cursor, jti: uuid.UUID, new_jti: uuid.UUID, ttl: int
) -> TokenGrant | None:
    """Consume `jti`, recording `new_jti` in its family; None if it was not live.

    A token presented after it was consumed revokes its whole family.
    """
    params = {"jti": str(jti), "new_jti": str(new_jti), "ttl": ttl}
    await cur.execute(ROTATE_REFRESH, params)
    row = await cur.fetchone()
    if row:
        return TokenGrant(int(row[0]), int(row[1]))
    await cur.execute(REVOKE_FAMILY_IF_REUSED, (str(jti),))
    return None


async def revoke_family(cur: Cursor, jti: uuid.UUID) -> bool:
    """Logout: revoke the family of a live token. False (revoking on reuse) if it was not live."""
    await cur.execute(REVOKE_FAMILY_OF_LIVE, (str(jti),))
    if await cur.fetchall():
        return True
    await cur.execute(REVOKE_FAMILY_IF_REUSED, (str(jti),))
    return False


# --- ending every login of a user, deleting the account --------------------------------------

# Two statements, in this order: the UPDATE of the user's row waits for a login's FOR SHARE
# (INSERT_REFRESH) and the revocation that follows takes a snapshot after it, so a family that
# login created is revoked too; a login that comes later sees the new generation and makes none.
BUMP_GENERATION = """
UPDATE users SET token_generation = token_generation + 1,
                 password_hash = coalesce(%(new_hash)s, password_hash)
WHERE id = %(user_id)s AND (%(checked)s::text IS NULL OR password_hash = %(checked)s)
RETURNING token_generation
"""
REVOKE_USER_FAMILIES = (
    "UPDATE refresh_families SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL"
)
TOKEN_GENERATION = "SELECT token_generation FROM users WHERE id = %s"
TOKEN_GENERATIONS = "SELECT id, token_generation FROM users WHERE id = ANY(%s::bigint[])"
# The user's row first: a task write under way holds it (and then finds no user), and the
# outbox rows of writes committed before are all visible to the second statement.
DELETE_USER = "DELETE FROM users WHERE id = %s AND password_hash = %s RETURNING id"
DELETE_USER_OUTBOX = "DELETE FROM outbox WHERE user_id = %s"


async def _end_logins(
    cur: Cursor, user_id: int, checked: bytes | None = None, new_hash: bytes | None = None
) -> int | None:
    """Raise the user's token generation and revoke every refresh family; with `new_hash`,
    set the password too, only while the stored hash is still `checked`. The new generation,
    or None (no such user, or the hash changed)."""
    params = {
        "user_id": user_id,
        "checked": checked.decode() if checked is not None else None,
        "new_hash": new_hash.decode() if new_hash is not None else None,
    }
    await cur.execute(BUMP_GENERATION, params)
    row = await cur.fetchone()
    if row is None:
        return None
    await cur.execute(REVOKE_USER_FAMILIES, (user_id,))
    return int(row[0])


async def end_logins(cur: Cursor, user_id: int) -> int | None:
    """Log out everywhere: the user's new token generation, or None if the user is gone."""
    async with cur.begin():
        return await _end_logins(cur, user_id)


async def change_password(
    cur: Cursor, user_id: int, checked: bytes, new_hash: bytes, jti: uuid.UUID, ttl: int
) -> int | None:
    """Set a new password while the stored hash is still `checked`, ending every login of
    the user; `jti` starts the caller's new login. The new generation, or None."""
    async with cur.begin():
        generation = await _end_logins(cur, user_id, checked, new_hash)
        if generation is not None:
            await insert_refresh(cur, jti, user_id, ttl, generation)
        return generation


async def token_generation(cur: Cursor, user_id: int) -> int | None:
    """The user's current token generation; None when the account is gone."""
    await cur.execute(TOKEN_GENERATION, (user_id,))
    row = await cur.fetchone()
    return int(row[0]) if row else None


async def token_generations(cur: Cursor, user_ids: list[int]) -> dict[int, int]:
    """The current token generation of each of these users that still exists."""
    await cur.execute(TOKEN_GENERATIONS, (user_ids,))
    return {int(user_id): int(generation) for user_id, generation in await cur.fetchall()}


async def delete_user(cur: Cursor, user_id: int, checked: bytes) -> bool:
    """Delete the account (its tasks, refresh tokens and Idempotency-Key records go with it,
    by foreign key) and its unpublished events, while its hash is still `checked`."""
    async with cur.begin():
        await cur.execute(DELETE_USER, (user_id, checked.decode()))
        if await cur.fetchone() is None:
            return False
        await cur.execute(DELETE_USER_OUTBOX, (user_id,))
    return True
