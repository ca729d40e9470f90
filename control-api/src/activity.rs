//! What the gateway saw of a workspace: per-service sessions and bytes from the route table's
//! counters (nginx flushes them while sessions are open), and the idle rule built on them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use gpugate_routes::{Counters, HostKey, Lookup, Service, Table};
use serde::Serialize;

use crate::config::IdlePolicy;

/// One service's traffic through the gateway since the environment last started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ServiceActivity {
    /// The public port (0: reached by name only).
    pub port: u16,
    /// Sessions open now.
    pub connections_active: u64,
    /// Sessions that ended (each counted when it ends).
    pub connections_total: u64,
    /// Sessions closed by a revoke (sessions/close, stop, delete); also in `connections_total`.
    pub connections_revoked: u64,
    /// Bytes from clients to the workspace, including open sessions' flushed bytes.
    pub bytes_in: u64,
    /// Bytes from the workspace to clients, likewise.
    pub bytes_out: u64,
    /// Last time a session opened, ended or moved a byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    last_activity_ms: u64,
}

/// Every service of one environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    pub services: BTreeMap<String, ServiceActivity>,
}

impl Activity {
    /// Reads the counters of `env_id`'s services: its port routes (`held`; port 0: none) and
    /// its name routes, summed per service. A port whose slot holds no route of this
    /// environment (stopped, or not yet published) and a name without a route read as zero.
    pub fn read(table: &Table, env_id: &str, held: &[(u16, Service)]) -> Activity {
        let now = gpugate_routes::now_ms();
        let env = env_id.parse().ok();
        let mut services = BTreeMap::new();
        for &(port, service) in held {
            let ours = port != 0
                && matches!(table.lookup(port, now), Lookup::Live(r) | Lookup::Expired(r) if r.env_id.as_str() == env_id);
            let mut a = ServiceActivity { port, ..ServiceActivity::default() };
            let mut c = if ours { table.counters(port) } else { Counters::default() };
            if let Some(slot) = env.and_then(|e| table.host_slot(HostKey::new(e, service))) {
                let n = table.counters(slot);
                c.connections_active += n.connections_active;
                c.connections_total += n.connections_total;
                c.revoked_total += n.revoked_total;
                c.bytes_in += n.bytes_in;
                c.bytes_out += n.bytes_out;
                c.last_activity_ms = c.last_activity_ms.max(n.last_activity_ms);
            }
            a.connections_active = c.connections_active;
            a.connections_total = c.connections_total;
            a.connections_revoked = c.revoked_total;
            a.bytes_in = c.bytes_in;
            a.bytes_out = c.bytes_out;
            a.last_activity_ms = c.last_activity_ms;
            a.last_activity_at = (c.last_activity_ms > 0)
                .then(|| DateTime::from_timestamp_millis(i64::try_from(c.last_activity_ms).ok()?))
                .flatten();
            services.insert(service.as_str().to_string(), a);
        }
        Activity { services }
    }

    /// Sessions open now, across services.
    pub fn connections_active(&self) -> u64 {
        self.services.values().map(|s| s.connections_active).sum()
    }

    /// The latest activity of any service, unix ms (0: none).
    pub fn last_activity_ms(&self) -> u64 {
        self.services.values().map(|s| s.last_activity_ms).max().unwrap_or(0)
    }

    /// How long the environment has been idle under `policy` at `now_ms`, in ms, counting
    /// from the later of its last activity and `running_since` (when it last started: the
    /// counters begin there; unknown counts as now). Under `no_connections` an open session
    /// means not idle at all.
    pub fn idle_ms(&self, policy: IdlePolicy, running_since: Option<DateTime<Utc>>, now_ms: u64) -> u64 {
        let since_ms = running_since.map_or(now_ms, |t| u64::try_from(t.timestamp_millis()).unwrap_or(0));
        idle_ms(policy, self.connections_active(), self.last_activity_ms(), since_ms, now_ms)
    }
}

/// The idle rule on plain numbers (see [`Activity::idle_ms`]).
pub fn idle_ms(policy: IdlePolicy, open: u64, last_activity_ms: u64, since_ms: u64, now_ms: u64) -> u64 {
    if policy == IdlePolicy::NoConnections && open > 0 {
        return 0;
    }
    now_ms.saturating_sub(last_activity_ms.max(since_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_rule() {
        let (c, t) = (IdlePolicy::NoConnections, IdlePolicy::NoTraffic);
        // Nothing ever happened: idle since the start.
        assert_eq!(idle_ms(c, 0, 0, 1_000, 61_000), 60_000);
        // The last byte moved after the start: idle since then.
        assert_eq!(idle_ms(c, 0, 31_000, 1_000, 61_000), 30_000);
        // Counters older than the start (a restart reuses nothing, but be safe): the start.
        assert_eq!(idle_ms(t, 0, 500, 1_000, 61_000), 60_000);
        // An open, silent session keeps it busy only under no_connections.
        assert_eq!(idle_ms(c, 1, 1_000, 1_000, 61_000), 0);
        assert_eq!(idle_ms(t, 1, 1_000, 1_000, 61_000), 60_000);
        // A clock step backwards never underflows.
        assert_eq!(idle_ms(t, 0, 70_000, 1_000, 61_000), 0);
    }
}
