//! The API's read-only view of the route table: opened when the file exists, re-validated on
//! every use; operations wait on it for their routes to be live, gone or revoked, and the
//! metrics and the debug view read it. The publisher ([`crate::publisher`]) writes the table.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpugate_routes::{Error as TableError, HostKey, Lookup, Route, Table};

/// The API's read-only view of the table (opened when the file exists).
pub struct TableView {
    path: PathBuf,
    table: Mutex<Option<Arc<Table>>>,
}

impl TableView {
    /// A view of the table at `path`.
    pub fn new(path: &Path) -> TableView {
        TableView { path: path.to_owned(), table: Mutex::new(None) }
    }

    /// The path of the table.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mapped table, opening it on first use; an error if it is missing or invalid.
    pub fn get(&self) -> Result<Arc<Table>, TableError> {
        let mut guard = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = guard.as_ref() {
            t.validate()?;
            return Ok(t.clone());
        }
        let t = Arc::new(Table::open_read_only(&self.path)?);
        *guard = Some(t.clone());
        Ok(t)
    }

    /// Waits until every `(port, route)` and every name route is live in the table with
    /// that route's generation and upstream; false on time-out.
    pub async fn wait_live(&self, routes: &[(u16, Route)], names: &[Route], timeout: Duration) -> bool {
        let same = |found: Lookup, want: &Route| {
            matches!(found, Lookup::Live(r) if r.generation == want.generation
                && r.upstream == want.upstream && r.env_id == want.env_id)
        };
        self.wait(timeout, |t| {
            let now = gpugate_routes::now_ms();
            routes.iter().all(|(port, want)| same(t.lookup(*port, now), want))
                && names.iter().all(|want| same(t.lookup_host(HostKey::of(want), now).0, want))
        })
        .await
    }

    /// Waits until `env_id` has no name route in the table for any of `services`, and no
    /// session open on one; false on time-out.
    pub async fn wait_names_gone(&self, env_id: &str, services: &[gpugate_routes::Service], timeout: Duration) -> bool {
        let Ok(env) = env_id.parse::<gpugate_routes::EnvId>() else { return true };
        self.wait(timeout, |t| {
            services.iter().all(|svc| t.host_slot(HostKey::new(env, *svc)).is_none())
        })
        .await
    }

    /// Waits until none of `ports` routes to `env_id`; false on time-out.
    pub async fn wait_gone(&self, ports: &[u16], env_id: &str, timeout: Duration) -> bool {
        self.wait(timeout, |t| {
            let now = gpugate_routes::now_ms();
            ports.iter().all(|port| match t.lookup(*port, now) {
                Lookup::Live(r) | Lookup::Expired(r) => r.env_id.as_str() != env_id,
                Lookup::Absent => true,
                Lookup::Busy => false,
            })
        })
        .await
    }

    /// Waits until no session is open on any of `ports` (their routes removed and revoked:
    /// nginx closes the sessions within its flush interval); false on time-out.
    pub async fn wait_sessions_closed(&self, ports: &[u16], timeout: Duration) -> bool {
        self.wait(timeout, |t| ports.iter().all(|p| t.counters(*p).connections_active == 0)).await
    }

    /// Waits until every `(port, epoch)` has reached that revoke epoch; false on time-out.
    pub async fn wait_revoked(&self, targets: &[(u16, u64)], timeout: Duration) -> bool {
        self.wait(timeout, |t| targets.iter().all(|(port, epoch)| t.revoke_epoch(*port) >= *epoch)).await
    }

    /// Waits until each name route `(service, epoch)` of `env` has reached that revoke
    /// epoch; false on time-out.
    pub async fn wait_names_revoked(
        &self,
        env: gpugate_routes::EnvId,
        targets: &[(gpugate_routes::Service, u64)],
        timeout: Duration,
    ) -> bool {
        self.wait(timeout, |t| {
            targets.iter().all(|(svc, epoch)| {
                t.host_slot(HostKey::new(env, *svc)).is_some_and(|slot| t.revoke_epoch(slot) >= *epoch)
            })
        })
        .await
    }

    async fn wait(&self, timeout: Duration, done: impl Fn(&Table) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(t) = self.get() {
                if done(&t) {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
