//! The counters file: per-key totals tagged with the route's owner, and open-session cells
//! kept per worker process so that a dead worker's sessions can be taken out of the gauge
//! (the rows and their liveness locks: [`crate::rows`]).
//!
//! Tagging: each route carries an owner stamp that the writer changes whenever the slot
//! changes hands (see [`crate::layout::RouteWords::owner`]). A session remembers the stamp of
//! the route it was given. Every tagged counter word holds `tag << 48 | value`, where the tag
//! is the stamp's low 16 bits; a worker adds with a compare-exchange that succeeds only while
//! the tag is its session's. The writer resets a slot's words to the new owner's tag *before*
//! it writes the new route, so:
//! - a session of the old owner that ends afterwards finds another tag and adds nothing: its
//!   bytes are dropped, never charged to the new tenant;
//! - a session of the new owner can only start after the route write, when the words already
//!   carry its tag.
//!
//! Stamps are a sequence *per slot* ([`CounterFile::next_owner`]: one more than the highest
//! stamp that slot's route or counters ever carried), so two stamps of one slot share a tag
//! only after 65,536 owner changes of that very slot within the life of one session; owner
//! changes elsewhere in the table never bring a tag back.
//!
//! A file that may not be written (a worker whose user lacks write access) is still mapped,
//! read-only: every method that would store is then a no-op, by construction (stores go
//! through [`Mapping::rw`], which a read-only mapping does not give). Sessions are routed and
//! simply not counted.
//!
//! The open-session gauge cannot be a shared counter: a worker killed with open sessions (or
//! nginx stopped) never subtracts them, and the file outlives nginx. Instead each worker claims
//! a row of cells (one per key); only it writes that row, with plain loads and stores. A cell
//! is `tag << 48 | open sessions of that owner`. Readers add the cells whose tag is the
//! route's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Result;
use crate::layout::{CounterSlot, NameRefusal, SlotKey, MAX_WORKERS};
use crate::mapping::{Kind, Mapping};
use crate::rows::{self, Liveness, SWEEPING};
pub use crate::rows::WorkerRow;

const VALUE_BITS: u32 = 48;
const VALUE_MASK: u64 = (1 << VALUE_BITS) - 1;

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

/// The worker rows counting sessions at one moment ([`CounterFile::counting_rows`]): one bit
/// per row, so listing them allocates nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountingRows(u128);

impl CountingRows {
    fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                i
            })
        })
    }
}

const _: () = assert!(MAX_WORKERS <= 128, "CountingRows holds one bit per worker row");

/// The counters file of a table, mapped.
pub struct CounterFile {
    map: Mapping,
    /// This process's liveness locks on the file's worker rows.
    live: Liveness,
}

