-- GET /api/tasks/<id>/: taskd.store.tasks.GET_TASK, as psycopg2 sends it (parameters inlined).
-- Seeded layout (bench/accounts.py seed_tasks): user u owns tasks (u-1)*per_user+1 .. u*per_user.
\set uid random(1, :users)
\set tid (:uid - 1) * :per_user + random(1, :per_user)
SELECT id, user_id, title, description, done, created_at, updated_at, version FROM tasks WHERE id = :tid AND user_id = :uid;
