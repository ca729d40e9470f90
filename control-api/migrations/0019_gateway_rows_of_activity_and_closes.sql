-- Least privilege for gateways, continued (see 0014): a gateway's own role reports activity
-- and records the close requests it applied only under its own name. Row-level security
-- narrows these tables to the rows whose `gateway` is the role's name; the owner (the API's
-- role) is not subject to it and reads every row to sum activity and count applied closes.
ALTER TABLE gateway_activity ENABLE ROW LEVEL SECURITY;
CREATE POLICY gateway_own_activity ON gateway_activity
    USING (gateway = current_user)
    WITH CHECK (gateway = current_user);

ALTER TABLE close_applied ENABLE ROW LEVEL SECURITY;
CREATE POLICY gateway_own_applied ON close_applied
    USING (gateway = current_user)
    WITH CHECK (gateway = current_user);

ALTER TABLE close_cursors ENABLE ROW LEVEL SECURITY;
CREATE POLICY gateway_own_cursor ON close_cursors
    USING (gateway = current_user)
    WITH CHECK (gateway = current_user);
