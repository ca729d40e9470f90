//! Worker rows of the counters file: which process holds each row of open-session cells, how
//! a process claims one and gives it back, and how the rows of dead processes are found and
//! cleared, whatever pid namespace they lived in.
//!
//! A pid says whether a process lives only in the pid namespace it belongs to: a gateway
//! container killed with SIGKILL leaves rows whose namespace no longer exists, and no process
//! can ask about those pids again. So the holder of a row keeps a *liveness lock*: an
//! exclusive open-file-description lock (`F_OFD_SETLK`, `F_WRLCK`) on the first byte of its
//! row's [`WorkerSlot`], through a descriptor it opened itself. The kernel drops the lock when
//! the last reference to that descriptor closes, which happens when the process dies however
//! it dies; and locks belong to the file, not to a namespace. The protocol:
//!
//! 1. Claim: take the row's lock without waiting (refused: a live holder, or another claimer
//!    or sweeper at work on that row: try the next). Holding it, this process alone may move
//!    the row's owner word away from 0 or from a dead owner. An owner still there is dead (its
//!    lock was free): its cells are cleared first. Then `pid_ns`, `liveness = 1` and
//!    `claimed_ms` are stored and the owner word last (Release): whoever Acquire-loads the
//!    owner sees the rest, so no sweeper judges a new holder by its predecessor's namespace.
//! 2. Sweep: each owned row with `liveness = 1` whose lock can be taken belongs to a dead
//!    process: marked (owner = sweeper | [`SWEEPING`], by compare-exchange with the owner
//!    seen), its cells cleared, freed (owner = 0, Release), then the lock let go. Rows with
//!    `liveness = 0` (a kernel without OFD locks) keep the older rule: cleared by a process
//!    of the same pid namespace that finds the pid gone.
//! 3. Release: the holder clears its row, frees it (Release), then lets the lock go.
//!
//! A descriptor and its OFD locks are shared with children across `fork`, so the descriptor
//! is opened by the process that takes the locks (again when the pid changed), never
//! inherited. Readers skip rows being swept; a row being claimed or cleared reads as a
//! transient under- or over-count, never a lasting one.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::files::{open_nofollow, path_id, pid_namespace, process_start};
use crate::layout::{SlotKey, MAX_WORKERS, PORT_SLOTS};
use crate::mapping::{Mapping, Rw};

/// Bit 63 of a worker row's owner: the row of a dead process is being cleared.
pub(crate) const SWEEPING: u64 = 1 << 63;
const START_MASK: u64 = 0x7fff_ffff;

/// The row of session cells a worker process claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerRow(pub(crate) usize);

