-- Issue 14: ending every login of a user at once, and Idempotency-Key records.

-- Raised by a password change and by "log out everywhere". An access token carries the
-- generation it was issued under (claim `gen`, absent = 0); one from an older generation is
-- refused (taskd/cutoffs.py). A counter, not a time: no clock and no second boundary decides
-- whether a token was issued before the change, the commit order of this row does.
ALTER TABLE users ADD COLUMN token_generation bigint NOT NULL DEFAULT 0
    CHECK (token_generation >= 0);

-- The answer to a task write sent with an Idempotency-Key, written in the transaction of the
-- write itself (taskd/store/idempotency.py), so neither exists without the other. Kept 24
-- hours; every new record deletes a few expired ones, oldest first (the index below).
CREATE TABLE idempotency_keys (
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key         varchar(255) NOT NULL,
    fingerprint bytea NOT NULL,          -- sha256 of the method, the path and the body
    status      smallint NOT NULL,
    body        text,                    -- the JSON answered, or NULL (204)
    etag        text,
    location    text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
