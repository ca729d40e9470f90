-- Stopping an environment now gives its GPUs back to the inventory, and a start allocates
-- them again and re-creates the container (the home directory lives in a per-environment
-- Docker volume, so it survives). `gpus` keeps meaning "the devices held now" (empty while
-- stopped; quotas count it); `gpu_count` remembers how many the environment asked for, so a
-- start knows how many to take.
ALTER TABLE environments ADD COLUMN gpu_count integer NOT NULL DEFAULT 0 CHECK (gpu_count >= 0);
UPDATE environments SET gpu_count = COALESCE(array_length(gpus, 1), 0);

-- The resource limits a create settled on, so that a re-created container gets the same
-- ones. NULL for environments created before this migration: a start then reads them from
-- the old container, or falls back to the deployment's defaults.
ALTER TABLE environments
    ADD COLUMN memory_mb  bigint CHECK (memory_mb > 0),
    ADD COLUMN cpus       double precision CHECK (cpus > 0),
    ADD COLUMN pids       integer CHECK (pids > 0);

-- Environments already stopped keep their GPUs here; the reconciler releases them once their
-- container is seen stopped (a stop that failed half-way may have left it running, and a GPU
-- must never be handed out while a container still has it).
