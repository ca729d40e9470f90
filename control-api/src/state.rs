//! The state shared by handlers, the lifecycle, the reconciler and the publisher.

use std::sync::Arc;

use crate::config::Config;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::ops::{Liveness, Operations};
use crate::publisher_status::PublisherStatus;
use crate::publisher::Resync;
use crate::table_view::TableView;

/// Everything a request needs; cheap to clone.
pub type AppState = Arc<State>;

/// See [`AppState`].
pub struct State {
    /// Configuration read at start (pools may be re-synced from a re-read file).
    pub cfg: Arc<Config>,
    /// The database.
    pub db: Db,
    /// Every host's Docker client, by host name (`fleet.local()`: this API's own engine).
    pub fleet: crate::fleet::Fleet,
    /// Metrics of this process.
    pub metrics: Metrics,
    /// Readiness probers of this process.
    pub readiness: Arc<crate::readiness::Prober>,
    /// Read view of the route table.
    pub table: Arc<TableView>,
    /// The publisher's state in this process.
    pub publisher: Arc<PublisherStatus>,
    /// Asks this process's publisher for a whole-table re-sync.
    pub resync: Resync,
    /// This process's instance id (its liveness lock key).
    pub instance: i64,
    /// Whether this process holds its liveness lock now.
    pub liveness: Arc<Liveness>,
    /// The lifecycle operations running in this process.
    pub ops: Operations,
    /// What `/readyz` last logged per dependency (each failure is logged once per change).
    pub ready_log: crate::ready_log::ReadyLog,
    /// The deployment's SSH host CA (certifies every workspace's host key).
    pub host_ca: crate::ssh_identity::HostCa,
}

impl State {
    /// Aborts the process if the testing fault `crash:<point>` is armed (crash-safety tests;
    /// only in builds with the `fault-injection` feature).
    pub fn crash_point(&self, point: &str) {
        if cfg!(feature = "fault-injection") && self.cfg.fault_is("crash", point) {
            tracing::warn!(point, "fault injection: aborting the process");
            std::process::abort();
        }
    }

    /// Whether the testing fault `fail:<point>` is armed (only with `fault-injection`).
    pub fn fail_point(&self, point: &str) -> bool {
        cfg!(feature = "fault-injection") && self.cfg.fault_is("fail", point)
    }

    /// Sleeps for `ms` milliseconds if the testing fault `sleep:<point>:<ms>` is armed (only
    /// with `fault-injection`): a window in which a test can take the process's claims away.
    pub async fn pause_point(&self, point: &str) {
        if !cfg!(feature = "fault-injection") {
            return;
        }
        let Some(ms) = self.cfg.fault.as_deref().and_then(|f| f.strip_prefix("sleep:")).and_then(|rest| {
            let (p, ms) = rest.rsplit_once(':')?;
            (p == point).then(|| ms.parse::<u64>().ok()).flatten()
        }) else {
            return;
        };
        tracing::warn!(point, ms, "fault injection: pausing");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}
