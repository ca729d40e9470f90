-- Idempotent creates: a client that retries POST /api/v1/environments with the same
-- Idempotency-Key gets the environment its first attempt made, not a second one. The key is
-- per user (two users may pick the same key); `request` is a digest of the create request, so
-- a key reused for a different request is refused instead of answered with the wrong
-- environment. Keys older than the configured retention (24 h by default) are purged by the
-- reconciler; a failed create deletes its key so that a retry can try again.
CREATE TABLE idempotency_keys (
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key         text NOT NULL CHECK (char_length(key) BETWEEN 1 AND 255),
    request     bytea NOT NULL,
    env_id      text NOT NULL REFERENCES environments (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_env ON idempotency_keys (env_id);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
