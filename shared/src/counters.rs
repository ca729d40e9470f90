//! The counters file: per-port totals tagged with the route's owner, and open-session cells
//! kept per worker process so that a dead worker's sessions can be taken out of the gauge.
//!
//! Tagging: each route carries an owner stamp that the writer changes whenever the port
//! changes hands (see [`crate::layout::RouteWords::owner`]). A session remembers the stamp of
//! the route it was given. Every tagged counter word holds `tag << 48 | value`, where the tag
//! is the stamp's low 16 bits; a worker adds with a compare-exchange that succeeds only while
//! the tag is its session's. The writer resets a port's words to the new owner's tag *before*
//! it writes the new route, so:
//! - a session of the old owner that ends afterwards finds another tag and adds nothing: its
//!   bytes are dropped, never charged to the new tenant;
//! - a session of the new owner can only start after the route write, when the words already
//!   carry its tag.
//!
//! Sixteen bits are enough: two stamps of one port collide only after 65,536 owner changes
//! of that port within the life of one session.
//!
//! The open-session gauge cannot be a shared counter: a worker killed with open sessions (or
//! nginx stopped) never subtracts them, and the file outlives nginx. Instead each worker claims
//! a row of cells (one per port) keyed by its pid and start time; only it writes that row,
//! with plain loads and stores. A cell is `tag << 48 | open sessions of that owner`. A row
//! whose process is gone is cleared by the next worker that starts in the same pid namespace
//! (the master respawns a killed worker at once; a restarted nginx starts new ones) and by the
//! writer when it shares that namespace. Readers add the cells whose tag is the route's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::files::{pid_namespace, process_start};
use crate::layout::{CounterSlot, NameRefusal, SlotKey, MAX_WORKERS, PORT_SLOTS};
use crate::mapping::{Kind, Mapping};

const VALUE_BITS: u32 = 48;
const VALUE_MASK: u64 = (1 << VALUE_BITS) - 1;
/// Bit 63 of a worker row's owner: the row of a dead process is being cleared.
const SWEEPING: u64 = 1 << 63;
const START_MASK: u64 = 0x7fff_ffff;

/// The 16-bit tag of an owner stamp.
pub const fn tag(owner: u64) -> u64 {
    owner & 0xffff
}

const fn pack(tag: u64, value: u64) -> u64 {
    (tag << VALUE_BITS) | (value & VALUE_MASK)
}

/// The value of a tagged word if it carries `tag`.
fn value_for(word: u64, tag: u64) -> Option<u64> {
    (word >> VALUE_BITS == tag).then_some(word & VALUE_MASK)
}

/// Adds `delta` to a tagged word while its tag is `tag`; a word of another tag is left alone.
fn tagged_add(w: &AtomicU64, tag: u64, delta: u64) {
    // Relaxed: statistics; no other memory is published through these words.
    let _ = w.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        value_for(v, tag).map(|cur| pack(tag, cur.saturating_add(delta).min(VALUE_MASK)))
    });
}

/// Raises a tagged word to `value` while its tag is `tag`.
fn tagged_max(w: &AtomicU64, tag: u64, value: u64) {
    let _ = w.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
        value_for(v, tag).filter(|cur| value > *cur).map(|_| pack(tag, value))
    });
}

/// A snapshot of one port's counters, for its current owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Counters {
    /// Sessions proxied to the workspace, counted when each ends.
    pub connections_total: u64,
    /// Sessions open now (from the live workers' cells).
    pub connections_active: u64,
    /// Connections refused at once because the port had no live route.
    pub refused_total: u64,
    /// Sessions whose upstream could not be connected.
    pub upstream_failed_total: u64,
    /// Sessions closed by a revoke (also in `connections_total`).
    pub revoked_total: u64,
    /// Bytes from clients to the workspace (flushed while sessions are open, exact at the end).
    pub bytes_in: u64,
    /// Bytes from the workspace to clients (likewise).
    pub bytes_out: u64,
    /// Last session start or end, or last flush that saw bytes move, unix milliseconds.
    pub last_activity_ms: u64,
}

/// How a proxied session ended, for the totals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream was connected and the session ran.
    Proxied,
    /// The session was proxied and then closed by a revoke.
    Revoked,
    /// The upstream could not be connected (refused, timed out, unreachable).
    UpstreamFailed,
}

