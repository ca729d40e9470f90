//! What the publisher is doing, as the publisher, the gateway registry, the probes and the
//! debug view read it: a value below both [`crate::publisher`] and [`crate::registry`], so the
//! publisher imports the registry and nothing imports back.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};

/// What the publisher is doing, for health checks and the debug view.
#[derive(Debug, Default)]
pub struct PublisherStatus {
    /// Whether this process holds the writer lock and has synced.
    pub active: AtomicBool,
    /// When the last whole-table sync finished (unix ms).
    pub last_sync_ms: AtomicU64,
    /// Whole-table syncs done.
    pub syncs: AtomicU64,
    /// When the writer last renewed the table's heartbeat (unix ms).
    pub last_heartbeat_ms: AtomicU64,
    /// The route generation the table is known to hold: every committed change up to it is
    /// applied (a barrier's watermark; 0: none confirmed yet).
    pub applied_generation: AtomicI64,
    /// Whether the last write to the gateway registry succeeded.
    pub registered: AtomicBool,
}
