//! The active publisher's row in the gateway registry (`db::gateways`): renewed after each
//! whole-table sync, on a heartbeat, and when a barrier confirms a higher applied generation.
//!
//! The publisher only signals ([`Registry::synced`], [`Registry::applied_changes`],
//! [`Registry::on_barrier`]); one task of its own does the database work, so a slow or
//! unreachable database never holds up the table. Signals coalesce in a `watch` channel: a
//! storm of route batches costs one barrier per round trip and one row update per barrier
//! that comes back, never one per route. Registry errors are logged once per change and never
//! stop publishing: the data plane does not depend on the registry.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::db::{gateways, Db};
use crate::publisher_status::PublisherStatus;

/// The longest one registry call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Who this gateway is (from the configuration).
#[derive(Clone, Debug)]
pub struct Identity {
    /// `gateway_name`.
    pub name: String,
    /// `gateway_heartbeat_ms`.
    pub heartbeat: Duration,
    /// `gateway_activity_report_ms` (zero: this gateway reports no activity).
    pub activity_report: Duration,
}

/// What the publisher has done, as the registry task last heard it.
#[derive(Clone, Debug, Default, PartialEq)]
struct Progress {
    /// When the last whole-table sync finished (`None`: no row is written before the first).
    synced_at: Option<Instant>,
    /// The highest watermark a barrier of this run confirmed.
    applied: Option<i64>,
    /// Barriers asked for, as a counter: the task sends one for every change it sees.
    barriers_wanted: u64,
    /// Bumped when the notification listener is interrupted: a barrier sent before may
    /// arrive after notifications that were lost with the connection, so it is void.
    epoch: u64,
}

/// The registry side of one publishing run (from taking the table to letting it go);
/// dropping it stops its task, so a writer that lost the table stops beating.
pub struct Registry {
    progress: watch::Sender<Progress>,
    /// `<name>/<nonce>`: this run's barriers carry it, with the epoch.
    token: String,
    status: Arc<PublisherStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn epoch_token(token: &str, epoch: u64) -> String {
    format!("{token}/{epoch}")
}

impl Registry {
    /// Starts reporting for the writer of `table` (after it took the table).
    pub fn start(db: Db, id: &Identity, table: &Path, status: Arc<PublisherStatus>) -> Registry {
        let token = format!("{}/{}", id.name, crate::ids::nonce());
        let (tx, rx) = watch::channel(Progress::default());
        let task = Task {
            db,
            id: id.clone(),
            table: table.display().to_string(),
            token: token.clone(),
            started: Instant::now(),
            status: status.clone(),
            beat_failure: None,
            barrier_failure: None,
        };
        Registry { progress: tx, token, status, task: tokio::spawn(task.run(rx)) }
    }

    /// A whole-table sync finished: renew the row and learn the generation the table holds.
    pub fn synced(&self) {
        self.progress.send_modify(|p| {
            p.synced_at = Some(Instant::now());
            p.barriers_wanted += 1;
        });
    }

    /// Route changes were applied: learn the new watermark (coalesced with any request
    /// still pending).
    pub fn applied_changes(&self) {
        self.progress.send_modify(|p| p.barriers_wanted += 1);
    }

    /// The notification listener was interrupted: barriers sent before are void.
    pub fn interrupted(&self) {
        self.progress.send_modify(|p| p.epoch += 1);
    }

    /// A barrier notification arrived, so every route change notified before it has been
    /// applied: if it is one of this run's, of the current epoch, the table holds its
    /// watermark. Other publishers' barriers are ignored.
    pub fn on_barrier(&self, payload: &str) {
        let Some((token, watermark)) = gateways::parse_barrier(payload) else {
            tracing::warn!(payload, "unreadable gateway barrier ignored");
            return;
        };
        let raised = self.progress.send_if_modified(|p| {
            if token != epoch_token(&self.token, p.epoch) || p.applied >= Some(watermark) {
                return false;
            }
            p.applied = Some(watermark);
            true
        });
        if raised {
            self.status.applied_generation.fetch_max(watermark, Ordering::Relaxed);
            tracing::debug!(generation = watermark, "route generation applied");
        }
    }
}

/// The task that talks to the database.
struct Task {
    db: Db,
    id: Identity,
    table: String,
    token: String,
    started: Instant,
    status: Arc<PublisherStatus>,
    /// The last failure of each call (logged once per change, not per beat).
    beat_failure: Option<String>,
    barrier_failure: Option<String>,
}

impl Task {
    async fn run(mut self, mut rx: watch::Receiver<Progress>) {
        let mut beat = tokio::time::interval(self.id.heartbeat);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // What the row holds (sync time, applied) and how many barriers were sent.
        let mut written: Option<(Option<Instant>, Option<i64>)> = None;
        let mut barriers_sent = 0u64;
        loop {
            let due = tokio::select! {
                _ = beat.tick() => true,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
            };
            let p = rx.borrow_and_update().clone();
            if p.synced_at.is_none() {
                continue;
            }
            let mut lagging = false;
            if due || written != Some((p.synced_at, p.applied)) {
                match self.beat(&p).await {
                    Ok(current) => {
                        written = Some((p.synced_at, p.applied));
                        // Generations handed out since the last barrier (a create that rolled
                        // back notifies nothing): ask again, once per beat while behind.
                        lagging = current > p.applied.unwrap_or(0);
                    }
                    // Written again at the next wake, whatever it is.
                    Err(_) => written = None,
                }
            }
            if p.barriers_wanted > barriers_sent || (due && lagging) {
                barriers_sent = p.barriers_wanted;
                self.barrier(p.epoch).await;
            }
        }
    }

    /// Writes the row; returns the newest generation handed out.
    async fn beat(&mut self, p: &Progress) -> Result<i64, String> {
        let beat = gateways::Beat {
            name: &self.id.name,
            applied_generation: p.applied,
            heartbeat_ms: u64::try_from(self.id.heartbeat.as_millis()).unwrap_or(u64::MAX),
            sync_age_s: p.synced_at.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            started_age_s: self.started.elapsed().as_secs_f64(),
            table_path: &self.table,
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
        };
        let result = match tokio::time::timeout(CALL_TIMEOUT, gateways::beat(&self.db, &beat)).await {
            Ok(Ok(current)) => Ok(current),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        self.status.registered.store(result.is_ok(), Ordering::Relaxed);
        note(&mut self.beat_failure, &self.id.name, "renewing the row", result.as_ref().err());
        result
    }

    /// Sends a barrier of this run and `epoch`; the publisher raises the applied generation
    /// when it comes back on the listener.
    async fn barrier(&mut self, epoch: u64) {
        let token = epoch_token(&self.token, epoch);
        let result = match tokio::time::timeout(CALL_TIMEOUT, gateways::barrier(&self.db, &token)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        note(&mut self.barrier_failure, &self.id.name, "sending a generation barrier", result.as_ref().err());
    }
}

/// Logs a call's failure when it starts or changes, and its recovery, once each.
fn note(last: &mut Option<String>, gateway: &str, what: &str, now: Option<&String>) {
    match (last.as_deref(), now) {
        (prev, Some(e)) if prev != Some(e.as_str()) => {
            tracing::warn!(gateway, error = %e, "gateway registry: {what} failed; publishing goes on");
            *last = Some(e.clone());
        }
        (Some(_), None) => {
            tracing::info!(gateway, "gateway registry: {what} works again");
            *last = None;
        }
        _ => {}
    }
}
