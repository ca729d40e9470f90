-- Account keys: a user's OpenSSH public keys, which every workspace of theirs accepts besides
-- the keys named at its create. `users.ssh_keys_generation` moves with every change (in the
-- change's own transaction); `environments.account_keys_synced` is the state its current
-- container was last brought to (NULL: not yet, as for every new container), so a workspace
-- whose value differs from what its owner's keys and the password setting want is brought
-- up to date (key_sync.rs). Not readable by a gateway's role (gateway-role.sql grants neither).
CREATE TABLE user_ssh_keys (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name        text NOT NULL,
    public_key  text NOT NULL,
    fingerprint text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, fingerprint)
);

ALTER TABLE users ADD COLUMN ssh_keys_generation bigint NOT NULL DEFAULT 0;
ALTER TABLE environments ADD COLUMN account_keys_synced text;
