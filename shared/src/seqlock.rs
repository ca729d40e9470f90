//! The per-slot sequence lock: one writer, any number of lock-free readers in other processes.
//!
//! It is the "latch" form of a seqlock: each slot holds two copies of its route, and the low
//! bit of the sequence names the copy readers use. The writer always writes the copy readers
//! are *not* using, so a writer that is preempted (or killed) in the middle of a write never
//! makes a reader wait or fail: readers keep reading the other, whole copy. (A plain seqlock
//! made nginx refuse connections whenever the writer thread was descheduled mid-write.)
//!
//! Write protocol (the single writer, holding the file's `flock`), from an even sequence `s`:
//! 1. `seq.store(s + 1, Release)`; `fence(Release)` — readers switch to copy 1.
//! 2. store copy 0 with `Relaxed` stores.
//! 3. `seq.store(s + 2, Release)`; `fence(Release)` — readers switch to copy 0 (new).
//! 4. store copy 1 with `Relaxed` stores.
//!
//! Read protocol (nginx workers, the CLI, the API):
//! 1. `s1 = seq.load(Relaxed)`; `fence(Acquire)`; `i = s1 & 1`.
//! 2. load copy `i` with `Relaxed` loads.
//! 3. `fence(Acquire)`.
//! 4. `s2 = seq.load(Relaxed)`; the copy is whole if `s1 == s2`, otherwise retry.
//!
//! Why that is enough:
//! - Whole: the writer only stores into copy `i` after moving the sequence away from the
//!   value that names `i` (W1 before W2, W3 before W4), with a release fence in between. If a
//!   load of R2 saw such a store, that fence and R3 synchronise, so the sequence store before
//!   the fence happens before R4, and `s2 != s1`: the copy is discarded.
//! - Fresh: the `Release` store that produced `s1` was made after the stores of copy `i` it
//!   names (W2 before W3 for copy 0; the previous write's W4 before this write's W1 for copy 1),
//!   and R1's fence synchronises with it, so R2 sees at least those stores.
//! - Every word is an atomic, so a concurrent copy is never undefined behaviour, only
//!   possibly discarded.
//!
//! A writer can die (SIGKILL, OOM) at any store. The next writer, holding the lock, first
//! [`settle`]s every slot before it writes anything:
//! - odd sequence (died inside W2, or between W1 and W3): readers use copy 1, which still
//!   holds the previous route whole; copy 0 is restored from it and the sequence made even.
//! - even sequence (died inside W4, or before W1): readers use copy 0, which is whole (W3
//!   published it); copy 1 may be half old, half new. Readers never read copy 1 while the
//!   sequence is even, and the next write's W1 would send them there, so copy 0 is copied
//!   into copy 1 first. Without this, a torn copy 1 (meta and env id of the new route, address
//!   of the old) would be served between the next W1 and W3.
//!
//! A writer that dies inside `settle` leaves the same two cases, so settling is idempotent and
//! needs no state of its own. The table's header says whether the last writer closed
//! cleanly; only then may a new writer skip the O(slots) pass (see [`crate::writer`]).

use std::sync::atomic::{fence, Ordering};

use crate::layout::{PortSlot, RouteWords};
use crate::route::RawRoute;

/// How many times a reader retries a slot before calling it busy. A retry is only needed
/// when the writer completes a step during the read; reaching this bound means the writer
/// rewrote the slot a thousand times within one read.
pub const MAX_READ_SPINS: u32 = 1024;

fn load(w: &RouteWords) -> RawRoute {
    RawRoute {
        meta: w.meta.load(Ordering::Relaxed),
        upstream_port: w.upstream_port.load(Ordering::Relaxed),
        addr: [
            w.addr[0].load(Ordering::Relaxed),
            w.addr[1].load(Ordering::Relaxed),
            w.addr[2].load(Ordering::Relaxed),
            w.addr[3].load(Ordering::Relaxed),
        ],
        env_id: [w.env_id[0].load(Ordering::Relaxed), w.env_id[1].load(Ordering::Relaxed)],
        generation: w.generation.load(Ordering::Relaxed),
        expires_ms: w.expires_ms.load(Ordering::Relaxed),
        owner: w.owner.load(Ordering::Relaxed),
    }
}

