//! The per-slot sequence lock: one writer, any number of lock-free readers in other processes.
//!
//! Write protocol (the single writer, holding the file's `flock`):
//! 1. `seq.store(s + 1, Relaxed)` — the slot is now odd ("writer inside").
//! 2. `fence(Release)` — orders step 1 before every data store of step 3.
//! 3. store each data word with `Relaxed`.
//! 4. `seq.store(s + 2, Release)` — even again; publishes the data stores.
//!
//! Read protocol (nginx workers, the CLI, the API):
//! 1. `s1 = seq.load(Acquire)`; if odd, the writer is inside: retry.
//! 2. load each data word with `Relaxed`.
//! 3. `fence(Acquire)`.
//! 4. `s2 = seq.load(Relaxed)`; the copy is whole if `s1 == s2`, otherwise retry.
//!
//! Why that is enough: if any load of step 2 saw a store of a later write's step 3, the
//! writer's release fence (W2) and the reader's acquire fence (R3) synchronise, so that write's
//! step 1 happens before R4 and `s2 != s1`. If `s1` is even, R1 synchronised with the W4 of
//! the write that produced it, so every data load sees at least that write. Every word is an
//! atomic, so a concurrent copy is never undefined behaviour, only possibly discarded.
//!
//! A writer that dies between W1 and W4 leaves the slot odd. Readers give up after
//! [`MAX_READ_SPINS`] tries and report the slot as busy (the caller fails closed); the next
//! writer to take the lock repairs such slots ([`repair`]).

use std::sync::atomic::{fence, Ordering};

use crate::layout::PortSlot;
use crate::route::RawRoute;

/// How many times a reader retries a slot before calling it busy.
pub const MAX_READ_SPINS: u32 = 1024;

/// Copies a slot out whole; `None` if the writer stayed inside for all retries.
pub(crate) fn read(slot: &PortSlot) -> Option<RawRoute> {
    for _ in 0..MAX_READ_SPINS {
        let s1 = slot.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let raw = RawRoute {
            meta: slot.meta.load(Ordering::Relaxed),
            upstream_port: slot.upstream_port.load(Ordering::Relaxed),
            addr: [
                slot.addr[0].load(Ordering::Relaxed),
                slot.addr[1].load(Ordering::Relaxed),
                slot.addr[2].load(Ordering::Relaxed),
                slot.addr[3].load(Ordering::Relaxed),
            ],
            env_id: [slot.env_id[0].load(Ordering::Relaxed), slot.env_id[1].load(Ordering::Relaxed)],
            generation: slot.generation.load(Ordering::Relaxed),
            expires_ms: slot.expires_ms.load(Ordering::Relaxed),
        };
        fence(Ordering::Acquire);
        if slot.seq.load(Ordering::Relaxed) == s1 {
            return Some(raw);
        }
        std::hint::spin_loop();
    }
    None
}

/// Writes a slot. The caller must be the table's only writer (it holds the `flock`).
pub(crate) fn write(slot: &PortSlot, raw: &RawRoute) {
    // Relaxed: only this process writes `seq`, so it reads its own last store.
    let s = slot.seq.load(Ordering::Relaxed);
    // An odd value can only be left by a writer that died inside the slot; start over even.
    let s = s + (s & 1);
    slot.seq.store(s + 1, Ordering::Relaxed);
    fence(Ordering::Release);
    slot.meta.store(raw.meta, Ordering::Relaxed);
    slot.upstream_port.store(raw.upstream_port, Ordering::Relaxed);
    for (dst, src) in slot.addr.iter().zip(raw.addr) {
        dst.store(src, Ordering::Relaxed);
    }
    slot.env_id[0].store(raw.env_id[0], Ordering::Relaxed);
    slot.env_id[1].store(raw.env_id[1], Ordering::Relaxed);
    slot.generation.store(raw.generation, Ordering::Relaxed);
    slot.expires_ms.store(raw.expires_ms, Ordering::Relaxed);
    slot.seq.store(s + 2, Ordering::Release);
}

/// Clears a slot that a dead writer left odd; returns whether it had to.
pub(crate) fn repair(slot: &PortSlot) -> bool {
    if slot.seq.load(Ordering::Relaxed) & 1 == 1 {
        write(slot, &RawRoute::EMPTY);
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, AtomicU64};

    fn slot() -> PortSlot {
        PortSlot {
            seq: AtomicU64::new(0),
            meta: AtomicU32::new(0),
            upstream_port: AtomicU32::new(0),
            addr: [AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0)],
            env_id: [AtomicU64::new(0), AtomicU64::new(0)],
            generation: AtomicU64::new(0),
            expires_ms: AtomicU64::new(0),
        }
    }

    fn raw(n: u64) -> RawRoute {
        RawRoute {
            meta: 1,
            upstream_port: n as u32,
            addr: [n as u32; 4],
            env_id: [n, n],
            generation: n,
            expires_ms: n,
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
    fn odd_slot_reads_busy_and_is_repaired() {
        let s = slot();
        write(&s, &raw(3));
        s.seq.store(5, Ordering::Relaxed); // a writer died inside
        assert_eq!(read(&s), None);
        assert!(repair(&s));
        assert_eq!(read(&s), Some(RawRoute::EMPTY));
        assert!(!repair(&s));
    }

    #[test]
    fn concurrent_readers_never_see_a_torn_copy() {
        let s = slot();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    let mut seen = 0u64;
                    while !done.load(Ordering::Relaxed) {
                        if let Some(r) = read(&s) {
                            let n = r.generation;
                            assert!(r == raw(n) || r == RawRoute::EMPTY, "torn: {r:?}");
                            seen += 1;
                        }
                    }
                    assert!(seen > 0);
                });
            }
            for n in 1..200_000u64 {
                write(&s, &raw(n));
            }
            done.store(true, Ordering::Relaxed);
        });
    }
}