/// The counters file that belongs to the routes file at `routes`: `<routes>.counters`.
pub fn counters_path(routes: &Path) -> PathBuf {
    let mut p = routes.as_os_str().to_owned();
    p.push(".counters");
    PathBuf::from(p)
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
        Ok(CounterFile { map, live: Liveness::default() })
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

    /// `key`'s counters, for loads only (stores go through [`Mapping::rw`]).
    fn slot(&self, key: SlotKey) -> &CounterSlot {
        self.map.counter_slot(key)
    }

    /// Hostname slots this file counts for besides the ports.
    pub fn host_slots(&self) -> u32 {
        self.map.host_slots()
    }

    /// Counts a connection that name routing refused, by reason.
    pub fn count_name_refused(&self, why: NameRefusal) {
        let Some(rw) = self.map.rw() else { return };
        // Relaxed: a statistic.
        rw.counters_header().name_refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Connections refused by name routing so far, per reason.
    pub fn name_refused(&self) -> Vec<(NameRefusal, u64)> {
        let h = self.map.counters_header();
        NameRefusal::ALL.iter().map(|&r| (r, h.name_refused[r as usize].load(Ordering::Relaxed))).collect()
    }

    /// Claims a row of session cells for this process (re-using one it holds), after clearing
    /// the rows of dead processes, in any pid namespace. `None` if the file is read-only,
    /// every row is held, or this process cannot name itself: try again later.
    pub fn claim_worker(&self) -> Option<WorkerRow> {
        rows::claim(&self.map, &self.live)
    }

    /// Clears and frees a row this process claimed (at worker exit: sessions still open in a
    /// process that is going away are not open any more).
    pub fn release_worker(&self, row: WorkerRow) {
        rows::release(&self.map, &self.live, row)
    }

    /// Clears the rows of processes that are gone, whatever pid namespace they lived in;
    /// returns how many.
    pub fn sweep_dead(&self) -> usize {
        rows::sweep(&self.map, &self.live)
    }

    /// Counts a connection refused on `key` (no live route).
    pub fn count_refused(&self, key: impl Into<SlotKey>) {
        let Some(rw) = self.map.rw() else { return };
        // Relaxed: a statistic.
        rw.counter_slot(key.into()).refused_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a session of the route owned by `owner` that opened on `key`.
    pub fn session_open(&self, row: Option<WorkerRow>, key: impl Into<SlotKey>, owner: u64, now_ms: u64) {
        let Some(rw) = self.map.rw() else { return };
        let key = key.into();
        let t = tag(owner);
        if let Some(row) = row {
            let c = rw.cell(row.index(), key);
            // Relaxed load and store: only this process writes its row.
            let v = c.load(Ordering::Relaxed);
            let next = match value_for(v, t) {
                Some(n) => pack(t, n.saturating_add(1).min(VALUE_MASK)),
                // Another owner's sessions are no longer this port's: start over.
                None => pack(t, 1),
            };
            c.store(next, Ordering::Relaxed);
        }
        tagged_max(&rw.counter_slot(key).last_activity_ms, t, now_ms);
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
        let Some(rw) = self.map.rw() else { return };
        let key = key.into();
        let t = tag(owner);
        if let Some(row) = row {
            let c = rw.cell(row.index(), key);
            let v = c.load(Ordering::Relaxed);
            if let Some(n) = value_for(v, t) {
                c.store(pack(t, n.saturating_sub(1)), Ordering::Relaxed);
            }
        }
        let s = rw.counter_slot(key);
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
        let Some(rw) = self.map.rw() else { return };
        if bytes_in == 0 && bytes_out == 0 {
            return;
        }
        let s = rw.counter_slot(key.into());
        let t = tag(owner);
        tagged_add(&s.bytes_in, t, bytes_in);
        tagged_add(&s.bytes_out, t, bytes_out);
        tagged_max(&s.last_activity_ms, t, now_ms);
    }

    /// Starts `key`'s counters over for a new owner (the writer, before it writes the route).
    pub(crate) fn reset(&self, key: SlotKey, owner: u64) {
        let Some(rw) = self.map.rw() else { return };
        let s = rw.counter_slot(key);
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

    /// The owner stamp `key`'s counters were last reset for.
    pub(crate) fn owner_of(&self, key: SlotKey) -> u64 {
        // Relaxed: written by the writer only, which is the caller.
        self.slot(key).owner.load(Ordering::Relaxed)
    }

    /// A new owner stamp for `key`, whose route carries `route_owner` now (the writer only):
    /// one more than any stamp the slot's route or counters carried, so a slot's stamps
    /// never repeat while both files live, and only that slot's changes move its tag.
    pub(crate) fn next_owner(&self, key: SlotKey, route_owner: u64) -> u64 {
        let next = self.owner_of(key).max(route_owner).saturating_add(1);
        if let Some(rw) = self.map.rw() {
            // Relaxed: informational (the highest stamp handed out so far).
            rw.counters_header().owners.fetch_max(next, Ordering::Relaxed);
        }
        next
    }

    /// The counters of `key` for the route owned by `owner` (or, with `None`, for whoever
    /// they were last reset for).
    pub fn snapshot(&self, key: impl Into<SlotKey>, owner: Option<u64>) -> Counters {
        self.snapshot_in(key.into(), owner, self.counting_rows())
    }

    /// The worker rows that count sessions now, listed once for a pass over many keys
    /// ([`CounterFile::snapshot_in`]).
    pub fn counting_rows(&self) -> CountingRows {
        // Relaxed: readers may map this file read-only; a row being claimed or cleared
        // reads as a transient under- or over-count, never as a lasting one.
        let mut bits = 0u128;
        for i in 0..MAX_WORKERS {
            let o = self.map.worker_slot(i).owner.load(Ordering::Relaxed);
            if o != 0 && o & SWEEPING == 0 {
                bits |= 1 << i;
            }
        }
        CountingRows(bits)
    }

    /// [`CounterFile::snapshot`] with the counting rows already listed: a pass over every
    /// route reads the row owners once, not once per route.
    pub fn snapshot_in(&self, key: SlotKey, owner: Option<u64>, rows: CountingRows) -> Counters {
        let s = self.slot(key);
        let owner = owner.unwrap_or_else(|| s.owner.load(Ordering::Relaxed));
        let t = tag(owner);
        let get = |w: &AtomicU64| value_for(w.load(Ordering::Relaxed), t).unwrap_or(0);
        let active = rows.iter().map(|i| value_for(self.map.cell(i, key).load(Ordering::Relaxed), t).unwrap_or(0)).sum();
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
        rows::held(&self.map)
    }
}

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

#[cfg(test)]
#[path = "counters_tests.rs"]
mod restart_tests;
