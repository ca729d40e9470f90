-- A gateway's own PostgreSQL role, for `gpugate-api publish` on a gateway host: it reads the
-- routes (by port and by name), the close requests and the schema's version, and writes the
-- rows named after itself in the gateway registry, the activity reports and the applied
-- closes (row-level security, migrations 0014 and 0019); nothing else. It cannot read
-- workspaces' credentials or users, and cannot change the schema: the API (or
-- `gpugate-api migrate`) applies migrations with the owner's role.
--
-- Run as a superuser in the API's database after the API has migrated it, one statement per
-- blank-line-separated block, with @GATEWAY@ (the role's name, which must equal the gateway's
-- `gateway_name`), @DB@ and @PASSWORD@ replaced (names as [a-z_][a-z0-9_]*, the password
-- URL-safe). Then start the publisher with DATABASE_URL naming this role and
-- GPUGATE_GATEWAY_NAME=@GATEWAY@.
CREATE ROLE "@GATEWAY@" LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS PASSWORD '@PASSWORD@';

GRANT CONNECT ON DATABASE "@DB@" TO "@GATEWAY@";

GRANT USAGE ON SCHEMA public TO "@GATEWAY@";

GRANT SELECT ON routes, name_routes, _sqlx_migrations TO "@GATEWAY@";

GRANT SELECT ON SEQUENCE route_generation_seq TO "@GATEWAY@";

GRANT SELECT, INSERT, UPDATE ON gateways TO "@GATEWAY@";

GRANT SELECT, INSERT, UPDATE, DELETE ON gateway_activity TO "@GATEWAY@";

GRANT SELECT ON close_requests TO "@GATEWAY@";

GRANT SELECT, INSERT ON close_applied TO "@GATEWAY@";

GRANT SELECT, INSERT, UPDATE ON close_cursors TO "@GATEWAY@";
