//! The single writer: creates and initialises the file, holds its `flock`, writes routes in place.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::layout::{FILE_SIZE, MAGIC, PORT_SLOTS};
use crate::mapping::Mapping;
use crate::reader::{now_ms, Table};
use crate::route::{RawRoute, Route};
use crate::seqlock;

/// How [`Writer::open`] waits for the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Fail at once with [`Error::Locked`] if another writer holds it.
    NoWait,
    /// Block until the other writer lets go (a standby publisher).
    Wait,
}

/// What [`Writer::sync`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Slots written because the route was missing or different.
    pub written: usize,
    /// Slots cleared because no route is wanted there.
    pub removed: usize,
}

/// The one process allowed to change the table. Dropping it releases the lock.
pub struct Writer {
    table: Table,
    // Holds the flock for as long as the writer lives (closing the file releases it).
    _file: File,
}

impl Writer {
    /// Opens the table at `path` for writing, creating and initialising it if it is missing
    /// or empty, and takes the writer lock. A file that is not a gpugate table (wrong magic,
    /// other version) is refused, never overwritten. Parent directories are created.
    pub fn open(path: &Path, lock: LockMode) -> Result<Writer> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, "create directory", e))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o664)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        lock_file(&file, path, lock)?;

        let len = file.metadata().map_err(|e| Error::io(path, "stat", e))?.len();
        let mut magic = [0u8; 8];
        let head = usize::try_from(len.min(8)).unwrap_or(8);
        file.read_exact_at(&mut magic[..head], 0).map_err(|e| Error::io(path, "read", e))?;
        let magic = u64::from_le_bytes(magic);
        let fresh = magic == 0;
        if !fresh && magic != MAGIC {
            return Err(Error::BadMagic { path: path.to_owned(), found: magic });
        }
        // Grow only: a shorter file would kill every process that has it mapped (SIGBUS).
        if len < FILE_SIZE as u64 {
            file.set_len(FILE_SIZE as u64).map_err(|e| Error::io(path, "resize", e))?;
        }
        let map = Mapping::new(&file, path, true)?;
        let pid = std::process::id();
        if fresh {
            // Group-writable regardless of the umask: nginx workers (another user, same group)
            // add to the counters in this file.
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o664))
                .map_err(|e| Error::io(path, "chmod", e))?;
            for port in 0..=u16::MAX {
                seqlock::write(map.port_slot(port), &RawRoute::EMPTY);
            }
            map.init_header(pid, now_ms());
        }
        let table = Table::from_mapping(map)?;
        let writer = Writer { table, _file: file };
        writer.header().writer_pid.store(pid, Ordering::Relaxed);
        // We hold the lock: any odd slot was left by a writer that died mid-write.
        for port in 0..=u16::MAX {
            seqlock::repair(writer.mapping().port_slot(port));
        }
        writer.heartbeat();
        Ok(writer)
    }

    fn mapping(&self) -> &Mapping {
        self.table.mapping()
    }

    fn header(&self) -> &crate::layout::Header {
        self.mapping().header()
    }

    /// The reader view of the table this writer holds.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Records a sign of life in the header.
    pub fn heartbeat(&self) {
        // Relaxed: an informational timestamp, published with no other data.
        self.header().heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn bump_generation(&self) {
        // Release: a reader that sees the new generation also sees the slot just written.
        self.header().generation.fetch_add(1, Ordering::Release);
    }

    /// Points `port` at `route`. Port 0 is refused. Writes nothing if the slot already holds
    /// exactly this route. Counters are reset when the route's environment or generation
    /// differs from the one they were counted for.
    pub fn set(&mut self, port: u16, route: &Route) -> Result<bool> {
        if port == 0 {
            return Err(Error::InvalidRoute("port 0 cannot be routed".into()));
        }
        route.validate()?;
        let raw = RawRoute::encode(route);
        let slot = self.mapping().port_slot(port);
        let current = seqlock::read(slot);
        if current == Some(raw) {
            return Ok(false);
        }
        let same_owner = current
            .and_then(|c| c.decode())
            .is_some_and(|c| c.env_id == route.env_id && c.generation == route.generation);
        if !same_owner {
            self.reset_counters(port, route.generation);
        }
        seqlock::write(slot, &raw);
        self.bump_generation();
        Ok(true)
    }

    /// Removes the route of `port`; returns whether there was one.
    pub fn remove(&mut self, port: u16) -> Result<bool> {
        if port == 0 {
            return Err(Error::InvalidRoute("port 0 cannot be routed".into()));
        }
        let slot = self.mapping().port_slot(port);
        if seqlock::read(slot) == Some(RawRoute::EMPTY) {
            return Ok(false);
        }
        seqlock::write(slot, &RawRoute::EMPTY);
        self.bump_generation();
        Ok(true)
    }

    /// Makes the table hold exactly `routes`: writes the ones that differ and clears every
    /// other slot. The whole-table re-sync of the publisher.
    pub fn sync(&mut self, routes: &BTreeMap<u16, Route>) -> Result<SyncReport> {
        let mut report = SyncReport::default();
        for (&port, route) in routes {
            if self.set(port, route)? {
                report.written += 1;
            }
        }
        let stale: Vec<u16> = self
            .table
            .routes()
            .map(|(port, _)| port)
            .filter(|port| !routes.contains_key(port))
            .collect();
        for port in stale {
            if self.remove(port)? {
                report.removed += 1;
            }
        }
        self.heartbeat();
        Ok(report)
    }

    fn reset_counters(&self, port: u16, generation: u64) {
        let c = self.mapping().counter_slot(port);
        // Relaxed: statistics; the active gauge is left alone because connections opened under
        // the previous route are still open and will be subtracted when they close.
        c.connections_total.store(0, Ordering::Relaxed);
        c.refused_total.store(0, Ordering::Relaxed);
        c.bytes_in.store(0, Ordering::Relaxed);
        c.bytes_out.store(0, Ordering::Relaxed);
        c.route_generation.store(generation, Ordering::Relaxed);
    }

    /// Flushes the mapping to its file (meaningful when the table is on disk, not tmpfs).
    pub fn flush(&self) -> Result<()> {
        self.mapping().flush()
    }
}

fn lock_file(file: &File, path: &Path, mode: LockMode) -> Result<()> {
    let flags = match mode {
        LockMode::NoWait => libc::LOCK_EX | libc::LOCK_NB,
        LockMode::Wait => libc::LOCK_EX,
    };
    loop {
        // SAFETY: flock on a descriptor this function borrows for the call; no memory involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), flags) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => {
                return Err(Error::Locked { path: path.to_owned(), holder: holder_pid(file) })
            }
            _ => return Err(Error::io(path, "lock", err)),
        }
    }
}

/// The pid recorded by the current holder, if the file already has a valid header.
fn holder_pid(file: &File) -> Option<u32> {
    let mut head = [0u8; 84];
    file.read_exact_at(&mut head, 0).ok()?;
    let magic = u64::from_le_bytes(head[0..8].try_into().ok()?);
    let pid = u32::from_le_bytes(head[80..84].try_into().ok()?);
    (magic == MAGIC && pid != 0).then_some(pid)
}

const _: () = assert!(PORT_SLOTS == u16::MAX as usize + 1);
