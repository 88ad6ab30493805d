-- A rotation forgets its family's expired tokens (a token past `exp` is refused before any
-- lookup), so a login that refreshes for days keeps only the rows that could still be replayed.
DROP INDEX refresh_tokens_family_idx;
CREATE INDEX refresh_tokens_family_expires_idx ON refresh_tokens (family, expires_at);
