-- Per-service readiness: "running" says the container started, not that a user can log in.
-- Each start (create or start) writes one row per service with the start's route generation;
-- the API then probes the service at its published address until it answers like the service
-- it is (ready_at) or its deadline passes (failed_at, with the reason in last_error). A row of
-- an older generation, or of an environment that is no longer running, is never probed.
CREATE TABLE service_readiness (
    env_id      text NOT NULL REFERENCES environments (id) ON DELETE CASCADE,
    service     text NOT NULL,
    generation  bigint NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    deadline_at timestamptz NOT NULL,
    ready_at    timestamptz,
    failed_at   timestamptz,
    -- The last probe's failure (while probing), or why the service was given up on.
    last_error  text,
    -- The API instance probing it (its liveness lock tells whether it still lives); NULL:
    -- nobody yet, the next reconcile pass takes it.
    prober      bigint,
    PRIMARY KEY (env_id, service),
    CHECK (ready_at IS NULL OR failed_at IS NULL)
);

-- Workspaces running before this migration get probed once by the next reconcile pass.
INSERT INTO service_readiness (env_id, service, generation, deadline_at)
SELECT r.env_id, r.service, r.generation, now() + interval '60 seconds'
FROM routes r JOIN environments e ON e.id = r.env_id
WHERE e.status = 'running' AND r.active
ON CONFLICT DO NOTHING;
