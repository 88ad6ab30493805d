-- Issue 10: refresh families, one canonical username, outbox in commit order.

-- A login's refresh tokens form a family; the family row is the one place that says whether
-- the login is revoked. Rotation updates (so locks) that row in the statement that issues the
-- successor, and revocation marks it: the two are serialised, and a token of a revoked family
-- is never accepted, however the requests interleave.
CREATE TABLE refresh_families (
    id         uuid PRIMARY KEY,
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,   -- that of its newest token
    revoked_at timestamptz
);
CREATE INDEX refresh_families_user_expires_idx ON refresh_families (user_id, expires_at);
INSERT INTO refresh_families (id, user_id, expires_at, revoked_at)
SELECT family, min(user_id), max(expires_at), max(revoked_at)  -- any revoked token: revoked
FROM refresh_tokens GROUP BY family;
ALTER TABLE refresh_tokens
    ADD CONSTRAINT refresh_tokens_family_fkey
    FOREIGN KEY (family) REFERENCES refresh_families (id) ON DELETE CASCADE;
ALTER TABLE refresh_tokens DROP COLUMN revoked_at;

-- The canonical username (taskd.models.canonical_username: NFKC + casefold, which SQL cannot
-- compute) is unique; `taskd migrate` fills it for existing rows right after this file, in the
-- same transaction, then makes it NOT NULL.
ALTER TABLE users ADD COLUMN username_key text;
CREATE UNIQUE INDEX users_username_key_key ON users (username_key);
DROP INDEX users_username_lower_key;

-- The relay publishes in commit order (per-user order kept): a serial id. Rows already
-- waiting get ids in the order of their change time, then (user, seq).
ALTER TABLE outbox ADD COLUMN id bigint;
UPDATE outbox o SET id = r.n
FROM (SELECT user_id, seq, row_number() OVER (ORDER BY at, user_id, seq) AS n FROM outbox) r
WHERE o.user_id = r.user_id AND o.seq = r.seq;
ALTER TABLE outbox ALTER COLUMN id SET NOT NULL;
ALTER TABLE outbox ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY;
SELECT setval(pg_get_serial_sequence('outbox', 'id'), coalesce(max(id), 0) + 1, false)
FROM outbox;
CREATE UNIQUE INDEX outbox_id_key ON outbox (id);
