-- The gateway registry. Each gateway host runs nginx and one publisher, the single writer of
-- that host's route table, and the API cannot see those tables: it learns what each gateway
-- holds only from what the gateway reports here. One row per gateway, written by the
-- publisher only while it holds its table's writer lock (after each whole-table sync and on a
-- heartbeat), read by the admin view, the metrics, and creates that want to know how many
-- gateways already route a generation. The data plane never reads it: a gateway whose row
-- cannot be written keeps routing.
CREATE TABLE gateways (
    -- Chosen by the operator (default: the host name); the same shape as a DNS label plus
    -- dots, so it fits a metrics label and a log line without quoting.
    name                text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9._-]{1,63}$'),
    -- Every route change of a generation up to this one that committed is in the gateway's
    -- table (a watermark, not the newest route seen: generations are taken before their
    -- transactions commit, in any order). 0: none confirmed yet.
    applied_generation  bigint NOT NULL DEFAULT 0 CHECK (applied_generation >= 0),
    -- The gateway's own heartbeat interval, so that staleness (no beat for three intervals)
    -- is judged by each row's promise, whatever the reader's configuration says.
    heartbeat_ms        integer NOT NULL CHECK (heartbeat_ms > 0),
    -- Times come from the database's clock (now() at the write), never the gateway's, so
    -- ages compare across hosts whose clocks disagree.
    heartbeat_at        timestamptz NOT NULL,
    last_sync_at        timestamptz NOT NULL,
    -- When this writer took the table: a restart or a take-over shows as a new value.
    started_at          timestamptz NOT NULL,
    -- Where the table lives on that host and which process writes it, to find it there.
    table_path          text NOT NULL,
    pid                 integer NOT NULL CHECK (pid > 0),
    version             text NOT NULL
);
