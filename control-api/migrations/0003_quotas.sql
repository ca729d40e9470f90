-- Per-user quota overrides. A NULL column means "the deployment's default" (configuration
-- `[quotas]`); a row exists only for users with an override (gpugate-api user set-quota).
CREATE TABLE user_quotas (
    user_id       bigint PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    environments  integer CHECK (environments >= 0),
    gpus          integer CHECK (gpus >= 0),
    running       integer CHECK (running >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
