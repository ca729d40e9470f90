//! The publisher: database rows to route-table slots (the table's one writer). The API's
//! read-only view of the table is [`crate::table_view`].
//!
//! The publisher takes the table's `flock` (among several API processes on one host, the lock
//! elects one; the others stand by and poll it), re-syncs the whole table from the `routes`
//! table, then applies each committed change announced on `LISTEN gpugate_routes`. Every
//! reconcile pass asks it for another whole re-sync, so a missed notification costs at most one
//! interval. Only this module writes the table.
//!
//! While it holds the table, the publisher also reports to the gateway registry
//! ([`crate::registry`]): it signals each sync and each batch of changes, and hands over the
//! generation barriers that come back on its listener.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use gpugate_routes::{Error as TableError, HostKey, LockMode, Route, Writer};
use sqlx::postgres::PgListener;
use tokio::sync::{watch, Notify};

use crate::activity_report::{self, Reporter};
use crate::db::routes::RouteKey;
use crate::db::{self, Db};
use crate::metrics::Metrics;
use crate::publisher_status::PublisherStatus;
use crate::registry::{Identity, Registry};

/// How often a standby publisher tries the lock.
const STANDBY_POLL: Duration = Duration::from_millis(100);

/// Handle to ask the running publisher for a whole-table re-sync.
#[derive(Clone, Default)]
pub struct Resync(Arc<Notify>);

impl Resync {
    /// Asks for a re-sync (coalesced with any pending one).
    pub fn request(&self) {
        self.0.notify_one();
    }
}

/// The table's single writer.
pub struct Publisher {
    db: Db,
    path: PathBuf,
    /// Hostname slots of a table this publisher creates (an existing one must match).
    host_slots: u32,
    metrics: Metrics,
    status: Arc<PublisherStatus>,
    resync: Resync,
    /// This gateway's name and heartbeat in the registry.
    identity: Identity,
}

impl Publisher {
    /// A publisher for the table at `path` (with `host_slots` hostname slots), reporting to
    /// the gateway registry as `identity`.
    pub fn new(
        db: Db,
        path: &Path,
        host_slots: u32,
        metrics: Metrics,
        status: Arc<PublisherStatus>,
        resync: Resync,
        identity: Identity,
    ) -> Self {
        Publisher { db, path: path.to_owned(), host_slots, metrics, status, resync, identity }
    }