/// Stores every word of a copy, each one a separate store (a writer may die between any two).
fn store(w: &RouteWords, raw: &RawRoute) {
    step();
    w.meta.store(raw.meta, Ordering::Relaxed);
    step();
    w.upstream_port.store(raw.upstream_port, Ordering::Relaxed);
    for (dst, src) in w.addr.iter().zip(raw.addr) {
        step();
        dst.store(src, Ordering::Relaxed);
    }
    step();
    w.env_id[0].store(raw.env_id[0], Ordering::Relaxed);
    step();
    w.env_id[1].store(raw.env_id[1], Ordering::Relaxed);
    step();
    w.generation.store(raw.generation, Ordering::Relaxed);
    step();
    w.expires_ms.store(raw.expires_ms, Ordering::Relaxed);
    step();
    w.owner.store(raw.owner, Ordering::Relaxed);
}

/// Stores made by one [`write`]: two sequence stores and two copies of 11 words.
pub const STORES_PER_WRITE: u32 = 2 + 2 * 11;

#[cfg(feature = "test-hooks")]
pub mod hooks {
    //! A stepping hook for crash tests, compiled only with the `test-hooks` feature: the hook
    //! runs before every store a write makes, numbered from 0 in each [`super::write`], so a
    //! test can kill the writer at each of them.
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    static HOOK: Mutex<Option<fn(u32)>> = Mutex::new(None);
    static STEP: AtomicU32 = AtomicU32::new(0);

    /// Installs (or removes) the hook for every later write of this process.
    pub fn set(hook: Option<fn(u32)>) {
        *HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    pub(super) fn start_write() {
        STEP.store(0, Ordering::Relaxed);
    }

    pub(super) fn step() {
        let n = STEP.fetch_add(1, Ordering::Relaxed);
        let hook = *HOOK.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = hook {
            f(n);
        }
    }
}

#[cfg(feature = "test-hooks")]
use hooks::{start_write, step};
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
fn start_write() {}
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
fn step() {}

/// Copies a slot's current route out whole; `None` only if the writer kept completing
/// steps for [`MAX_READ_SPINS`] tries.
pub(crate) fn read(slot: &PortSlot) -> Option<RawRoute> {
    for _ in 0..MAX_READ_SPINS {
        // Relaxed + fence(Acquire) rather than an Acquire load: readers map the file read-only,
        // where only Relaxed loads are guaranteed to be plain loads; the fence gives the same
        // synchronisation with the writer's Release store of the sequence.
        let s1 = slot.seq.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let raw = load(&slot.copies[(s1 & 1) as usize]);
        fence(Ordering::Acquire);
        if slot.seq.load(Ordering::Relaxed) == s1 {
            return Some(raw);
        }
        std::hint::spin_loop();
    }
    None
}

/// Writes a slot. The caller must be the table's only writer (it holds the `flock`) and
/// must have [`settle`]d the slot since taking the lock.
pub(crate) fn write(slot: &PortSlot, raw: &RawRoute) {
    // Relaxed: only this process writes `seq`, so it reads its own last store.
    let s = slot.seq.load(Ordering::Relaxed);
    debug_assert!(s & 1 == 0, "write to an unsettled slot");
    start_write();
    step();
    slot.seq.store(s + 1, Ordering::Release);
    fence(Ordering::Release);
    store(&slot.copies[0], raw);
    step();
    slot.seq.store(s + 2, Ordering::Release);
    fence(Ordering::Release);
    store(&slot.copies[1], raw);
}

/// Makes a slot safe to write after a writer may have died inside it (see the module docs):
/// an odd slot gets copy 0 restored from copy 1 and an even sequence; an even slot gets copy 0
/// (what readers use) copied into copy 1. Returns whether the slot needed a repair (copies
/// differed or the sequence was odd). The caller holds the writer lock.
pub(crate) fn settle(slot: &PortSlot) -> bool {
    let s = slot.seq.load(Ordering::Relaxed);
    if s & 1 == 1 {
        let stable = load(&slot.copies[1]);
        store(&slot.copies[0], &stable);
        // Release: the restored copy 0 is visible to a reader that sees the even sequence.
        slot.seq.store(s + 1, Ordering::Release);
        fence(Ordering::Release);
        return true;
    }
    let current = load(&slot.copies[0]);
    if load(&slot.copies[1]) == current {
        return false;
    }
    // Readers are on copy 0 and stay there (the sequence does not change here), so copy 1
    // may be rewritten with plain stores; the next write's W1 (Release) publishes them.
    store(&slot.copies[1], &current);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, AtomicU64};

