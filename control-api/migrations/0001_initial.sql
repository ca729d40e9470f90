-- gpugate control-plane schema. PostgreSQL is the source of truth: the route table and Docker
-- converge to what these tables say (the reconciler repairs both).

-- Users and their API tokens. Tokens are random and long, so a plain SHA-256 is enough to keep
-- a database dump from handing out working credentials; the raw token is shown once.
CREATE TABLE users (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9._@-]{1,64}$'),
    is_admin    boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_tokens (
    id            bigserial PRIMARY KEY,
    user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_sha256  bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per workspace, kept after deletion (status 'deleted') for the audit trail.
-- Credentials are stored in clear because the access endpoint must hand them back.
CREATE TABLE environments (
    id               text PRIMARY KEY CHECK (id ~ '^[a-z0-9]{16}$'),
    owner_id         bigint NOT NULL REFERENCES users (id),
    name             text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 64),
    image            text NOT NULL,
    status           text NOT NULL CHECK (status IN
                         ('creating', 'running', 'stopped', 'deleting', 'failed', 'deleted')),
    status_reason    text,
    container_id     text,
    services         text[] NOT NULL,
    gpus             integer[] NOT NULL DEFAULT '{}',
    route_generation bigint NOT NULL DEFAULT 0,
    username         text NOT NULL,
    password         text NOT NULL,
    jupyter_token    text NOT NULL,
    ssh_public_keys  text[] NOT NULL DEFAULT '{}',
    -- The API instance in the middle of an operation on this row. An instance holds a
    -- session advisory lock on its id for its whole life, so a crashed instance's rows are
    -- recognisable at once (the lock is free) and the reconciler finishes or undoes them.
    op_instance      bigint,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz
);
CREATE INDEX environments_owner ON environments (owner_id, created_at) WHERE status <> 'deleted';
CREATE INDEX environments_live ON environments (status) WHERE status <> 'deleted';

-- One row per port the pools may hand out. The CHECKs make a half-released port impossible:
-- an allocated port always names its environment, a quarantined one always has an end time.
CREATE TABLE port_pool (
    port              integer PRIMARY KEY CHECK (port BETWEEN 1 AND 65535),
    service           text NOT NULL CHECK (service IN ('ssh', 'jupyter', 'code', 'rdp')),
    status            text NOT NULL DEFAULT 'available'
                          CHECK (status IN ('available', 'allocated', 'quarantined', 'reserved')),
    env_id            text REFERENCES environments (id),
    allocated_at      timestamptz,
    released_at       timestamptz,
    quarantine_until  timestamptz,
    CHECK ((status = 'allocated') = (env_id IS NOT NULL)),
    CHECK (status <> 'quarantined' OR quarantine_until IS NOT NULL)
);
-- Allocation scans only free ports of one service.
CREATE INDEX port_pool_free ON port_pool (service, released_at NULLS FIRST, port)
    WHERE status IN ('available', 'quarantined');
CREATE INDEX port_pool_env ON port_pool (env_id) WHERE env_id IS NOT NULL;

-- The GPU inventory, synchronised from configuration; allocated like ports.
CREATE TABLE gpu_devices (
    idx      integer PRIMARY KEY CHECK (idx >= 0),
    status   text NOT NULL DEFAULT 'available' CHECK (status IN ('available', 'allocated', 'retired')),
    env_id   text REFERENCES environments (id),
    CHECK ((status = 'allocated') = (env_id IS NOT NULL))
);

-- Every route generation is unique across the deployment, so a slot written for one
-- environment can never be mistaken for a later route on the same port.
CREATE SEQUENCE route_generation_seq;

-- The routes the table must hold (those with active = true). The publisher reads only this.
CREATE TABLE routes (
    port        integer PRIMARY KEY REFERENCES port_pool (port),
    env_id      text NOT NULL REFERENCES environments (id),
    service     text NOT NULL,
    upstream    text NOT NULL,
    generation  bigint NOT NULL,
    expires_at  timestamptz,
    active      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX routes_env ON routes (env_id);

-- Every committed change to a route wakes the publisher (delivered at commit, so it never
-- sees uncommitted routes). The payload is the port; the publisher reads the row back.
CREATE FUNCTION routes_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('gpugate_routes', OLD.port::text);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('gpugate_routes', NEW.port::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER routes_notify AFTER INSERT OR UPDATE OR DELETE ON routes
    FOR EACH ROW EXECUTE FUNCTION routes_notify();

-- Audit trail: created, ports allocated/released, containers started/removed, repairs.
CREATE TABLE events (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    env_id  text,
    kind    text NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX events_env ON events (env_id, at) WHERE env_id IS NOT NULL;