/// The row of session cells a worker process claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerRow(usize);

impl WorkerRow {
    /// The row's index (0..MAX_WORKERS).
    pub fn index(self) -> usize {
        self.0
    }
}

/// The counters file of a table, mapped.
pub struct CounterFile {
    map: Mapping,
}

/// The counters file that belongs to the routes file at `routes`: `<routes>.counters`.
pub fn counters_path(routes: &Path) -> PathBuf {
    let mut p = routes.as_os_str().to_owned();
    p.push(".counters");
    PathBuf::from(p)
}

/// This process's identity word for a worker row.
fn identity() -> Option<u64> {
    let pid = std::process::id();
    let start = process_start(pid)?;
    Some(u64::from(pid) | ((start & START_MASK) << 32))
}

/// Whether the process a row's owner word names still runs (judged in our pid namespace).
fn owner_alive(word: u64) -> bool {
    let pid = (word & 0xffff_ffff) as u32;
    let start = (word >> 32) & START_MASK;
    match process_start(pid) {
        Some(s) => s & START_MASK == start,
        // Unreadable but present (hidepid): assume alive; gone: dead.
        None => Path::new(&format!("/proc/{pid}")).exists(),
    }
}

impl CounterFile {
    /// Opens and validates the counters file at `path`, writable or read-only, never through
    /// a symbolic link.
    pub fn open(path: &Path, writable: bool) -> Result<CounterFile> {
        let file = crate::files::open_nofollow(path, writable)?;
        CounterFile::from_mapping(Mapping::new(file, path, Kind::Counters, writable)?)
    }

