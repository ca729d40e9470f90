//! The publisher's activity reports: what this gateway's table counted, sent to PostgreSQL
//! so the API can sum activity over the whole fleet ([`crate::db::activity`]).
//!
//! Every `gateway_activity_report_ms` the publisher takes a [`snapshot`] of its table (one
//! pass over the port slots and the hostname region, between two route batches) and offers
//! it to the [`Reporter`]. The reporter's own task sends only what changed since its last
//! successful report (routes whose counters moved, routes that left the table), in one
//! transaction, and renews the gateway's report time even when nothing moved: a report time
//! that stops advancing tells the idle task that this gateway's sessions are unknown. Offers
//! coalesce: a slow database costs a late report, never a queue. Errors are logged once per
//! change and never stop publishing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gpugate_routes::{Counters, EnvId, Service, Writer};
use tokio::sync::watch;

use crate::db::activity::{self, Reported};
use crate::db::Db;
use crate::metrics::Metrics;

/// The longest one report may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// What one (environment, service) counted on this gateway: its port route and its name
/// route summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The public port (0: reached by name only).
    pub port: u16,
    /// The newest route generation of the two.
    pub generation: u64,
    pub counters: Counters,
}

/// A table's counters per (environment, service). Keys and values are plain words: a pass
/// over 10,000 routes allocates one map, not a string per route; rows are spelled out only
/// for what changed ([`diff`]).
pub type Snapshot = HashMap<(EnvId, Service), Seen>;

fn add(into: &mut Counters, c: &Counters) {
    into.connections_active += c.connections_active;
    into.connections_total += c.connections_total;
    into.revoked_total += c.revoked_total;
    into.bytes_in += c.bytes_in;
    into.bytes_out += c.bytes_out;
    into.last_activity_ms = into.last_activity_ms.max(c.last_activity_ms);
}

/// Reads the counters of every route in `writer`'s table (live or expired; routes of no
/// environment are skipped) in one pass over the slots it routed, the port route and the name
/// route of one (environment, service) summed. `hint`: how many keys the last snapshot had
/// (sizes the map once).
pub fn snapshot(writer: &Writer, hint: usize) -> Snapshot {
    let mut out = Snapshot::with_capacity(hint);
    for (key, route, counters) in writer.counted_routes() {
        if route.env_id.as_str().is_empty() {
            continue;
        }
        let e = out.entry((route.env_id, route.service)).or_default();
        if let Some(port) = key.as_port() {
            e.port = port;
        }
        e.generation = e.generation.max(route.generation);
        add(&mut e.counters, &counters);
    }
    out
}

fn row((env, service): &(EnvId, Service), seen: &Seen) -> Reported {
    Reported {
        env_id: env.as_str().to_string(),
        service: service.as_str().to_string(),
        port: seen.port,
        generation: seen.generation,
        counters: seen.counters,
    }
}

/// What changed from `last` (`None`: nothing reported yet) to `now`: rows to write and keys
/// to delete.
pub fn diff(last: Option<&Snapshot>, now: &Snapshot) -> (Vec<Reported>, Vec<(String, String)>) {
    let changed = now.iter().filter(|(k, s)| last.and_then(|l| l.get(*k)) != Some(*s)).map(|(k, s)| row(k, s)).collect();
    let gone = last.map_or_else(Vec::new, |l| {
        l.keys().filter(|k| !now.contains_key(*k)).map(|(e, s)| (e.as_str().to_string(), s.as_str().to_string())).collect()
    });
    (changed, gone)
}

/// One publishing run's reporter; dropping it stops its task (a writer that lost its table
/// stops reporting, and its report time goes stale).
pub struct Reporter {
    offers: watch::Sender<Option<Arc<Snapshot>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reporter {
    /// Starts reporting as gateway `gateway`, promising a report every `every`.
    pub fn start(db: Db, gateway: &str, every: Duration, metrics: Metrics) -> Reporter {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(run(db, gateway.to_string(), every, metrics, rx));
        Reporter { offers: tx, task }
    }

    /// Hands over the newest snapshot (replacing one not sent yet).
    pub fn offer(&self, snapshot: Snapshot) {
        self.offers.send_replace(Some(Arc::new(snapshot)));
    }
}

async fn run(db: Db, gateway: String, every: Duration, metrics: Metrics, mut rx: watch::Receiver<Option<Arc<Snapshot>>>) {
    let report_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    // What the database holds of this gateway (None: unknown, replace it all next time).
    let mut last: Option<Arc<Snapshot>> = None;
    let mut failure: Option<String> = None;
    while rx.changed().await.is_ok() {
        let Some(now) = rx.borrow_and_update().clone() else { continue };
        let (changed, gone) = diff(last.as_deref(), &now);
        let call = activity::report(&db, &gateway, report_ms, last.is_none(), &changed, &gone);
        let result = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        match result {
            Ok(()) => {
                metrics.activity_reports.with_label_values(&["ok"]).inc();
                if failure.take().is_some() {
                    tracing::info!(gateway, "activity reports work again");
                }
                tracing::trace!(gateway, changed = changed.len(), gone = gone.len(), "activity reported");
                last = Some(now);
            }
            Err(e) => {
                metrics.activity_reports.with_label_values(&["failed"]).inc();
                if failure.as_deref() != Some(e.as_str()) {
                    tracing::warn!(gateway, error = %e, "reporting activity failed; publishing goes on");
                    failure = Some(e);
                }
                last = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(env: &str) -> (EnvId, Service) {
        (env.parse().unwrap(), Service::Ssh)
    }

    fn seen(bytes: u64) -> Seen {
        Seen { port: 20000, generation: 1, counters: Counters { bytes_in: bytes, ..Counters::default() } }
    }

    fn reported(env: &str, bytes: u64) -> Reported {
        row(&key(env), &seen(bytes))
    }

    #[test]
    fn only_what_moved_is_sent_and_what_left_is_deleted() {
        let a: Snapshot = [(key("a"), seen(1)), (key("b"), seen(1))].into_iter().collect();
        // Nothing reported yet: everything.
        let (changed, gone) = diff(None, &a);
        assert_eq!((changed.len(), gone.len()), (2, 0));
        // Same again: nothing.
        assert_eq!(diff(Some(&a), &a), (vec![], vec![]));
        // b moved, a left, c came.
        let b: Snapshot = [(key("b"), seen(5)), (key("c"), seen(0))].into_iter().collect();
        let (mut changed, gone) = diff(Some(&a), &b);
        changed.sort_by(|x, y| x.env_id.cmp(&y.env_id));
        assert_eq!(changed, vec![reported("b", 5), reported("c", 0)]);
        assert_eq!(gone, vec![("a".to_string(), "ssh".to_string())]);
    }
}
