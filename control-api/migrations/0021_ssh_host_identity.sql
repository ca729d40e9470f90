-- A workspace's SSH identity: its host key, made at its first start and kept for its whole
-- life (every start, every container re-creation, a move to another host), and the
-- deployment's SSH host CA that certifies it (one row, made by the first process that needs
-- it). Neither is readable by a gateway's role (docker/postgres/gateway-role.sql grants
-- neither table).
ALTER TABLE environments ADD COLUMN ssh_host_key text;

CREATE TABLE ssh_host_ca (
    only_one    boolean PRIMARY KEY DEFAULT true CHECK (only_one),
    private_key text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