    /// Runs until `shutdown` turns true: stands by for the lock, then publishes; on any error
    /// lets go of the lock (another process may take over) and starts again.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let Some(writer) = self.acquire(&mut shutdown).await else { return };
            let result = self.serve(writer, &mut shutdown).await;
            self.status.active.store(false, Ordering::Relaxed);
            self.status.registered.store(false, Ordering::Relaxed);
            self.metrics.publisher_active.set(0);
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "publisher stopped; letting go of the table");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }

    async fn acquire(&self, shutdown: &mut watch::Receiver<bool>) -> Option<Writer> {
        let mut last_cause: Option<String> = None;
        loop {
            if *shutdown.borrow() {
                return None;
            }
            let (path, slots) = (self.path.clone(), self.host_slots);
            let opened =
                tokio::task::spawn_blocking(move || Writer::open_with(&path, LockMode::NoWait, slots)).await;
            match opened {
                Ok(Ok(w)) => {
                    tracing::info!(table = %self.path.display(), "publisher holds the route table");
                    return Some(w);
                }
                Ok(Err(e)) => {
                    // Log each cause once, not every poll.
                    let cause = match &e {
                        TableError::Locked { holder, .. } => format!("locked:{holder:?}"),
                        other => other.cause().to_string(),
                    };
                    if last_cause.as_deref() != Some(&cause) {
                        if matches!(e, TableError::Locked { .. }) {
                            tracing::info!("publisher standing by: {e}");
                        } else {
                            tracing::error!("publisher cannot open the route table: {e}");
                        }
                        last_cause = Some(cause);
                    }
                }
                Err(e) => tracing::error!(error = %e, "publisher open task failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(STANDBY_POLL) => {}
                _ = shutdown.changed() => return None,
            }
        }
    }

    async fn serve(&self, mut writer: Writer, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut listener = PgListener::connect_with(self.db.pool()).await?;
        // Barriers on the same connection: they arrive in commit order with the routes'.
        listener.listen_all([db::routes::CHANNEL, db::gateways::BARRIER_CHANNEL, db::close_requests::CHANNEL]).await?;
        // The listener runs in its own task and hands batches over a channel, so the loop
        // below only ever waits on cancel-safe futures.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Notice>(1024);
        let forward = tokio::spawn(forward_notifications(listener, tx));
        let _abort = AbortOnDrop(forward);
        // Listening before the first sync: nothing committed in between is missed.
        self.full_sync(&mut writer).await?;
        self.status.active.store(true, Ordering::Relaxed);
        self.metrics.publisher_active.set(1);
        // Only the active writer reports; dropped (its task stopped) when this run ends.
        let registry = Registry::start(self.db.clone(), &self.identity, &self.path, self.status.clone());
        registry.synced();
        let reporting = (!self.identity.activity_report.is_zero()).then(|| {
            let r = Reporter::start(self.db.clone(), &self.identity.name, self.identity.activity_report, self.metrics.clone());
            let mut tick = tokio::time::interval(self.identity.activity_report);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            (r, tick)
        });
        let (reporter, mut report_tick) = reporting.unzip();
        // Keys of the last snapshot: sizes the next one's map at once.
        let mut reported_keys = 0;
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                _ = self.resync.0.notified() => {
                    self.full_sync(&mut writer).await?;
                    registry.synced();
                }
                // An error: the table was deleted, replaced or truncated under us; let go and
                // open it again (which creates a fresh one).
                _ = heartbeat.tick() => {
                    writer.heartbeat()?;
                    self.status.last_heartbeat_ms.store(gpugate_routes::now_ms(), Ordering::Relaxed);
                }
                // Between route batches: one pass over the table's counters, sent by the
                // reporter's own task.
                _ = tick_or_never(&mut report_tick) => {
                    if let Some(r) = &reporter {
                        let snapshot = activity_report::snapshot(&writer, reported_keys);
                        reported_keys = snapshot.len();
                        r.offer(snapshot);
                    }
                }
                notice = rx.recv() => match notice {
                    Some(Notice::Changes(ports, names, barriers, closes)) => {
                        self.apply(&mut writer, &ports).await?;
                        self.apply(&mut writer, &names).await?;
                        if closes {
                            self.apply_close_requests(&mut writer).await?;
                        }
                        if !ports.is_empty() || !names.is_empty() {
                            registry.applied_changes();
                        }
                        // After the batch: everything notified before a barrier is applied.
                        for b in &barriers {
                            registry.on_barrier(b);
                        }
                    }
                    Some(Notice::Interrupted) => {
                        // The listening connection dropped (and reconnects): re-sync to cover
                        // whatever was announced meanwhile.
                        tracing::warn!("route notifications interrupted; re-syncing the table");
                        registry.interrupted();
                        self.full_sync(&mut writer).await?;
                        registry.synced();
                    }
                    Some(Notice::Failed(e)) => anyhow::bail!("listening for route changes: {e}"),
                    None => anyhow::bail!("route notification task ended"),
                },
            }
        }
    }

    /// Brings the table's routes of `keys` (ports or names) to what the database holds now,
    /// and applies the revokes asked for on them.
    async fn apply<K: TableKey>(&self, writer: &mut Writer, keys: &[K]) -> anyhow::Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let wanted = db::routes::desired(&self.db, Some(&keys)).await?;
        let revokes = db::routes::revoke_epochs(&self.db, Some(&keys)).await?;
        for key in keys {
            match wanted.get(&key) {
                Some(route) => {
                    if key.set(writer, route)? {
                        self.metrics.route_writes.with_label_values(&["set"]).inc();
                        tracing::debug!(route = %key.to_text(), env_id = %route.env_id, generation = route.generation, "route set");
                    }
                }
                None => {
                    if key.remove_and_revoke(writer)? {
                        self.metrics.route_writes.with_label_values(&["remove"]).inc();
                        tracing::debug!(route = %key.to_text(), "route removed, its sessions revoked");
                    }
                }
            }
        }
        self.apply_revokes(writer, &revokes)
    }

    /// Raises the revoke epochs that sessions/close asked for (each applied once).
    fn apply_revokes<K: TableKey>(&self, writer: &mut Writer, revokes: &BTreeMap<K, u64>) -> anyhow::Result<()> {
        for (&key, &epoch) in revokes {
            if key.raise_revoke_epoch(writer, epoch)? {
                self.metrics.route_writes.with_label_values(&["revoke"]).inc();
                tracing::info!(route = %key.to_text(), epoch, "sessions revoked on request");
            }
        }
        Ok(())
    }

    async fn full_sync(&self, writer: &mut Writer) -> anyhow::Result<()> {
        let wanted = db::routes::desired_table(&self.db).await?;
        let revokes = db::routes::revoke_epochs::<u16>(&self.db, None).await?;
        let name_revokes = db::routes::revoke_epochs::<HostKey>(&self.db, None).await?;
        let report = writer.sync_all(&wanted.ports, &wanted.names)?;
        self.apply_revokes(writer, &revokes)?;
        self.apply_revokes(writer, &name_revokes)?;
        self.metrics.route_writes.with_label_values(&["sync_set"]).inc_by(report.written as u64);
        self.metrics.route_writes.with_label_values(&["sync_remove"]).inc_by(report.removed as u64);
        // A difference found by a whole sync is a repair: notifications should have kept the
        // table equal to the database.
        self.metrics.repaired("table_route_written", report.written as u64);
        self.metrics.repaired("table_route_removed", report.removed as u64);
        if report.written + report.removed > 0 {
            tracing::info!(
                written = report.written,
                removed = report.removed,
                routes = wanted.ports.len(),
                names = wanted.names.len(),
                "route table re-synced"
            );
            let detail = serde_json::json!({ "written": report.written, "removed": report.removed });
            if let Err(e) = self.db.event(None, "table_resynced", detail).await {
                tracing::warn!(error = %e, "recording re-sync event");
            }
        }
        self.status.last_sync_ms.store(gpugate_routes::now_ms(), Ordering::Relaxed);
        self.status.syncs.fetch_add(1, Ordering::Relaxed);
        // A missed notification costs at most one re-sync.
        self.apply_close_requests(writer).await
    }

    /// Applies every close request this gateway has not applied yet ([`crate::revokes`]),
    /// each once, and records them as applied (after the table write: a crash in between
    /// applies the request again at the restart, which can close only sessions opened in
    /// that instant).
    async fn apply_close_requests(&self, writer: &mut Writer) -> anyhow::Result<()> {
        let gateway = &self.identity.name;
        let pending = db::close_requests::pending(&self.db, gateway).await?;
        let mut ids = Vec::with_capacity(pending.len());
        for req in &pending {
            let done = crate::revokes::apply(writer, req)?;
            self.metrics.route_writes.with_label_values(&["revoke"]).inc_by(done.revoked as u64);
            tracing::info!(env_id = %req.env_id, request = req.id, revoked = done.revoked, moved_on = done.moved_on, "sessions closed on request");
            ids.push(req.id);
        }
        db::close_requests::mark_applied(&self.db, gateway, &ids).await?;
        Ok(())
    }
}

