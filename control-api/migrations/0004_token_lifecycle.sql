-- Token lifecycle: tokens may expire, are revoked instead of deleted (the audit trail keeps
-- them), and record when they were last used (to the minute: a write per minute per token,
-- not per request). `hint` is the token's first characters, shown by `token list` so an
-- operator can tell tokens apart; it is far too short to guess the rest from.
ALTER TABLE api_tokens
    ADD COLUMN expires_at    timestamptz,
    ADD COLUMN revoked_at    timestamptz,
    ADD COLUMN last_used_at  timestamptz,
    ADD COLUMN hint          text NOT NULL DEFAULT '';