    fn words() -> RouteWords {
        RouteWords {
            meta: AtomicU32::new(0),
            upstream_port: AtomicU32::new(0),
            addr: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
            env_id: [AtomicU64::new(0), AtomicU64::new(0)],
            generation: AtomicU64::new(0),
            expires_ms: AtomicU64::new(0),
            owner: AtomicU64::new(0),
        }
    }

    fn slot() -> PortSlot {
        PortSlot { seq: AtomicU64::new(0), copies: [words(), words()], revoke_epoch: AtomicU64::new(0) }
    }

    fn raw(n: u64) -> RawRoute {
        RawRoute {
            meta: 1,
            upstream_port: n as u32,
            addr: [n as u32; 4],
            env_id: [n, n],
            generation: n,
            expires_ms: n,
            owner: n,
        }
    }

    #[test]
    fn write_then_read() {
        let s = slot();
        assert_eq!(read(&s), Some(RawRoute::EMPTY));
        write(&s, &raw(7));
        assert_eq!(read(&s), Some(raw(7)));
        assert_eq!(s.seq.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn writer_stalled_mid_write_leaves_readers_the_previous_route() {
        let s = slot();
        write(&s, &raw(3));
        // A writer that did step 1 and half of step 2, then stopped (preempted or killed).
        s.seq.store(3, Ordering::Release);
        s.copies[0].generation.store(99, Ordering::Relaxed);
        assert_eq!(read(&s), Some(raw(3)), "readers use the untouched copy, without waiting");
        assert!(settle(&s));
        assert_eq!(read(&s), Some(raw(3)));
        assert_eq!(s.seq.load(Ordering::Relaxed) & 1, 0);
        assert!(!settle(&s));
        write(&s, &raw(4));
        assert_eq!(read(&s), Some(raw(4)));
    }

    /// Reads copy `i` of a slot directly, as a reader does when the sequence names it.
    fn copy(s: &PortSlot, i: usize) -> RawRoute {
        load(&s.copies[i])
    }

    #[test]
    fn writer_killed_inside_the_second_copy_is_settled_before_the_next_write() {
        let s = slot();
        write(&s, &raw(5));
        // A writer that did W1..W3 of a write of route 6 and died half-way through W4: the
        // sequence is even, readers see copy 0 (whole, route 6), copy 1 is mixed.
        s.seq.fetch_add(1, Ordering::Relaxed);
        store(&s.copies[0], &raw(6));
        s.seq.fetch_add(1, Ordering::Relaxed);
        s.copies[1].meta.store(raw(6).meta, Ordering::Relaxed);
        s.copies[1].env_id[0].store(6, Ordering::Relaxed);
        assert_eq!(read(&s), Some(raw(6)));
        let mixed = copy(&s, 1);
        assert!(mixed != raw(5) && mixed != raw(6), "copy 1 is torn: {mixed:?}");
        // The next writer settles first: copy 1 becomes whole before any W1 exposes it.
        assert!(settle(&s));
        assert_eq!(copy(&s, 1), raw(6));
        assert!(!settle(&s), "settling twice changes nothing");
        // What readers see between the next write's W1 and W3 is copy 1: whole.
        s.seq.fetch_add(1, Ordering::Relaxed);
        assert_eq!(read(&s), Some(raw(6)));
    }

    #[test]
    fn concurrent_readers_never_see_a_torn_copy() {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let s = slot();
        let done = AtomicBool::new(false);
        // Reads per reader; the writer keeps writing until every reader has read a lot, so a
        // loaded machine that schedules the readers late cannot make the test vacuous.
        let reads = [AtomicU64::new(0), AtomicU64::new(0)];
        let started = std::time::Instant::now();
        std::thread::scope(|scope| {
            for count in &reads {
                let (s, done) = (&s, &done);
                scope.spawn(move || {
                    let mut last = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        let r = read(s).expect("a read never gives up");
                        let n = r.generation;
                        assert!(r == raw(n) || r == RawRoute::EMPTY, "torn: {r:?}");
                        assert!(n >= last, "went back from {last} to {n}");
                        last = n;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            let mut n = 1u64;
            while n < 200_000
                || (reads.iter().any(|c| c.load(Ordering::Relaxed) < 10_000)
                    && started.elapsed() < std::time::Duration::from_secs(30))
            {
                write(&s, &raw(n));
                n += 1;
            }
            done.store(true, Ordering::Relaxed);
        });
        for c in &reads {
            assert!(c.load(Ordering::Relaxed) >= 10_000, "a reader only read {c:?} times");
        }
    }
}