/// The next tick of `tick`; never without one. (Cancel-safe, as [`tokio::time::Interval::tick`].)
async fn tick_or_never(tick: &mut Option<tokio::time::Interval>) {
    match tick {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// How the publisher writes routes of one kind of key (a port, a name) into the table.
///
/// `remove_and_revoke` removes a route and revokes the sessions still open on it: a route
/// leaves the database when its environment stops, is deleted or fails, and each of those must
/// end its sessions too (nginx closes them within `gpugate_flush_interval`), before the
/// container goes. The route goes first and the revoke after it (the writer's methods keep
/// that order), so no connection between the two steps can get the old route with the new
/// epoch; sessions are revoked only where there was a route.
trait TableKey: RouteKey {
    fn set(self, writer: &mut Writer, route: &Route) -> Result<bool, TableError>;
    fn remove_and_revoke(self, writer: &mut Writer) -> Result<bool, TableError>;
    fn raise_revoke_epoch(self, writer: &mut Writer, at_least: u64) -> Result<bool, TableError>;
}

impl TableKey for u16 {
    fn set(self, writer: &mut Writer, route: &Route) -> Result<bool, TableError> {
        writer.set(self, route)
    }

    fn remove_and_revoke(self, writer: &mut Writer) -> Result<bool, TableError> {
        writer.remove_and_revoke(self)
    }

    fn raise_revoke_epoch(self, writer: &mut Writer, at_least: u64) -> Result<bool, TableError> {
        writer.raise_revoke_epoch(self, at_least)
    }
}

impl TableKey for HostKey {
    fn set(self, writer: &mut Writer, route: &Route) -> Result<bool, TableError> {
        Ok(writer.set_host(route)?.changed)
    }

    fn remove_and_revoke(self, writer: &mut Writer) -> Result<bool, TableError> {
        writer.remove_and_revoke_host(self)
    }

    fn raise_revoke_epoch(self, writer: &mut Writer, at_least: u64) -> Result<bool, TableError> {
        writer.raise_host_revoke_epoch(self, at_least)
    }
}

/// What the notification task hands to the publisher.
enum Notice {
    /// Ports and name keys whose routes changed, gateway barriers (payloads), and whether a
    /// close request came, in one batch.
    Changes(Vec<u16>, Vec<HostKey>, Vec<String>, bool),
    /// The connection dropped; notifications may have been lost.
    Interrupted,
    /// Listening failed for good.
    Failed(String),
}

/// Aborts a task when dropped (the publisher letting go of the table).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads notifications and sends them on in batches (everything already buffered at once).
async fn forward_notifications(mut listener: PgListener, tx: tokio::sync::mpsc::Sender<Notice>) {
    loop {
        let notice = match listener.try_recv().await {
            Ok(Some(first)) => {
                let (mut ports, mut names, mut barriers, mut closes) = (vec![], vec![], vec![], false);
                let mut take = |n: &sqlx::postgres::PgNotification| {
                    if n.channel() == db::gateways::BARRIER_CHANNEL {
                        barriers.push(n.payload().to_string());
                        return;
                    }
                    if n.channel() == db::close_requests::CHANNEL {
                        closes = true;
                        return;
                    }
                    match db::routes::parse_notice(n.payload()) {
                        Some(Ok(port)) => ports.push(port),
                        Some(Err(key)) => names.push(key),
                        None => tracing::warn!(payload = n.payload(), "unreadable route notification ignored"),
                    }
                };
                take(&first);
                while let Some(more) = listener.next_buffered() {
                    take(&more);
                }
                Notice::Changes(ports, names, barriers, closes)
            }
            Ok(None) => Notice::Interrupted,
            Err(e) => {
                let _ = tx.send(Notice::Failed(e.to_string())).await;
                return;
            }
        };
        if tx.send(notice).await.is_err() {
            return;
        }
    }
}
