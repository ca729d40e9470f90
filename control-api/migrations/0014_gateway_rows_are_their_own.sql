-- Least privilege for gateways. A gateway's publisher may run as a role of its own that can
-- only read the routes and write the registry (docker/postgres/gateway-role.sql grants
-- exactly that). Row-level security narrows the registry to the gateway's own row: a role
-- other than the owner sees and writes only the row named after itself, so a compromised
-- gateway cannot forge another gateway's applied generation. The owner (the API's role) is
-- not subject to it and keeps reading every row.
ALTER TABLE gateways ENABLE ROW LEVEL SECURITY;
CREATE POLICY gateway_own_row ON gateways
    USING (name = current_user)
    WITH CHECK (name = current_user);
