//! Mapping the table files into memory and viewing them as the layout's structs.
//! All of the crate's `unsafe` that turns mapped bytes into references lives here.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::guard;
use crate::layout::{
    check_host_slots, routes_file_size, CounterSlot, CountersGeometry, CountersHeader, Header,
    PortSlot, SlotKey, WorkerSlot, COUNTERS_MAGIC, COUNTERS_OFFSET, COUNTER_SIZE, HEADER_SIZE,
    HOSTS_OFFSET, LAYOUT_VERSION, MAGIC, MAX_WORKERS, PORTS_OFFSET, PORT_SLOTS, SLOT_SIZE,
    WORKER_SLOT_SIZE,
};

/// Which of the two files a mapping holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Routes,
    Counters,
}

impl Kind {
    /// Bytes a file of this kind with `host_slots` hostname slots needs.
    pub fn len(self, host_slots: u32) -> usize {
        match self {
            Kind::Routes => routes_file_size(host_slots),
            Kind::Counters => CountersGeometry::new(host_slots).file_size,
        }
    }
}

/// Both headers keep the hostname slot count at this offset.
const HOST_SLOTS_AT: u64 = 28;
const _: () = assert!(HOST_SLOTS_AT as usize + 4 <= 32);

/// A shared mapping of a table file, with the file kept open to re-check its size.
pub(crate) struct Mapping {
    map: MmapRaw,
    file: File,
    path: PathBuf,
    kind: Kind,
    writable: bool,
    file_id: (u64, u64),
    guard: Option<usize>,
    /// The geometry the mapping was made for, fixed for its life: every index is bounded by
    /// these, never by what the (shared, changeable) header says later.
    len: usize,
    host_slots: u32,
    counters: CountersGeometry,
}

