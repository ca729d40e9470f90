//! Mapping the table file into memory and viewing it as the layout's structs.
//! All of the crate's `unsafe` that touches the mapping lives here.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};
use crate::layout::{
    CounterSlot, Header, PortSlot, COUNTERS_OFFSET, COUNTER_SIZE, FILE_SIZE, HEADER_SIZE,
    LAYOUT_VERSION, MAGIC, PORTS_OFFSET, PORT_SLOTS, SLOT_SIZE,
};

/// A shared mapping of a table file at least [`FILE_SIZE`] bytes long.
pub(crate) struct Mapping {
    map: MmapRaw,
    path: PathBuf,
    writable: bool,
    file_id: (u64, u64),
}

impl Mapping {
    /// Maps `file` (already opened by the caller) shared, after checking its length.
    pub fn new(file: &File, path: &Path, writable: bool) -> Result<Mapping> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
        let len = meta.len();
        if len < FILE_SIZE as u64 {
            return Err(Error::TooShort { path: path.to_owned(), len, need: FILE_SIZE as u64 });
        }
        let mut opts = MmapOptions::new();
        opts.len(FILE_SIZE);
        let map = if writable { opts.map_raw(file) } else { opts.map_raw_read_only(file) }
            .map_err(|e| Error::io(path, "mmap", e))?;
        Ok(Mapping { map, path: path.to_owned(), writable, file_id: (meta.dev(), meta.ino()) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (device, inode) of the mapped file, to notice when the path names another file.
    pub fn file_id(&self) -> (u64, u64) {
        self.file_id
    }

    /// Whether counters may be written through this mapping.
    pub fn writable(&self) -> bool {
        self.writable
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is FILE_SIZE >= HEADER_SIZE bytes long and page-aligned, which
        // satisfies Header's size and 64-byte alignment; Header is made of atomics only, for
        // which every bit pattern is valid, and other processes change it only through atomic
        // operations; the reference lives no longer than `self`, which owns the mapping.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// The slot of `port` (0..=65535; slot 0 exists but is never routed).
    pub fn port_slot(&self, port: u16) -> &PortSlot {
        let off = PORTS_OFFSET + usize::from(port) * SLOT_SIZE;
        debug_assert!(off + SLOT_SIZE <= FILE_SIZE);
        // SAFETY: `off + SLOT_SIZE <= FILE_SIZE` for every u16 port (PORT_SLOTS = 65536), the
        // offset is a multiple of 64 from a page-aligned base, PortSlot is atomics only (any
        // bit pattern valid), shared only through atomic operations, and borrowed from `self`.
        unsafe { &*(self.map.as_ptr().add(off) as *const PortSlot) }
    }

    /// The counters of `port`.
    pub fn counter_slot(&self, port: u16) -> &CounterSlot {
        let off = COUNTERS_OFFSET + usize::from(port) * COUNTER_SIZE;
        debug_assert!(off + COUNTER_SIZE <= FILE_SIZE);
        // SAFETY: as for `port_slot`: in bounds for every u16, 64-byte aligned, atomics only,
        // shared only through atomic operations, borrowed from `self`.
        unsafe { &*(self.map.as_ptr().add(off) as *const CounterSlot) }
    }

    /// Checks the header against the layout this build knows. Cheap: a few atomic loads.
    pub fn validate(&self) -> Result<()> {
        let h = self.header();
        // Acquire pairs with the writer's Release store of `magic`, which it makes last when it
        // initialises a file: seeing the magic means seeing the rest of the header.
        let magic = h.magic.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(Error::BadMagic { path: self.path.clone(), found: magic });
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(Error::Version {
                path: self.path.clone(),
                found: version,
                expected: LAYOUT_VERSION,
            });
        }
        let checks: [(bool, &'static str); 6] = [
            (h.header_size.load(Ordering::Relaxed) as usize == HEADER_SIZE, "header size"),
            (h.port_slots.load(Ordering::Relaxed) as usize == PORT_SLOTS, "port slot count"),
            (h.slot_size.load(Ordering::Relaxed) as usize == SLOT_SIZE, "slot size"),
            (h.counter_size.load(Ordering::Relaxed) as usize == COUNTER_SIZE, "counter size"),
            (h.ports_offset.load(Ordering::Relaxed) as usize == PORTS_OFFSET, "ports offset"),
            (h.counters_offset.load(Ordering::Relaxed) as usize == COUNTERS_OFFSET, "counters offset"),
        ];
        if let Some((_, what)) = checks.iter().find(|(ok, _)| !ok) {
            return Err(Error::Geometry { path: self.path.clone(), what });
        }
        Ok(())
    }

    /// Writes a fresh header: every field, then the magic last (Release).
    pub fn init_header(&self, pid: u32, now_ms: u64) {
        let h = self.header();
        h.magic.store(0, Ordering::Relaxed);
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.header_size.store(HEADER_SIZE as u32, Ordering::Relaxed);
        h.port_slots.store(PORT_SLOTS as u32, Ordering::Relaxed);
        h.slot_size.store(SLOT_SIZE as u32, Ordering::Relaxed);
        h.counter_size.store(COUNTER_SIZE as u32, Ordering::Relaxed);
        h.host_slots.store(0, Ordering::Relaxed);
        h.ports_offset.store(PORTS_OFFSET as u64, Ordering::Relaxed);
        h.counters_offset.store(COUNTERS_OFFSET as u64, Ordering::Relaxed);
        h.hosts_offset.store(0, Ordering::Relaxed);
        h.file_size.store(FILE_SIZE as u64, Ordering::Relaxed);
        h.generation.store(0, Ordering::Relaxed);
        h.heartbeat_ms.store(now_ms, Ordering::Relaxed);
        h.writer_pid.store(pid, Ordering::Relaxed);
        h.reserved.store(0, Ordering::Relaxed);
        // Release: publishes every store above to a reader that Acquire-loads the magic.
        h.magic.store(MAGIC, Ordering::Release);
    }

    /// Flushes the mapping to the file (a no-op for tmpfs, meaningful on disk).
    pub fn flush(&self) -> Result<()> {
        self.map.flush().map_err(|e| Error::io(&self.path, "msync", e))
    }
}
