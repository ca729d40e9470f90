//! A mapped counters file as one process counts into it: the file and this process's worker
//! row, claimed at worker start and claimed again later if none could be had then.

use std::cell::Cell;

use gpugate_routes::{CounterFile, WorkerRow};

/// How often (monotonic ms) a process without a worker row tries to claim one again (every
/// row was held, e.g. by an old generation of workers still draining long sessions).
pub const ROW_RETRY_MS: u64 = 1000;

/// A mapped counters file and this process's row in it.
pub struct CounterSink {
    pub(crate) file: CounterFile,
    /// The row this process holds, if it got one.
    row: Cell<Option<WorkerRow>>,
    /// When (monotonic ms) to try claiming a row again while it has none.
    next_claim_ms: Cell<u64>,
    /// Released at worker exit or retirement: claims no row any more.
    released: Cell<bool>,
    /// Sessions that will count their close here.
    pub(crate) sessions: Cell<usize>,
    /// Whether "no row" was logged for this file (once).
    pub(crate) said_no_row: Cell<bool>,
}

impl CounterSink {
    pub fn new(file: CounterFile) -> CounterSink {
        CounterSink {
            file,
            row: Cell::new(None),
            next_claim_ms: Cell::new(0),
            released: Cell::new(false),
            sessions: Cell::new(0),
            said_no_row: Cell::new(false),
        }
    }

    /// Gives this process's row back (clearing it), if it claimed one and the file is still
    /// safe to touch (not shrunk); the sink claims no row afterwards.
    pub fn release(&self) {
        if let Some(row) = self.row.take() {
            if !self.file.poisoned() && self.file.check().is_ok() {
                self.file.release_worker(row);
            }
        }
        self.released.set(true);
    }

    /// This process's row, claimed now if it has none and the last try is [`ROW_RETRY_MS`]
    /// old (a read-only file never gives one).
    pub fn row(&self, mono_ms: u64) -> Option<WorkerRow> {
        if let Some(r) = self.row.get() {
            return Some(r);
        }
        if self.released.get() || !self.file.writable() || mono_ms < self.next_claim_ms.get() {
            return None;
        }
        let r = self.file.claim_worker();
        self.row.set(r);
        self.next_claim_ms.set(mono_ms.saturating_add(ROW_RETRY_MS));
        r
    }
}
