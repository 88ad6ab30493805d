"""Accounts and the refresh-token families of their logins."""

from __future__ import annotations

import uuid

import psycopg2
from psycopg2 import errorcodes

from taskd.models import Credentials, User, canonical_username
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
GET_CREDENTIALS = "SELECT id, password_hash FROM users WHERE username_key = %s"
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


async def get_credentials(cur: Cursor, username: str) -> Credentials | None:
    await cur.execute(GET_CREDENTIALS, (canonical_username(username),))
    row = await cur.fetchone()
    return Credentials(row[0], row[1].encode()) if row else None


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
# the live logins (an expired token is refused by its `exp` before any lookup).
INSERT_REFRESH = """
WITH expired_families AS (
    DELETE FROM refresh_families WHERE user_id = %(user_id)s AND expires_at < now()
), expired_tokens AS (
    DELETE FROM refresh_tokens WHERE user_id = %(user_id)s AND expires_at < now()
), family AS (
    INSERT INTO refresh_families (id, user_id, expires_at)
    VALUES (%(family)s, %(user_id)s, now() + make_interval(secs => %(ttl)s))
    RETURNING id, user_id, expires_at
)
INSERT INTO refresh_tokens (jti, family, user_id, expires_at)
SELECT %(jti)s, id, user_id, expires_at FROM family
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
)
INSERT INTO refresh_tokens (jti, family, user_id, expires_at)
SELECT %(new_jti)s, id, user_id, now() + make_interval(secs => %(ttl)s) FROM family
RETURNING user_id
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


async def insert_refresh(cur: Cursor, jti: uuid.UUID, user_id: int, ttl: int) -> None:
    """Record a new login's refresh token, the first of a new family."""
    params = {"jti": str(jti), "family": str(uuid.uuid4()), "user_id": user_id, "ttl": ttl}
    await cur.execute(INSERT_REFRESH, params)


async def rotate_refresh(cur: Cursor, jti: uuid.UUID, new_jti: uuid.UUID, ttl: int) -> int | None:
    """Consume `jti`, recording `new_jti` in its family; None if it was not live.

    A token presented after it was consumed revokes its whole family.
    """
    params = {"jti": str(jti), "new_jti": str(new_jti), "ttl": ttl}
    await cur.execute(ROTATE_REFRESH, params)
    row = await cur.fetchone()
    if row:
        return int(row[0])
    await cur.execute(REVOKE_FAMILY_IF_REUSED, (str(jti),))
    return None


async def revoke_family(cur: Cursor, jti: uuid.UUID) -> bool:
    """Logout: revoke the family of a live token. False (revoking on reuse) if it was not live."""
    await cur.execute(REVOKE_FAMILY_OF_LIVE, (str(jti),))
    if await cur.fetchall():
        return True
    await cur.execute(REVOKE_FAMILY_IF_REUSED, (str(jti),))
    return False
