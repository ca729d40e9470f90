-- A fleet: workspaces live on many GPU hosts, each with its own Docker engine and GPUs.
-- PostgreSQL stays the only coordinator: a create places its environment on a host in the
-- same transaction that takes that host's GPUs (FOR UPDATE SKIP LOCKED, as for ports), so API
-- replicas never double-book a GPU.

CREATE TABLE hosts (
    -- How operators, the placement and every environment name the host.
    name              text PRIMARY KEY CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    -- The Docker endpoint: '' (the local socket's defaults), unix:///path, tcp://host:port
    -- (with TLS client certificates from tls_dir) or http://host:port (lab use only).
    docker_endpoint   text NOT NULL,
    -- A directory holding ca.pem, cert.pem and key.pem for a tcp:// endpoint.
    tls_dir           text,
    -- Where the host's containers publish their ports; gateways dial routes there.
    upstream_address  inet NOT NULL,
    -- The GPUs' model label (matched by a create's gpu_model) for an inventory listed by
    -- index; a discovered inventory brings its own names.
    gpu_model         text NOT NULL DEFAULT '' CHECK (length(gpu_model) <= 128),
    -- Most environments placed here at once (creating, running or unreachable); NULL: no limit.
    max_environments  integer CHECK (max_environments > 0),
    -- What the operator wants: active (placements land here), draining (no new placement;
    -- environments there keep running, stop and start), disabled (no placement, not probed).
    state             text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'disabled')),
    -- What the probes saw: unknown until the first probe, up, or down since down_since.
    health            text NOT NULL DEFAULT 'unknown' CHECK (health IN ('unknown', 'up', 'down')),
    health_reason     text,
    last_seen_at      timestamptz,
    down_since        timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((health = 'down') = (down_since IS NOT NULL))
);

-- The host every existing row lives on: the API's own configured engine. The API re-writes
-- this row from its configuration at start (docker.endpoint, upstream_host), and renames it to
-- fleet.host_name when that names no host yet.
INSERT INTO hosts (name, docker_endpoint, upstream_address) VALUES ('local', '', '127.0.0.1');

-- GPUs belong to a host; an index-keyed id ("index:0") is only unique within its host.
-- A removed host takes its GPU rows with it (remove is refused while environments live there).
ALTER TABLE gpu_devices ADD COLUMN host text NOT NULL DEFAULT 'local' REFERENCES hosts (name)
    ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE gpu_devices ALTER COLUMN host DROP DEFAULT;
ALTER TABLE gpu_devices DROP CONSTRAINT gpu_devices_pkey;
ALTER TABLE gpu_devices ADD PRIMARY KEY (host, id);
DROP INDEX gpu_devices_free;
CREATE INDEX gpu_devices_free ON gpu_devices (host, idx) WHERE status = 'available';

-- Every environment lives on one host for its whole life (its home volume is there): a start
-- after a stop takes GPUs of that host again. No foreign key: deleted environments keep the
-- name of a host removed since, for the audit trail; a host with live environments cannot be
-- removed (checked by `host remove`, under the host's row lock).
ALTER TABLE environments ADD COLUMN host text NOT NULL DEFAULT 'local';
ALTER TABLE environments ALTER COLUMN host DROP DEFAULT;
CREATE INDEX environments_host ON environments (host) WHERE status <> 'deleted';

-- 'unreachable': its host stopped answering; its routes are kept for a grace period (the
-- workspace may well still serve), then it becomes 'failed' and its routes go.
ALTER TABLE environments DROP CONSTRAINT environments_status_check;
ALTER TABLE environments ADD CONSTRAINT environments_status_check CHECK (status IN
    ('creating', 'running', 'stopped', 'deleting', 'failed', 'deleted', 'unreachable'));
