-- GET /api/tasks/?limit=20: taskd.store.tasks.LIST_TASKS["-created_at"] (the default ordering)
-- with done and search absent (NULL), limit 20, offset 0.
\set uid random(1, :users)
SELECT head.event_seq, head.total, page.id, page.user_id, page.title, page.description, page.done, page.created_at, page.updated_at, page.version
FROM (SELECT (SELECT event_seq FROM users WHERE id = :uid) AS event_seq,
             (SELECT count(*) FROM tasks WHERE
    user_id = :uid
    AND (NULL::boolean IS NULL OR done = NULL)
    AND (NULL::text IS NULL
         OR strpos(lower(title), lower(NULL)) > 0
         OR strpos(lower(description), lower(NULL)) > 0)
) AS total) AS head
LEFT JOIN LATERAL (
    SELECT id, user_id, title, description, done, created_at, updated_at, version FROM tasks WHERE
    user_id = :uid
    AND (NULL::boolean IS NULL OR done = NULL)
    AND (NULL::text IS NULL
         OR strpos(lower(title), lower(NULL)) > 0
         OR strpos(lower(description), lower(NULL)) > 0)
    ORDER BY created_at DESC, id DESC LIMIT 20 OFFSET 0
) AS page ON true
ORDER BY page.created_at DESC, page.id DESC;
