-- Accounts, tasks, refresh tokens and the event outbox.

CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      varchar(150) NOT NULL CHECK (char_length(username) >= 1),
    email         varchar(254) NOT NULL DEFAULT '',
    password_hash text NOT NULL,
    -- Number of committed task changes: the n of this user's newest event id "<n>-0".
    event_seq     bigint NOT NULL DEFAULT 0 CHECK (event_seq >= 0),
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Usernames are unique case-insensitively.
CREATE UNIQUE INDEX users_username_lower_key ON users (lower(username));

CREATE TABLE tasks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title       varchar(255) NOT NULL CHECK (title ~ '[^[:space:]]'),
    description text NOT NULL DEFAULT '' CHECK (char_length(description) <= 10000),
    done        boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    version     integer NOT NULL DEFAULT 1 CHECK (version >= 1)
);
-- Serves the per-user list in its default order (-created_at, -id) and every per-user filter.
CREATE INDEX tasks_user_created_idx ON tasks (user_id, created_at DESC, id DESC);

CREATE TABLE refresh_tokens (
    jti        uuid PRIMARY KEY,
    family     uuid NOT NULL,
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    revoked_at timestamptz
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family);
CREATE INDEX refresh_tokens_expires_idx ON refresh_tokens (expires_at);

-- One row per committed change, written in the same transaction as the change and deleted
-- once the relay has published it to Redis. (user_id, seq) is the event id "<seq>-0".
CREATE TABLE outbox (
    user_id     bigint NOT NULL,
    seq         bigint NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('task.created', 'task.updated', 'task.deleted')),
    task_id     bigint NOT NULL,
    version     integer NOT NULL,
    title       varchar(255),
    description text,
    done        boolean,
    created_at  timestamptz,
    updated_at  timestamptz,
    at          timestamptz NOT NULL,
    PRIMARY KEY (user_id, seq)
);