impl WorkerRow {
    /// The row's index (0..MAX_WORKERS).
    pub fn index(self) -> usize {
        self.0
    }
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

/// Takes (`F_WRLCK`) or lets go (`F_UNLCK`) of the one-byte OFD lock at `off`; whether it
/// was granted. `Err` when the kernel has no OFD locks (or another failure).
fn ofd_lock(file: &File, off: usize, kind: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: an all-zero `struct flock` is a valid value; the fields that matter are set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = off as libc::off_t;
    fl.l_len = 1;
    // SAFETY: fcntl on a descriptor we own with a valid `struct flock`; l_pid is 0 as OFD
    // locks require.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

/// This process's descriptor for liveness locks on one counters file.
#[derive(Default)]
pub(crate) struct Liveness {
    /// (pid that opened it, descriptor): a descriptor opened by another pid (inherited over
    /// `fork`) is never used for locks.
    fd: Mutex<Option<(u32, File)>>,
}

/// What a row's lock says about its holder.
enum Probe {
    /// The lock was free and is now ours: the holder (if any) is dead.
    Taken,
    /// Someone holds it.
    Held,
    /// No locks here (no descriptor, or a kernel without OFD locks).
    Unknown,
}

impl Liveness {
    /// Runs `f` with this process's own descriptor on the file `map` maps (opened now if
    /// needed); `None` if the path no longer names that file or cannot be opened.
    fn with_fd<R>(&self, map: &Mapping, f: impl FnOnce(&File) -> R) -> Option<R> {
        let mut guard = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        let me = std::process::id();
        if guard.as_ref().is_none_or(|(pid, _)| *pid != me) {
            let file = open_nofollow(map.path(), true).ok()?;
            if path_id(map.path()) != Some(map.file_id()) || !same_inode(&file, map.file_id()) {
                return None;
            }
            *guard = Some((me, file));
        }
        guard.as_ref().map(|(_, file)| f(file))
    }

    fn try_lock(&self, map: &Mapping, i: usize) -> Probe {
        let off = map.worker_slot_offset(i);
        match self.with_fd(map, |f| ofd_lock(f, off, libc::F_WRLCK)) {
            Some(Ok(true)) => Probe::Taken,
            Some(Ok(false)) => Probe::Held,
            _ => Probe::Unknown,
        }
    }

    fn unlock(&self, map: &Mapping, i: usize) {
        let off = map.worker_slot_offset(i);
        let _ = self.with_fd(map, |f| ofd_lock(f, off, libc::F_UNLCK));
    }
}

fn same_inode(file: &File, id: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.metadata().is_ok_and(|m| (m.dev(), m.ino()) == id)
}

/// Claims a row of session cells for this process (re-using one it holds), after clearing
/// the rows of dead processes. `None` if the file is read-only, every row is held, or this
/// process cannot name itself.
pub(crate) fn claim(map: &Mapping, live: &Liveness) -> Option<WorkerRow> {
    let rw = map.rw()?;
    let me = identity()?;
    sweep(map, live);
    for i in 0..MAX_WORKERS {
        if rw.worker_slot(i).owner.load(Ordering::Acquire) == me {
            return Some(WorkerRow(i));
        }
    }
    let ns = pid_namespace();
    for i in 0..MAX_WORKERS {
        let w = rw.worker_slot(i);
        match live.try_lock(map, i) {
            Probe::Held => continue,
            Probe::Taken => {
                // Ours alone now. A row still owned is a dead holder's (or a legacy row of
                // a process of this namespace that is gone): clear it first.
                let owner = w.owner.load(Ordering::Acquire);
                let dead = owner == 0
                    || w.liveness.load(Ordering::Relaxed) == 1
                    || (w.pid_ns.load(Ordering::Relaxed) == ns && !owner_alive(owner));
                if !dead || (owner != 0 && !take_over(rw, i, owner, me)) {
                    live.unlock(map, i);
                    continue;
                }
                w.pid_ns.store(ns, Ordering::Relaxed);
                w.liveness.store(1, Ordering::Relaxed);
                w.claimed_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
                // Release: publishes the fields above and the cleared cells with the owner.
                w.owner.store(me, Ordering::Release);
                return Some(WorkerRow(i));
            }
            Probe::Unknown => {
                // No locks: the older claim by compare-exchange, judged by pid namespace.
                // AcqRel: the Acquire half sees the zeroed cells of the row's last clearing.
                if w.owner.compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    w.liveness.store(0, Ordering::Relaxed);
                    w.pid_ns.store(ns, Ordering::Relaxed);
                    w.claimed_ms.store(crate::clock::now_ms(), Ordering::Relaxed);
                    return Some(WorkerRow(i));
                }
            }
        }
    }
    None
}

/// Marks row `i` (owned by the dead `owner`) as being swept by `me`, clears its cells and
/// frees it; false if another process got there first.
fn take_over(rw: Rw<'_>, i: usize, owner: u64, me: u64) -> bool {
    let w = rw.worker_slot(i);
    if w.owner.compare_exchange(owner, me | SWEEPING, Ordering::AcqRel, Ordering::Relaxed).is_err() {
        return false;
    }
    clear_row(rw, i);
    w.owner.store(0, Ordering::Release);
    true
}

/// Clears and frees a row this process claimed (at worker exit: sessions still open in a
/// process that is going away are not open any more), then lets its lock go.
pub(crate) fn release(map: &Mapping, live: &Liveness, row: WorkerRow) {
    let (Some(rw), Some(me)) = (map.rw(), identity()) else { return };
    let w = rw.worker_slot(row.0);
    if w.owner.load(Ordering::Relaxed) == me {
        clear_row(rw, row.0);
        w.owner.store(0, Ordering::Release);
        live.unlock(map, row.0);
    }
}

/// Zeroes row `i`'s cells, reading only the pages of the row that exist (a row that counted
/// a few ports touched a few pages; reading the rest would allocate them on tmpfs).
fn clear_row(rw: Rw<'_>, i: usize) {
    let map = rw.map();
    let (start, len) = map.row_cells(i);
    for (off, n) in map.data_extents(start, len) {
        for k in (off - start) / 8..(off + n - start).div_ceil(8).min(map.keys()) {
            let c = rw.cell(i, key_at(k));
            // Relaxed: the row is held by the clearing process; the Release store of the
            // row's owner that follows publishes these stores.
            if c.load(Ordering::Relaxed) != 0 {
                c.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// Clears the rows of processes that are gone; returns how many.
pub(crate) fn sweep(map: &Mapping, live: &Liveness) -> usize {
    let Some(rw) = map.rw() else { return 0 };
    let Some(me) = identity() else { return 0 };
    let ns = pid_namespace();
    let mut cleared = 0;
    for i in 0..MAX_WORKERS {
        let w = rw.worker_slot(i);
        let owner = w.owner.load(Ordering::Acquire);
        if owner == 0 || owner == me {
            continue;
        }
        if w.liveness.load(Ordering::Relaxed) == 1 {
            match live.try_lock(map, i) {
                Probe::Taken => {
                    if take_over(rw, i, owner, me) {
                        cleared += 1;
                    }
                    live.unlock(map, i);
                }
                Probe::Held | Probe::Unknown => {}
            }
            continue;
        }
        if w.pid_ns.load(Ordering::Relaxed) != ns || owner_alive(owner) {
            continue;
        }
        // One sweeper per row: the one whose exchange succeeds.
        if take_over(rw, i, owner, me) {
            cleared += 1;
        }
    }
    cleared
}

/// How many rows are held now.
pub(crate) fn held(map: &Mapping) -> usize {
    (0..MAX_WORKERS).filter(|&i| map.worker_slot(i).owner.load(Ordering::Relaxed) != 0).count()
}

/// The key with counter index `k` (< keys).
fn key_at(k: usize) -> SlotKey {
    match u16::try_from(k) {
        Ok(port) => SlotKey::port(port),
        Err(_) => SlotKey::host((k - PORT_SLOTS) as u32),
    }
}

const _: () = assert!(PORT_SLOTS == u16::MAX as usize + 1);
