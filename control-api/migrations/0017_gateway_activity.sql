-- Fleet-wide activity. Each gateway's publisher reads its own table's counters and reports
-- here what changed (once per `gateway_activity_report_ms`, only the routes whose counters
-- moved); the API sums the rows of every fresh gateway for an environment's `activity`,
-- `idle_seconds` and the idle task. A session through any gateway then keeps its workspace
-- awake, not only one through the gateway beside the API.

-- One row per gateway and (environment, service): that gateway's counters of the route (its
-- port route and its name route summed), as its table holds them now. A route that leaves
-- the gateway's table leaves here with the next report.
CREATE TABLE gateway_activity (
    gateway             text NOT NULL,
    env_id              text NOT NULL,
    service             text NOT NULL,
    -- The public port (0: reached by name only on this gateway).
    port                integer NOT NULL CHECK (port >= 0 AND port <= 65535),
    -- The route generation the counters belong to (a re-pointed port starts again at zero).
    generation          bigint NOT NULL CHECK (generation >= 0),
    connections_active  bigint NOT NULL CHECK (connections_active >= 0),
    connections_total   bigint NOT NULL CHECK (connections_total >= 0),
    revoked_total       bigint NOT NULL CHECK (revoked_total >= 0),
    bytes_in            bigint NOT NULL CHECK (bytes_in >= 0),
    bytes_out           bigint NOT NULL CHECK (bytes_out >= 0),
    -- Unix ms by the gateway's clock (what nginx stamps); 0: nothing happened yet.
    last_activity_ms    bigint NOT NULL CHECK (last_activity_ms >= 0),
    PRIMARY KEY (gateway, env_id, service)
);
-- The API reads one environment's rows across gateways.
CREATE INDEX gateway_activity_env ON gateway_activity (env_id);

-- When each gateway last reported (by the database's clock) and how often it promises to:
-- a gateway whose report is older than three of its intervals is stale, and the idle task
-- waits rather than stop a workspace that may be busy there. NULL: never reported (an older
-- publisher, or one that has not reported yet), which counts as stale too.
ALTER TABLE gateways ADD COLUMN activity_at timestamptz;
ALTER TABLE gateways ADD COLUMN activity_report_ms integer CHECK (activity_report_ms > 0);