    pub(crate) fn from_mapping(map: Mapping) -> Result<CounterFile> {
        map.validate()?;
        Ok(CounterFile { map })
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// The file this maps.
    pub fn path(&self) -> &Path {
        self.map.path()
    }

    /// (device, inode) of the mapped file.
    pub fn file_id(&self) -> (u64, u64) {
        self.map.file_id()
    }

    /// Whether this process may count.
    pub fn writable(&self) -> bool {
        self.map.writable()
    }

    /// Re-checks the header and the file's size (a shrunken file must not be touched).
    pub fn check(&self) -> Result<()> {
        self.map.check_size()?;
        self.map.validate()
    }

    /// Whether an access faulted past the end of a shrunken file (one atomic load).
    pub fn poisoned(&self) -> bool {
        self.map.poisoned()
    }

    fn slot(&self, key: SlotKey) -> &CounterSlot {
        self.map.counter_slot(key)
    }

    /// Hostname slots this file counts for besides the ports.
    pub fn host_slots(&self) -> u32 {
        self.map.host_slots()
    }

    /// Counts a connection that name routing refused, by reason.
    pub fn count_name_refused(&self, why: NameRefusal) {
        // Relaxed: a statistic.
        self.map.counters_header().name_refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections refused by name routing so far, per reason.
    pub fn name_refused(&self) -> Vec<(NameRefusal, u64)> {
        let h = self.map.counters_header();
        NameRefusal::ALL.iter().map(|&r| (r, h.name_refused[r as usize].load(Ordering::Relaxed))).collect()
    }

    /// Claims a row of session cells for this process (re-using one it holds), after clearing
    /// the rows of dead processes of this pid namespace. `None` if the file is read-only, every
    /// row is taken, or this process cannot name itself.
    pub fn claim_worker(&self) -> Option<WorkerRow> {
        if !self.writable() {
            return None;
        }
        let me = identity()?;
        self.sweep_dead();
        let ns = pid_namespace();
        for i in 0..MAX_WORKERS {
            if self.map.worker_slot(i).owner.load(Ordering::Acquire) == me {
                return Some(WorkerRow(i));
            }
        }
        for i in 0..MAX_WORKERS {
            let w = self.map.worker_slot(i);
            // AcqRel: the Acquire half sees the zeroed cells of the row's last clearing.
            if w.owner.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                w.pid_ns.store(ns, Ordering::Relaxed);
                w.claimed_ms.store(crate::reader::now_ms(), Ordering::Relaxed);
                return Some(WorkerRow(i));
            }
        }
        None
    }

    /// Clears and frees a row this process claimed (at worker exit: sessions still open in a
    /// process that is going away are not open any more).
    pub fn release_worker(&self, row: WorkerRow) {
        let Some(me) = identity() else { return };
        let w = self.map.worker_slot(row.0);
        if w.owner.load(Ordering::Relaxed) == me {
            self.clear_row(row.0);
            w.owner.store(0, Ordering::Release);
        }
    }

    fn clear_row(&self, i: usize) {
        for k in 0..self.map.keys() {
            let c = self.map.cell(i, key_at(k));
            // Relaxed: the row is owned by the clearing process; the Release store of the
            // row's owner that follows publishes these stores.
            if c.load(Ordering::Relaxed) != 0 {
                c.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Clears the rows of processes of this pid namespace that are gone; returns how many.
    pub fn sweep_dead(&self) -> usize {
        if !self.writable() {
            return 0;
        }
        let (Some(me), ns) = (identity(), pid_namespace()) else { return 0 };
        let mut cleared = 0;
        for i in 0..MAX_WORKERS {
            let w = self.map.worker_slot(i);
            let owner = w.owner.load(Ordering::Acquire);
            if owner == 0 || w.pid_ns.load(Ordering::Relaxed) != ns || owner_alive(owner) {
                continue;
            }
            // One sweeper per row: the one whose exchange succeeds. Its own identity with the
            // sweeping bit lets another process finish the job should it die meanwhile.
            if w.owner
                .compare_exchange(owner, me | SWEEPING, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            self.clear_row(i);
            w.owner.store(0, Ordering::Release);
            cleared += 1;
        }
        cleared
    }

    /// Counts a connection refused on `key` (no live route).
    pub fn count_refused(&self, key: impl Into<SlotKey>) {
        // Relaxed: a statistic.
        self.slot(key.into()).refused_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session of the route owned by `owner` that opened on `key`.
    pub fn session_open(&self, row: Option<WorkerRow>, key: impl Into<SlotKey>, owner: u64, now_ms: u64) {
        let key = key.into();
        let t = tag(owner);
        if let Some(WorkerRow(i)) = row {
            let c = self.map.cell(i, key);
            // Relaxed load and store: only this process writes its row.
            let v = c.load(Ordering::Relaxed);
            let next = match value_for(v, t) {
                Some(n) => pack(t, n.saturating_add(1).min(VALUE_MASK)),
                // Another owner's sessions are no longer this port's: start over.
                None => pack(t, 1),
            };
            c.store(next, Ordering::Relaxed);
        }
        tagged_max(&self.slot(key).last_activity_ms, t, now_ms);
    }

    /// Counts the end of a session that [`CounterFile::session_open`] counted.
    #[allow(clippy::too_many_arguments)]
    pub fn session_close(
        &self,
        row: Option<WorkerRow>,
        key: impl Into<SlotKey>,
        owner: u64,
        outcome: Outcome,
        bytes_in: u64,
        bytes_out: u64,
        now_ms: u64,
    ) {
        let key = key.into();
        let t = tag(owner);
        if let Some(WorkerRow(i)) = row {
            let c = self.map.cell(i, key);
            let v = c.load(Ordering::Relaxed);
            if let Some(n) = value_for(v, t) {
                c.store(pack(t, n.saturating_sub(1)), Ordering::Relaxed);
            }
        }
        let s = self.slot(key);
        match outcome {
            Outcome::Proxied => tagged_add(&s.connections_total, t, 1),
            Outcome::Revoked => {
                tagged_add(&s.connections_total, t, 1);
                tagged_add(&s.revoked_total, t, 1);
            }
            Outcome::UpstreamFailed => tagged_add(&s.upstream_failed_total, t, 1),
        }
        tagged_add(&s.bytes_in, t, bytes_in);
        tagged_add(&s.bytes_out, t, bytes_out);
        tagged_max(&s.last_activity_ms, t, now_ms);
    }

    /// Adds the bytes a still-open session moved since its last flush (`bytes_in`,
    /// `bytes_out` are deltas); a flush that saw bytes move is activity at `now_ms`.
    pub fn session_flush(&self, key: impl Into<SlotKey>, owner: u64, bytes_in: u64, bytes_out: u64, now_ms: u64) {
        if bytes_in == 0 && bytes_out == 0 {
            return;
        }
        let s = self.slot(key.into());
        let t = tag(owner);
        tagged_add(&s.bytes_in, t, bytes_in);
        tagged_add(&s.bytes_out, t, bytes_out);
        tagged_max(&s.last_activity_ms, t, now_ms);
    }

    /// Starts `key`'s counters over for a new owner (the writer, before it writes the route).
    pub(crate) fn reset(&self, key: SlotKey, owner: u64) {
        let s = self.slot(key);
        let t = tag(owner);
        // Relaxed stores, then a Release fence: the route write that follows (its W1 is a
        // Release store) is ordered after them, so a worker that sees the new route also sees
        // its tag here.
        s.owner.store(owner, Ordering::Relaxed);
        for w in [
            &s.connections_total,
            &s.upstream_failed_total,
            &s.revoked_total,
            &s.bytes_in,
            &s.bytes_out,
            &s.last_activity_ms,
        ] {
            w.store(pack(t, 0), Ordering::Relaxed);
        }
        s.refused_total.store(0, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
    }

    /// A new owner stamp (the writer only).
    pub(crate) fn next_owner(&self) -> u64 {
        // Relaxed: only the writer, holding the lock, changes it.
        self.map.counters_header().owners.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The counters of `key` for the route owned by `owner` (or, with `None`, for whoever
    /// they were last reset for).
    pub fn snapshot(&self, key: impl Into<SlotKey>, owner: Option<u64>) -> Counters {
        let key = key.into();
        let s = self.slot(key);
        let owner = owner.unwrap_or_else(|| s.owner.load(Ordering::Relaxed));
        let t = tag(owner);
        let get = |w: &AtomicU64| value_for(w.load(Ordering::Relaxed), t).unwrap_or(0);
        let mut active = 0u64;
        for i in 0..MAX_WORKERS {
            // Relaxed: readers may map this file read-only; a row being claimed or cleared
            // reads as a transient under- or over-count, never as a lasting one.
            let o = self.map.worker_slot(i).owner.load(Ordering::Relaxed);
            if o == 0 || o & SWEEPING != 0 {
                continue;
            }
            active += value_for(self.map.cell(i, key).load(Ordering::Relaxed), t).unwrap_or(0);
        }
        Counters {
            connections_total: get(&s.connections_total),
            connections_active: active,
            refused_total: s.refused_total.load(Ordering::Relaxed),
            upstream_failed_total: get(&s.upstream_failed_total),
            revoked_total: get(&s.revoked_total),
            bytes_in: get(&s.bytes_in),
            bytes_out: get(&s.bytes_out),
            last_activity_ms: get(&s.last_activity_ms),
        }
    }

    /// How many worker rows are claimed now (for tools).
    pub fn workers(&self) -> usize {
        (0..MAX_WORKERS)
            .filter(|&i| self.map.worker_slot(i).owner.load(Ordering::Relaxed) != 0)
            .count()
    }
}

/// The key with counter index `k` (< keys).
fn key_at(k: usize) -> SlotKey {
    match u16::try_from(k) {
        Ok(port) => SlotKey::port(port),
        Err(_) => SlotKey::host((k - PORT_SLOTS) as u32),
    }
}

const _: () = assert!(PORT_SLOTS == u16::MAX as usize + 1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_words_only_count_for_their_owner() {
        let w = AtomicU64::new(pack(tag(7), 0));
        tagged_add(&w, tag(7), 5);
        tagged_add(&w, tag(8), 100);
        assert_eq!(value_for(w.load(Ordering::Relaxed), tag(7)), Some(5));
        assert_eq!(value_for(w.load(Ordering::Relaxed), tag(8)), None);
        tagged_max(&w, tag(7), 3);
        assert_eq!(value_for(w.load(Ordering::Relaxed), tag(7)), Some(5));
        tagged_max(&w, tag(7), 9);
        assert_eq!(value_for(w.load(Ordering::Relaxed), tag(7)), Some(9));
        tagged_add(&w, tag(7), u64::MAX);
        assert_eq!(value_for(w.load(Ordering::Relaxed), tag(7)), Some(VALUE_MASK), "saturates");
    }

    #[test]
    fn counters_path_is_beside_the_routes_file() {
        assert_eq!(counters_path(Path::new("/x/routes")), PathBuf::from("/x/routes.counters"));
    }
}
