-- Work-aware idle: a workspace whose GPUs are busy is not idle, a user can hold a workspace
-- awake for a bounded time, and an `idle_warning` event comes before the idle stop.
-- Additive only: processes older than this migration read and write none of these columns
-- and keep working (they do not know holds or GPU activity, so during a rolling upgrade they
-- may stop a held or GPU-busy workspace; the README says so).

-- The last utilisation sample of each GPU, written by the API process on the GPU's host
-- (`nvidia-smi --query-gpu=uuid,utilization.gpu`) on every idle check. NULL percent: the host
-- reported no value ([N/A]); a sample older than a few check intervals counts as unknown,
-- never as busy. `busy_at` is the time of the last sample at or above the sampler's
-- `idle.gpu_busy_percent`: the idle clock of the workspace holding the GPU restarts there,
-- like after a session.
ALTER TABLE gpu_devices
    ADD COLUMN utilization_pct smallint CHECK (utilization_pct BETWEEN 0 AND 100),
    ADD COLUMN utilization_at  timestamptz,
    ADD COLUMN busy_at         timestamptz;

-- Until when the owner holds the workspace awake (POST .../hold); NULL or past: no hold.
-- The idle clock restarts at the hold's end.
ALTER TABLE environments ADD COLUMN hold_until timestamptz;

-- When the last `idle_warning` was sent: one warning per idle period (a warning older than
-- the period's start belongs to an earlier period), and the stop never comes sooner than
-- the warning's lead after it.
ALTER TABLE environments ADD COLUMN idle_warned_at timestamptz;
