-- Live sessions: closing them on request, and stopping workspaces nobody uses.

-- sessions/close asks the publisher to raise a port's revoke epoch in the route table to at
-- least this value; nginx closes every session opened under a lower epoch. The API takes it
-- from the epoch it reads in the table plus one, so a request is applied exactly once (a
-- publisher that restarts sees the table already at the value) and never re-applied to
-- sessions opened after it.
ALTER TABLE routes ADD COLUMN revoke_epoch bigint NOT NULL DEFAULT 0 CHECK (revoke_epoch >= 0);

-- Seconds without activity after which the workspace is stopped (0: never). Set at create
-- from the request or the deployment's default; PATCH changes it.
ALTER TABLE environments ADD COLUMN idle_stop_after_s bigint NOT NULL DEFAULT 0
    CHECK (idle_stop_after_s >= 0);

-- When the workspace last became running: the idle clock starts there, because the table's
-- counters start from zero with each start's new route generation.
ALTER TABLE environments ADD COLUMN running_since timestamptz;
UPDATE environments SET running_since = updated_at WHERE status = 'running';

CREATE FUNCTION environments_running_since() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.running_since := now();
    RETURN NEW;
END $$;
CREATE TRIGGER environments_running_since BEFORE UPDATE OF status ON environments
    FOR EACH ROW WHEN (NEW.status = 'running' AND OLD.status IS DISTINCT FROM 'running')
    EXECUTE FUNCTION environments_running_since();
