-- Routes by name: `<env-id>.<service>.<domain>` on the gateway's TLS port reaches a service
-- without a pool port. `name_services` lists the services of an environment reachable by name
-- (chosen at create: access "hostname" or "both"); a service reachable by name only holds no
-- pool port. The rows of `name_routes` follow `routes` through every lifecycle step (put at
-- start, deactivated at stop, deleted at delete) and wake the publisher the same way.
ALTER TABLE environments ADD COLUMN name_services text[] NOT NULL DEFAULT '{}';

CREATE TABLE name_routes (
    env_id        text NOT NULL REFERENCES environments (id),
    service       text NOT NULL,
    upstream      text NOT NULL,
    generation    bigint NOT NULL,
    active        boolean NOT NULL DEFAULT true,
    revoke_epoch  bigint NOT NULL DEFAULT 0 CHECK (revoke_epoch >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (env_id, service)
);

-- The payload names the key: "n:<env-id>:<service>" (ports notify their number, so the two
-- never read alike).
CREATE FUNCTION name_routes_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('gpugate_routes', 'n:' || OLD.env_id || ':' || OLD.service);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM pg_notify('gpugate_routes', 'n:' || NEW.env_id || ':' || NEW.service);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER name_routes_notify AFTER INSERT OR UPDATE OR DELETE ON name_routes
    FOR EACH ROW EXECUTE FUNCTION name_routes_notify();
