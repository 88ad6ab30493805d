-- Expired refresh tokens are deleted per user at each login (store.insert_refresh), which
-- needs this index; it also serves the ON DELETE CASCADE from users.
CREATE INDEX refresh_tokens_user_expires_idx ON refresh_tokens (user_id, expires_at);
