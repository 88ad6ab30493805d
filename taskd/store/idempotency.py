"""Idempotency-Key records: a keyed write runs in one transaction with the record of its
answer, so a crash can never leave one without the other.

A request holds its key, for as long as its transaction runs, with a transaction-scoped
advisory lock taken before anything else; a repeat that cannot take it is answered 409 at
once instead of queueing. A repeat that takes it after the first committed reads (in a
snapshot taken after the lock, so after that commit) the recorded answer, and replays it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from taskd.errors import IdempotencyConflict, IdempotencyKeyReused
from taskd.models import Answer, KeyedRequest, Outcome
from taskd.store.cursor import Cursor

# How long a record is kept (and replayed): the contract's 24 hours.
KEPT = "interval '24 hours'"
# Expired records each new record deletes, oldest first (an index scan): they go at several
# times the rate keys are used, so storage stays that of one day of keys.
PURGE_PER_RECORD = 16

# The key's lock: a 64-bit digest of (user, key); two keys share one only by a hash collision,
# which costs a needless 409 at worst. `:` cannot occur in the decimal user id before it.
TRY_HOLD = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))"
GET_RECORD = f"""
SELECT fingerprint, status, body, etag, location FROM idempotency_keys
WHERE user_id = %s AND key = %s AND created_at > now() - {KEPT}
"""
# An expired record of the same key is replaced (it is not purged here: one statement may not
# touch a row twice). SKIP LOCKED: concurrent writers never queue behind each other's purge.
RECORD = f"""
WITH purged AS (
    DELETE FROM idempotency_keys WHERE (user_id, key) IN (
        SELECT user_id, key FROM idempotency_keys
        WHERE created_at <= now() - {KEPT}
          AND NOT (user_id = %(user_id)s AND key = %(key)s)
        ORDER BY created_at LIMIT {PURGE_PER_RECORD}
        FOR UPDATE SKIP LOCKED)
)
INSERT INTO idempotency_keys (user_id, key, fingerprint, status, body, etag, location)
VALUES (%(user_id)s, %(key)s, %(fingerprint)s, %(status)s, %(body)s, %(etag)s, %(location)s)
ON CONFLICT (user_id, key) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status, body = EXCLUDED.body,
    etag = EXCLUDED.etag, location = EXCLUDED.location, created_at = EXCLUDED.created_at
"""


async def _hold(cur: Cursor, keyed: KeyedRequest) -> Answer | None:
    """Take the key for this transaction (409 if a request with it runs) and return the
    answer recorded under it, if any (422 if that answer was to another request)."""
    await cur.execute(TRY_HOLD, (f"{keyed.user_id}:{keyed.key}",))
    if not (await cur.fetchone())[0]:
        raise IdempotencyConflict()
    await cur.execute(GET_RECORD, (keyed.user_id, keyed.key))
    row = await cur.fetchone()
    if row is None:
        return None
    fingerprint, status, body, etag, location = row
    if bytes(fingerprint) != keyed.fingerprint:
        raise IdempotencyKeyReused()
    return Answer(int(status), body, etag, location)


async def _record(cur: Cursor, keyed: KeyedRequest, answer: Answer) -> None:
    params = {
        "user_id": keyed.user_id,
        "key": keyed.key,
        "fingerprint": keyed.fingerprint,
        "status": answer.status,
        "body": answer.body,
        "etag": answer.etag,
        "location": answer.location,
    }
    await cur.execute(RECORD, params)


async def keyed_write(
    cur: Cursor, keyed: KeyedRequest, write: Callable[[Cursor], Awaitable[Outcome]]
) -> tuple[Outcome, bool]:
    """Run `write` (which must not open a transaction of its own) and record its answer, in
    one transaction; or replay the answer recorded under the key. Returns the outcome and
    whether it is a replay (which changed nothing). An error of `write` records nothing."""
    async with cur.begin():
        recorded = await _hold(cur, keyed)
        if recorded is not None:
            return Outcome(recorded, changed=False), True
        outcome = await write(cur)
        await _record(cur, keyed, outcome.answer)
    return outcome, False
