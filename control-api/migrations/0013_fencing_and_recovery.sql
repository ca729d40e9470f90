-- Fencing. Every claim of an environment row (a create's insert, an operation's claim, a
-- reconciler's take-over) draws a new epoch from this sequence and stores it in the row; every
-- write the operation makes afterwards is conditioned on the row still carrying that epoch, in
-- the same statement or under the row lock of the same transaction. A process that lost its
-- claim (its liveness connection dropped and another process took the row over) therefore
-- changes nothing more: its writes find a different epoch and abort the operation.
CREATE SEQUENCE claim_epoch_seq;
ALTER TABLE environments ADD COLUMN op_epoch bigint;
UPDATE environments SET op_epoch = nextval('claim_epoch_seq') WHERE op_instance IS NOT NULL;

-- Transitional states are states: 'stopping' (routes being drained, container being stopped;
-- it still holds its GPUs and counts as running) and 'starting' (a new container being made
-- over the same home). A row in one of them always has an operation (op_instance) or is taken
-- over by the reconciler, which finishes a stop and undoes a start.
ALTER TABLE environments DROP CONSTRAINT environments_status_check;
ALTER TABLE environments ADD CONSTRAINT environments_status_check CHECK (status IN
    ('creating', 'running', 'stopping', 'stopped', 'starting', 'deleting', 'failed', 'deleted',
     'unreachable'));

-- Engine identity: the ID of the Docker engine a host name stands for (Docker's own `ID`
-- from `docker info`), recorded the first time a process reaches it. A process whose engine
-- answers with another ID refuses to act for that host: two engines under one name would
-- otherwise fail each other's workspaces.
ALTER TABLE hosts ADD COLUMN engine_id text;
