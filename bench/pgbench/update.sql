-- PATCH /api/tasks/<id>/: taskd.store.tasks.update_task, statement by statement: BEGIN,
-- NEXT_EVENT (locks the user's row), LOCK_TASK, UPDATE_TASK (with its outbox row), COMMIT.
-- The service compares the old and new values in Python between LOCK_TASK and UPDATE_TASK.
\set uid random(1, :users)
\set tid (:uid - 1) * :per_user + random(1, :per_user)
BEGIN;
UPDATE users SET event_seq = event_seq + 1 WHERE id = :uid
RETURNING event_seq, clock_timestamp() \gset
SELECT id, user_id, title, description, done, created_at, updated_at, version FROM tasks WHERE id = :tid AND user_id = :uid FOR UPDATE;
WITH changed AS (
    UPDATE tasks SET title = 'pgbench', description = '', done = false,
                     version = version + 1, updated_at = ':clock_timestamp'
    WHERE id = :tid
    RETURNING id, user_id, title, description, done, created_at, updated_at, version
), queued AS (
INSERT INTO outbox (user_id, seq, kind, task_id, version, title, description, done,
                    created_at, updated_at, at)
SELECT user_id, :event_seq, 'task.updated', id, version, title, description, done,
       created_at, updated_at, ':clock_timestamp' FROM changed
)
SELECT id, user_id, title, description, done, created_at, updated_at, version FROM changed;
COMMIT;
