-- Revokes that land on every gateway. A sessions/close request is recorded once, here, and
-- every gateway's publisher applies each request it has not applied yet, exactly once, by
-- raising its own table's revoke epoch of those ports and names by one from whatever value
-- that table holds (tables of different gateways drift apart: a fresh table starts at 0, and
-- each removal bumps only the table that saw it). An absolute target epoch computed from one
-- gateway's table, as `routes.revoke_epoch` was, is a no-op on a gateway that is ahead.

-- One row per request: the environment's routes at the request, each with the generation it
-- had then. A gateway revokes a port (or name) only while its table still holds that
-- environment's route of that generation: a route that changed since was removed, and its
-- sessions revoked, by the change itself.
CREATE TABLE close_requests (
    id                bigserial PRIMARY KEY,
    env_id            text NOT NULL,
    ports             integer[] NOT NULL,
    port_generations  bigint[] NOT NULL,
    services          text[] NOT NULL,
    name_generations  bigint[] NOT NULL,
    requested_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (cardinality(ports) = cardinality(port_generations)),
    CHECK (cardinality(services) = cardinality(name_generations))
);

-- Which gateway applied which request (written by that gateway's publisher right after its
-- table write): `applied` in the answer counts these rows among the fresh gateways.
CREATE TABLE close_applied (
    request_id  bigint NOT NULL REFERENCES close_requests (id) ON DELETE CASCADE,
    gateway     text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, gateway)
);

-- Where each gateway's duty starts: a gateway seen for the first time owes nothing to the
-- requests made before it existed (its table holds no session of that time); one that comes
-- back after an outage applies everything it missed.
CREATE TABLE close_cursors (
    gateway   text PRIMARY KEY,
    since_id  bigint NOT NULL CHECK (since_id >= 0)
);
