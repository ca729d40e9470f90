-- First start of the gpugate PostgreSQL image: the API's role and database.
-- entrypoint.sh replaces @USER@, @DB@ and @PASSWORD@ (names checked against [a-z_][a-z0-9_]*,
-- the password against URL-safe characters, so none can break out of its quotes) and runs it
-- in single-user mode, one statement per blank-line-separated block. The API tests run the
-- same file against their throw-away cluster (control-api/tests/dbrole.rs).
--
-- The API's role logs in and owns its database, and with it (PostgreSQL 15) the database's
-- public schema, where the migrations create every table, function and trigger. Nothing
-- more: no superuser, no roles, no databases, no replication. The superuser is `postgres`,
-- reachable only through the container's local socket (peer authentication).
CREATE ROLE "@USER@" LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS PASSWORD '@PASSWORD@';

CREATE DATABASE "@DB@" OWNER "@USER@";

-- Other roles of the cluster (there are none today) may not connect to it.
REVOKE ALL ON DATABASE "@DB@" FROM PUBLIC;