impl Mapping {
    /// Maps `file` shared (read-only unless `writable`), with the hostname slot count its
    /// header names, after checking that count and the file's length.
    pub fn new(file: File, path: &Path, kind: Kind, writable: bool) -> Result<Mapping> {
        use std::os::unix::fs::FileExt;
        let mut head = [0u8; 32];
        // Only a file with our magic names a hostname region; anything else (too short, not a
        // table) is mapped at the base size and refused by the length check or `validate`.
        let magic = if kind == Kind::Routes { MAGIC } else { COUNTERS_MAGIC };
        let host_slots = match file.read_exact_at(&mut head, 0) {
            Ok(()) if head[..8] == magic.to_le_bytes() => {
                let at = HOST_SLOTS_AT as usize;
                u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]])
            }
            _ => 0,
        };
        if check_host_slots(host_slots).is_err() {
            return Err(Error::Geometry { path: path.to_owned(), what: "hostname slot count" });
        }
        Mapping::new_sized(file, path, kind, writable, host_slots)
    }

    /// Maps `file` for `host_slots` hostname slots (a file being created has no header yet).
    pub fn new_sized(file: File, path: &Path, kind: Kind, writable: bool, host_slots: u32) -> Result<Mapping> {
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        let len = kind.len(host_slots);
        if meta.len() < len as u64 {
            return Err(Error::TooShort { path: path.to_owned(), len: meta.len(), need: len as u64 });
        }
        let mut opts = MmapOptions::new();
        opts.len(len);
        let map = if writable { opts.map_raw(&file) } else { opts.map_raw_read_only(&file) }
            .map_err(|e| Error::io(path, "mmap", e))?;
        let guard = guard::register(map.as_ptr() as usize, len);
        Ok(Mapping {
            map,
            file,
            path: path.to_owned(),
            kind,
            writable,
            file_id: (meta.dev(), meta.ino()),
            guard,
            len,
            host_slots,
            counters: CountersGeometry::new(host_slots),
        })
    }

    /// Hostname slots of this mapping (0: no hostname region).
    pub fn host_slots(&self) -> u32 {
        self.host_slots
    }

    /// Keys (ports and hostname slots) this mapping holds slots or counters for.
    pub fn keys(&self) -> usize {
        PORT_SLOTS + self.host_slots as usize
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (device, inode) of the mapped file, to notice when the path names another file.
    pub fn file_id(&self) -> (u64, u64) {
        self.file_id
    }

    /// Whether the mapping may be written.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Checks that the file is still long enough for the mapping and that no access faulted
    /// past its end: a file that shrank must not be touched again (SIGBUS).
    pub fn check_size(&self) -> Result<()> {
        let need = self.len as u64;
        if self.guard.is_some_and(guard::poisoned) {
            let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
            return Err(Error::TooShort { path: self.path.clone(), len, need });
        }
        let len = self.file.metadata().map_err(|e| Error::io(&self.path, "stat", e))?.len();
        if len < need {
            return Err(Error::TooShort { path: self.path.clone(), len, need });
        }
        Ok(())
    }

    /// Whether the SIGBUS guard caught an access past the file's end (one atomic load).
    pub fn poisoned(&self) -> bool {
        self.guard.is_some_and(guard::poisoned)
    }

    /// A reference to the `T` at `off`.
    ///
    /// # Safety
    /// `T` must consist of atomics only (every bit pattern valid, shared only through atomic
    /// operations), `off + size_of::<T>()` must be within the mapping and `off` aligned for
    /// `T` (the mapping itself is page-aligned).
    unsafe fn at<T>(&self, off: usize) -> &T {
        debug_assert!(off + std::mem::size_of::<T>() <= self.len);
        debug_assert!(off % std::mem::align_of::<T>() == 0);
        // SAFETY: the caller's contract; the reference is tied to `self`, which owns the
        // mapping.
        unsafe { &*(self.map.as_ptr().add(off) as *const T) }
    }

    pub fn header(&self) -> &Header {
        debug_assert_eq!(self.kind, Kind::Routes);
        // SAFETY: Header is atomics only, 128 <= HEADER_SIZE bytes at offset 0 (page-aligned).
        unsafe { self.at(0) }
    }

    /// The slot of `port` (0..=65535; slot 0 exists but is never routed).
    pub fn port_slot(&self, port: u16) -> &PortSlot {
        debug_assert_eq!(self.kind, Kind::Routes);
        // SAFETY: PortSlot is atomics only; PORTS_OFFSET + 65535 * SLOT_SIZE + SLOT_SIZE ==
        // HOSTS_OFFSET <= len for every u16 port; offsets are multiples of 64 from a
        // page-aligned base.
        unsafe { self.at(PORTS_OFFSET + usize::from(port) * SLOT_SIZE) }
    }

    /// The slot of `key`: a port slot, or a hostname slot. A hostname key beyond this
    /// mapping's region reads as slot 0 (never routed, always empty): callers only make keys
    /// from this mapping's own count, so that is a bug's fallback, not a path.
    pub fn slot(&self, key: SlotKey) -> &PortSlot {
        match (key.as_port(), key.host_index()) {
            (Some(port), _) => self.port_slot(port),
            (None, Some(i)) if i < self.host_slots => {
                debug_assert_eq!(self.kind, Kind::Routes);
                // SAFETY: as for port slots; i < host_slots keeps HOSTS_OFFSET + (i + 1) *
                // SLOT_SIZE <= routes_file_size(host_slots) == len.
                unsafe { self.at(HOSTS_OFFSET + i as usize * SLOT_SIZE) }
            }
            _ => {
                debug_assert!(false, "{key} is outside the table");
                self.port_slot(0)
            }
        }
    }

    pub fn counters_header(&self) -> &CountersHeader {
        debug_assert_eq!(self.kind, Kind::Counters);
        // SAFETY: CountersHeader is atomics only and fits the header page at offset 0.
        unsafe { self.at(0) }
    }

    /// A key's index, or 0 (port 0: never routed) for a key beyond this mapping.
    fn key_index(&self, key: SlotKey) -> usize {
        let i = key.index();
        debug_assert!(i < self.keys(), "{key} is outside the counters");
        if i < self.keys() { i } else { 0 }
    }

    /// The counters of `key`.
    pub fn counter_slot(&self, key: SlotKey) -> &CounterSlot {
        debug_assert_eq!(self.kind, Kind::Counters);
        let i = self.key_index(key);
        // SAFETY: CounterSlot is atomics only; i < keys keeps it below workers_offset <= len,
        // 64-byte aligned.
        unsafe { self.at(COUNTERS_OFFSET + i * COUNTER_SIZE) }
    }

    /// Row `i` (< MAX_WORKERS) of worker slots.
    pub fn worker_slot(&self, i: usize) -> &WorkerSlot {
        debug_assert!(i < MAX_WORKERS);
        let i = i.min(MAX_WORKERS - 1);
        // SAFETY: WorkerSlot is atomics only; i < MAX_WORKERS keeps it inside the region,
        // 64-byte aligned.
        unsafe { self.at(self.counters.workers_offset + i * WORKER_SLOT_SIZE) }
    }

    /// The open-session cell of worker row `i` (< MAX_WORKERS) for `key`.
    pub fn cell(&self, i: usize, key: SlotKey) -> &std::sync::atomic::AtomicU64 {
        debug_assert!(i < MAX_WORKERS);
        let i = i.min(MAX_WORKERS - 1);
        let k = self.key_index(key);
        // SAFETY: an AtomicU64 at an 8-byte aligned offset inside the cells region
        // (i < MAX_WORKERS, k < keys).
        unsafe { self.at(self.counters.cells_offset + i * self.counters.cells_per_worker + k * 8) }
    }

    /// The write view of a counters mapping: `None` unless it was mapped writable. Every
    /// store and read-modify-write on counters goes through it, so a read-only mapping (a
    /// worker that may not write the file) can only be loaded from: an atomic RMW on a
    /// `PROT_READ` page is a SIGSEGV.
    pub fn rw(&self) -> Option<Rw<'_>> {
        self.writable.then_some(Rw(self))
    }

    /// The parts of `off..off + len` (clipped to the mapping) that hold data, as (offset,
    /// length) pairs: holes of a sparse file are left out, so a scan over them reads no page
    /// (on tmpfs a read fault on a shared mapping allocates the page). Where the file system
    /// cannot say, the whole range.
    pub fn data_extents(&self, off: usize, len: usize) -> Vec<(usize, usize)> {
        use std::os::fd::AsRawFd;
        let end = off.saturating_add(len).min(self.len);
        let mut out = Vec::new();
        let mut at = off;
        let fd = self.file.as_raw_fd();
        while at < end {
            // SAFETY: lseek on a descriptor this mapping owns; it only moves the file offset,
            // which nothing of ours uses (reads are positional).
            let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    out.push((at, end - at));
                }
                break;
            }
            let data = (data as usize).max(at);
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            let hole = if hole < 0 { end } else { (hole as usize).min(end) };
            out.push((data, hole - data));
            at = hole;
        }
        out
    }

    /// Where worker row `i`'s cells lie in the file: (offset, length).
    pub fn row_cells(&self, i: usize) -> (usize, usize) {
        (self.counters.cells_offset + i.min(MAX_WORKERS - 1) * self.counters.cells_per_worker, self.keys() * 8)
    }

    /// Offset of worker slot `i` in the file (its first byte carries the row's liveness lock).
    pub fn worker_slot_offset(&self, i: usize) -> usize {
        self.counters.workers_offset + i.min(MAX_WORKERS - 1) * WORKER_SLOT_SIZE
    }

    /// Checks the header against the layout this build knows. Cheap: a few atomic loads.
    pub fn validate(&self) -> Result<()> {
        // The magic first, then an Acquire fence, then the rest: the writer stores the magic
        // last with Release at init, so seeing it means seeing the header. (Relaxed + fence:
        // readers map the file read-only, where only Relaxed loads are plain loads.)
        let magic = match self.kind {
            Kind::Routes => self.header().magic.load(Ordering::Relaxed),
            Kind::Counters => self.counters_header().magic.load(Ordering::Relaxed),
        };
        std::sync::atomic::fence(Ordering::Acquire);
        let (version, checks) = match self.kind {
            Kind::Routes => {
                let h = self.header();
                let hosts_at = if self.host_slots > 0 { HOSTS_OFFSET } else { 0 };
                let checks: [(bool, &'static str); 7] = [
                    (h.header_size.load(Ordering::Relaxed) as usize == HEADER_SIZE, "header size"),
                    (h.port_slots.load(Ordering::Relaxed) as usize == PORT_SLOTS, "port slot count"),
                    (h.slot_size.load(Ordering::Relaxed) as usize == SLOT_SIZE, "slot size"),
                    (h.ports_offset.load(Ordering::Relaxed) as usize == PORTS_OFFSET, "ports offset"),
                    (h.host_slots.load(Ordering::Relaxed) == self.host_slots, "hostname slot count"),
                    (h.hosts_offset.load(Ordering::Relaxed) as usize == hosts_at, "hostname offset"),
                    (h.file_size.load(Ordering::Relaxed) as usize == self.len, "file size"),
                ];
                (h.version.load(Ordering::Relaxed), checks)
            }
            Kind::Counters => {
                let h = self.counters_header();
                let checks: [(bool, &'static str); 7] = [
                    (h.port_slots.load(Ordering::Relaxed) as usize == PORT_SLOTS, "port slot count"),
                    (h.counter_size.load(Ordering::Relaxed) as usize == COUNTER_SIZE, "counter size"),
                    (h.worker_slots.load(Ordering::Relaxed) as usize == MAX_WORKERS, "worker slots"),
                    (h.host_slots.load(Ordering::Relaxed) == self.host_slots, "hostname slot count"),
                    (h.workers_offset.load(Ordering::Relaxed) as usize == self.counters.workers_offset, "workers offset"),
                    (h.cells_offset.load(Ordering::Relaxed) as usize == self.counters.cells_offset, "cells offset"),
                    (h.file_size.load(Ordering::Relaxed) as usize == self.len, "file size"),
                ];
                (h.version.load(Ordering::Relaxed), checks)
            }
        };
        let want = if self.kind == Kind::Routes { MAGIC } else { COUNTERS_MAGIC };
        if magic != want {
            return Err(Error::BadMagic { path: self.path.clone(), found: magic });
        }
        if version != LAYOUT_VERSION {
            return Err(Error::Version {
                path: self.path.clone(),
                found: version,
                expected: LAYOUT_VERSION,
            });
        }
        if let Some((_, what)) = checks.iter().find(|(ok, _)| !ok) {
            return Err(Error::Geometry { path: self.path.clone(), what });
        }
        Ok(())
    }

    /// Writes a fresh routes header: every field, then the magic last (Release).
    pub fn init_header(&self, pid: u32, now_ms: u64) {
        let h = self.header();
        h.magic.store(0, Ordering::Relaxed);
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.header_size.store(HEADER_SIZE as u32, Ordering::Relaxed);
        h.port_slots.store(PORT_SLOTS as u32, Ordering::Relaxed);
        h.slot_size.store(SLOT_SIZE as u32, Ordering::Relaxed);
        h.counter_size.store(COUNTER_SIZE as u32, Ordering::Relaxed);
        h.host_slots.store(self.host_slots, Ordering::Relaxed);
        h.ports_offset.store(PORTS_OFFSET as u64, Ordering::Relaxed);
        h.counters_offset.store(0, Ordering::Relaxed);
        let hosts_at = if self.host_slots > 0 { HOSTS_OFFSET } else { 0 };
        h.hosts_offset.store(hosts_at as u64, Ordering::Relaxed);
        h.file_size.store(self.len as u64, Ordering::Relaxed);
        h.host_probe_max.store(0, Ordering::Relaxed);
        h.generation.store(0, Ordering::Relaxed);
        h.heartbeat_ms.store(now_ms, Ordering::Relaxed);
        h.writer_pid.store(pid, Ordering::Relaxed);
        h.clean.store(1, Ordering::Relaxed);
        // Release: publishes every store above to a reader that Acquire-loads the magic.
        h.magic.store(MAGIC, Ordering::Release);
    }

    /// Writes a fresh counters header, magic last.
    pub fn init_counters_header(&self) {
        let h = self.counters_header();
        h.magic.store(0, Ordering::Relaxed);
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.header_size.store(HEADER_SIZE as u32, Ordering::Relaxed);
        h.port_slots.store(PORT_SLOTS as u32, Ordering::Relaxed);
        h.counter_size.store(COUNTER_SIZE as u32, Ordering::Relaxed);
        h.worker_slots.store(MAX_WORKERS as u32, Ordering::Relaxed);
        h.host_slots.store(self.host_slots, Ordering::Relaxed);
        h.counters_offset.store(COUNTERS_OFFSET as u64, Ordering::Relaxed);
        h.workers_offset.store(self.counters.workers_offset as u64, Ordering::Relaxed);
        h.cells_offset.store(self.counters.cells_offset as u64, Ordering::Relaxed);
        h.file_size.store(self.len as u64, Ordering::Relaxed);
        h.magic.store(COUNTERS_MAGIC, Ordering::Release);
    }

    /// Flushes the mapping to the file (a no-op for tmpfs, meaningful on disk).
    pub fn flush(&self) -> Result<()> {
        self.map.flush().map_err(|e| Error::io(&self.path, "msync", e))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Some(slot) = self.guard {
            guard::unregister(slot);
        }
    }
}

/// Proof that a counters mapping may be written (only [`Mapping::rw`] makes one): the
/// accessors for counters that are stored to or changed by read-modify-writes.
#[derive(Clone, Copy)]
pub(crate) struct Rw<'a>(&'a Mapping);

impl<'a> Rw<'a> {
    pub fn counters_header(self) -> &'a CountersHeader {
        self.0.counters_header()
    }

    pub fn counter_slot(self, key: SlotKey) -> &'a CounterSlot {
        self.0.counter_slot(key)
    }

    pub fn worker_slot(self, i: usize) -> &'a WorkerSlot {
        self.0.worker_slot(i)
    }

    pub fn cell(self, i: usize, key: SlotKey) -> &'a std::sync::atomic::AtomicU64 {
        self.0.cell(i, key)
    }

    /// The mapping, for loads.
    pub fn map(self) -> &'a Mapping {
        self.0
    }
}
