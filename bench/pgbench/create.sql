-- POST /api/tasks/: taskd.store.tasks.CREATE_TASK, one statement in autocommit.
\set uid random(1, :users)
WITH event AS (
    UPDATE users SET event_seq = event_seq + 1 WHERE id = :uid
    RETURNING event_seq, clock_timestamp() AS at
), changed AS (
    INSERT INTO tasks (user_id, title, description, done, created_at, updated_at, version)
    SELECT :uid, 'pgbench', '', false, at, at, 1 FROM event
    RETURNING id, user_id, title, description, done, created_at, updated_at, version
), queued AS (
    INSERT INTO outbox (user_id, seq, kind, task_id, version, title, description, done,
                        created_at, updated_at, at)
    SELECT c.user_id, e.event_seq, 'task.created', c.id, c.version, c.title, c.description,
           c.done, c.created_at, c.updated_at, e.at
    FROM changed c, event e
)
SELECT id, user_id, title, description, done, created_at, updated_at, version FROM changed;
