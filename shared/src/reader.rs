//! The lock-free reader: route lookups and counter updates, as nginx workers and tools use them.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::layout::CounterSlot;
use crate::mapping::Mapping;
use crate::route::Route;
use crate::seqlock;

/// What one lookup of a port found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A live route: connect there.
    Live(Route),
    /// The port has no route (never set, removed, or the slot's words make no route).
    Absent,
    /// The port had a route that expired.
    Expired(Route),
    /// The writer stayed inside the slot for all retries (it died mid-write): fail closed.
    Busy,
}

/// The header's changing fields, for tools and health checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HeaderInfo {
    /// Bumped by the writer on every change.
    pub generation: u64,
    /// The writer's last heartbeat, unix milliseconds.
    pub heartbeat_ms: u64,
    /// The pid that last took the writer lock.
    pub writer_pid: u32,
}

/// A snapshot of one port's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Counters {
    pub connections_total: u64,
    pub connections_active: u64,
    pub refused_total: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub last_activity_ms: u64,
}

/// A mapped, validated route table, opened for reading (and for counters, when writable).
pub struct Table {
    map: Mapping,
}

impl Table {
    /// Opens and validates the table at `path`: read-write if permitted (so counters can be
    /// added), read-only otherwise.
    pub fn open(path: &Path) -> Result<Table> {
        let rw = OpenOptions::new().read(true).write(true).open(path);
        let (file, writable) = match rw {
            Ok(f) => (f, true),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                (std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?, false)
            }
            Err(e) => return Err(Error::io(path, "open", e)),
        };
        Table::from_mapping(Mapping::new(&file, path, writable)?)
    }

    /// Opens the table read-only: lookups and counter snapshots, no counter updates.
    pub fn open_read_only(path: &Path) -> Result<Table> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
        Table::from_mapping(Mapping::new(&file, path, false)?)
    }

    pub(crate) fn from_mapping(map: Mapping) -> Result<Table> {
        map.validate()?;
        Ok(Table { map })
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// The file this table maps.
    pub fn path(&self) -> &Path {
        self.map.path()
    }

    /// (device, inode) of the mapped file. A different id at [`Table::path`] means the file
    /// was replaced (deleted and created anew) since it was mapped.
    pub fn file_id(&self) -> (u64, u64) {
        self.map.file_id()
    }

    /// Whether this process may add to the counters.
    pub fn counters_writable(&self) -> bool {
        self.map.writable()
    }

    /// Re-checks the header (magic, version, geometry); a few atomic loads.
    pub fn validate(&self) -> Result<()> {
        self.map.validate()
    }

    /// The header's generation, heartbeat and writer pid.
    pub fn header_info(&self) -> HeaderInfo {
        let h = self.map.header();
        HeaderInfo {
            generation: h.generation.load(Ordering::Acquire),
            heartbeat_ms: h.heartbeat_ms.load(Ordering::Relaxed),
            writer_pid: h.writer_pid.load(Ordering::Relaxed),
        }
    }

    /// Looks `port` up at wall-clock time `now_ms` (unix milliseconds). One seqlock read.
    #[inline]
    pub fn lookup(&self, port: u16, now_ms: u64) -> Lookup {
        match seqlock::read(self.map.port_slot(port)) {
            None => Lookup::Busy,
            Some(raw) => match raw.decode() {
                None => Lookup::Absent,
                Some(r) if r.expired_at(now_ms) => Lookup::Expired(r),
                Some(r) => Lookup::Live(r),
            },
        }
    }

    /// Every port with a route (live or expired), in port order.
    pub fn routes(&self) -> impl Iterator<Item = (u16, Route)> + '_ {
        (1..=u16::MAX).filter_map(move |port| {
            seqlock::read(self.map.port_slot(port)).and_then(|raw| raw.decode()).map(|r| (port, r))
        })
    }

    /// A snapshot of `port`'s counters.
    pub fn counters(&self, port: u16) -> Counters {
        let c = self.map.counter_slot(port);
        // Relaxed: each counter is an independent value; a snapshot need not be consistent
        // across fields.
        Counters {
            connections_total: c.connections_total.load(Ordering::Relaxed),
            connections_active: c.connections_active.load(Ordering::Relaxed),
            refused_total: c.refused_total.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            last_activity_ms: c.last_activity_ms.load(Ordering::Relaxed),
        }
    }

    fn counter_slot(&self, port: u16) -> Option<&CounterSlot> {
        self.map.writable().then(|| self.map.counter_slot(port))
    }

    /// Counts a connection refused on `port` (no live route).
    pub fn count_refused(&self, port: u16, now_ms: u64) {
        if let Some(c) = self.counter_slot(port) {
            // Relaxed: a statistic; no other memory is published through it.
            c.refused_total.fetch_add(1, Ordering::Relaxed);
            c.last_activity_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }

    /// Counts a connection accepted on `port` and now being proxied.
    pub fn count_open(&self, port: u16, now_ms: u64) {
        if let Some(c) = self.counter_slot(port) {
            // Relaxed: statistics only.
            c.connections_total.fetch_add(1, Ordering::Relaxed);
            c.connections_active.fetch_add(1, Ordering::Relaxed);
            c.last_activity_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }

    /// Counts the close of a connection that `count_open` counted, with its bytes.
    pub fn count_close(&self, port: u16, bytes_in: u64, bytes_out: u64, now_ms: u64) {
        if let Some(c) = self.counter_slot(port) {
            // Relaxed: statistics only. Saturating, so that a table re-initialised under open
            // connections never shows a wrapped gauge.
            let _ = c.connections_active.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
            c.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
            c.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
            c.last_activity_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }
}

/// Unix time in milliseconds from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
