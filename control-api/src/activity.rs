//! What the gateways saw of a workspace: per-service sessions and bytes from the route tables'
//! counters (nginx flushes them while sessions are open), summed over every fresh gateway
//! from their reports ([`crate::activity_report`], [`crate::db::activity`]), and the idle rule
//! built on them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use gpugate_routes::Service;
use serde::Serialize;

use crate::config::IdlePolicy;
use crate::db::activity::ServiceSum;
use crate::db::envs::EnvRow;
use crate::db::Db;

/// One service's traffic through the gateways since the environment last started.
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
    /// Builds the activity of an environment's services (`held`: port, service; port 0:
    /// by name only) from the counters summed over every fresh gateway (by service name; a
    /// service no gateway reported reads as zero).
    pub fn from_sums(held: &[(u16, Service)], sums: &BTreeMap<String, ServiceSum>) -> Activity {
        let mut services = BTreeMap::new();
        for &(port, service) in held {
            let u = |v: i64| u64::try_from(v).unwrap_or(0);
            let mut a = ServiceActivity { port, ..ServiceActivity::default() };
            if let Some(c) = sums.get(service.as_str()) {
                a.connections_active = u(c.connections_active);
                a.connections_total = u(c.connections_total);
                a.connections_revoked = u(c.revoked_total);
                a.bytes_in = u(c.bytes_in);
                a.bytes_out = u(c.bytes_out);
                a.last_activity_ms = u(c.last_activity_ms);
                a.last_activity_at = (a.last_activity_ms > 0)
                    .then(|| DateTime::from_timestamp_millis(c.last_activity_ms))
                    .flatten();
            }
            services.insert(service.as_str().to_string(), a);
        }
        Activity { services }
    }

    /// Reads the activity of every endpoint of `env` (services reached by name only, which
    /// hold no pool port, included) from the gateways' reports; returns the endpoints too.
    pub async fn of_env(db: &Db, env: &EnvRow) -> Result<(Vec<(u16, Service)>, Activity), sqlx::Error> {
        let held = crate::db::ports::env_endpoints(db.pool(), &env.id, &env.services).await?;
        let activity = Activity::from_sums(&held, &crate::db::activity::of_env(db, &env.id).await?);
        Ok((held, activity))
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
