//! The single writer: creates the table files, holds the lock, writes routes in place.
//!
//! Trust nothing already on disk: the directory must be the writer's own and writable by no one
//! else, so that nobody else can delete, replace or plant a file there; files are opened
//! without following symbolic links and must be the writer's own and carry the table's magic
//! and layout version (a file of zeros is not a table). New files are initialised under a
//! temporary name and linked into place, so a reader never sees a half-made one.
//!
//! The lock is an `flock` on the directory, not on the file: a writer whose file is deleted
//! keeps the lock, so a standby cannot create a second table and become a second writer
//! meanwhile; the holder notices the deletion at its next [`Writer::heartbeat`] and gives up
//! the table, and whoever takes the lock next creates a fresh one. One directory holds one
//! table.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::clock::now_ms;
use crate::counters::{counters_path, CounterFile, Counters};
use crate::error::{Error, Result};
use crate::files;
use crate::hosts::{self, HostKey, SlotState};
use crate::layout::{check_host_slots, SlotKey, DEFAULT_HOST_SLOTS, HOSTS_OFFSET, MAGIC, PORT_SLOTS, SLOT_SIZE};
use crate::mapping::{Kind, Mapping};
use crate::port_set::PortSet;
use crate::reader::Table;
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

/// What [`Writer::set_host`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostWrite {
    /// The slot the route lives in (its counters and revoke epoch).
    pub key: SlotKey,
    /// Whether anything was written (false: the slot already held exactly this route).
    pub changed: bool,
}

/// What [`Writer::open`] found and did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The routes file did not exist and was created.
    pub created: bool,
    /// The previous writer did not close cleanly, so every slot was settled.
    pub settled: bool,
    /// Slots whose copies had to be repaired (a writer died inside them).
    pub repaired: usize,
}

/// The one process allowed to change the table. Dropping it marks the table clean and
/// releases the lock.
pub struct Writer {
    table: Table,
    path: PathBuf,
    counters_path: PathBuf,
    report: OpenReport,
    /// The ports whose slots hold a route (kept with every write; the writer is the only one).
    routed: PortSet,
    /// Whether dropping marks the table clean (false only in tests that play a crash).
    clean_on_drop: bool,
    // Holds the flock for as long as the writer lives (closing it releases the lock).
    _dir: File,
}

fn mode_of(file: &File, path: &Path) -> Result<u32> {
    Ok(file.metadata().map_err(|e| Error::io(path, "stat", e))?.mode() & 0o7777)
}

impl Writer {
    /// Opens the table at `path` for writing, creating its directory and files when missing
    /// (with [`DEFAULT_HOST_SLOTS`] hostname slots; an existing table keeps its own count),
    /// and takes the writer lock. Anything it did not make is refused, never overwritten.
    pub fn open(path: &Path, lock: LockMode) -> Result<Writer> {
        Writer::open_inner(path, lock, None)
    }

    /// [`Writer::open`] for a table with `host_slots` hostname slots (0 or a power of two,
    /// see [`check_host_slots`]). An existing table with another count is refused: its
    /// files must be removed to change it (nginx maps the new ones without a reload).
    pub fn open_with(path: &Path, lock: LockMode, host_slots: u32) -> Result<Writer> {
        Writer::open_inner(path, lock, Some(host_slots))
    }

    fn open_inner(path: &Path, lock: LockMode, wanted: Option<u32>) -> Result<Writer> {
        let host_slots = wanted.unwrap_or(DEFAULT_HOST_SLOTS);
        check_host_slots(host_slots).map_err(Error::InvalidRoute)?;
        let dir_path = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let dir = files::writer_dir(&dir_path)?;
        let locked = files::flock(&dir, lock == LockMode::Wait).map_err(|e| Error::io(&dir_path, "lock", e))?;
        if !locked {
            return Err(Error::Locked { path: path.to_owned(), holder: holder_pid(path) });
        }
        let mut report = OpenReport::default();
        let pid = std::process::id();

        let routes = match files::open_owned(&dir, path)? {
            Some(f) => f,
            None => {
                report.created = true;
                let size = Kind::Routes.len(host_slots) as u64;
                files::create_whole(&dir, path, size, 0o644, |f| {
                    let dup = f.try_clone().map_err(|e| Error::io(path, "dup", e))?;
                    let map = Mapping::new_sized(dup, path, Kind::Routes, true, host_slots)?;
                    // Hostname slots stay zero (empty) and sparse until used.
                    for port in 0..=u16::MAX {
                        seqlock::write(map.port_slot(port), &RawRoute::EMPTY);
                    }
                    map.init_header(pid, now_ms());
                    Ok(())
                })?
            }
        };
        // Only the writer's user may write routes; readers keep whatever read access the
        // operator gave (0644, or 0640 with a group).
        let mode = mode_of(&routes, path)?;
        if mode != (mode & 0o644) | 0o600 {
            files::set_mode(&routes, path, (mode & 0o644) | 0o600)?;
        }
        let map = Mapping::new(routes, path, Kind::Routes, true)?;
        map.validate()?;
        // Without a wish, an existing table keeps the count it was made with.
        let host_slots = if wanted.is_none() { map.host_slots() } else { host_slots };
        if map.host_slots() != host_slots {
            return Err(Error::Unsafe {
                path: path.to_owned(),
                what: "file",
                why: format!(
                    "has {} hostname slots, but {host_slots} are configured: remove the table \
                     files (the writer rebuilds them from the database; nginx maps the new \
                     ones without a reload) or configure {}",
                    map.host_slots(),
                    map.host_slots()
                ),
            });
        }

        let cpath = counters_path(path);
        let counters = match files::open_owned(&dir, &cpath)? {
            Some(f) => f,
            None => files::create_whole(&dir, &cpath, Kind::Counters.len(host_slots) as u64, 0o664, |f| {
                let dup = f.try_clone().map_err(|e| Error::io(&cpath, "dup", e))?;
                let cmap = Mapping::new_sized(dup, &cpath, Kind::Counters, true, host_slots)?;
                cmap.init_counters_header();
                // Routes kept from an earlier counters file: tag their words with the owner
                // stamps they carry, so their sessions count again at once (a fresh file's
                // words carry tag 0, which no route has).
                let fresh = CounterFile::from_mapping(cmap)?;
                for key in stored_keys(&map) {
                    if let Some(raw) = seqlock::read(map.slot(key)).filter(|raw| raw.decode().is_some()) {
                        fresh.reset(key, raw.owner);
                    }
                }
                Ok(())
            })?,
        };
        // Workers write counters (group write, the group of a setgid directory); never others.
        let cmode = mode_of(&counters, &cpath)?;
        if cmode & 0o002 != 0 {
            files::set_mode(&counters, &cpath, cmode & !0o002)?;
        }
        let counters = CounterFile::from_mapping(Mapping::new(counters, &cpath, Kind::Counters, true)?)?;
        if counters.host_slots() != host_slots {
            return Err(Error::Geometry { path: cpath, what: "hostname slot count differs from the routes file's" });
        }

        let table = Table::from_parts(map, Some(counters))?;
        let h = table.mapping().header();
        // Relaxed: `clean` is only read and written by writers, which the lock serialises.
        if h.clean.load(Ordering::Relaxed) != 1 {
            report.settled = true;
            for key in stored_keys(table.mapping()) {
                if seqlock::settle(table.mapping().slot(key)) {
                    report.repaired += 1;
                }
            }
        }
        h.clean.store(0, Ordering::Relaxed);
        h.writer_pid.store(pid, Ordering::Relaxed);
        let mut routed = PortSet::new();
        for (port, _) in table.routes() {
            routed.insert(port);
        }
        let writer = Writer {
            table,
            path: path.to_owned(),
            counters_path: cpath,
            report,
            routed,
            clean_on_drop: true,
            _dir: dir,
        };
        writer.counters().sweep_dead();
        writer.heartbeat()?;
        Ok(writer)
    }

    fn mapping(&self) -> &Mapping {
        self.table.mapping()
    }

    fn counters(&self) -> &CounterFile {
        // Always present: `open` maps the counters file before building the table.
        self.table.counter_file().expect("the writer's table has its counters file")
    }

    /// What opening the table found (created, settled after a crash, slots repaired).
    pub fn open_report(&self) -> OpenReport {
        self.report
    }

    /// The reader view of the table this writer holds.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Records a sign of life in the header, after checking that the table's paths still name
    /// the files this writer holds and that they have not shrunk. An error means this writer
    /// must let go of the table: it was deleted, replaced or truncated under it.
    pub fn heartbeat(&self) -> Result<()> {
        self.verify()?;
        // Relaxed: an informational timestamp, published with no other data.
        self.mapping().header().heartbeat_ms.store(now_ms(), Ordering::Relaxed);
        Ok(())
    }

    fn verify(&self) -> Result<()> {
        let ours = [(&self.path, self.table.file_id()), (&self.counters_path, self.counters().file_id())];
        for (path, id) in ours {
            if files::path_id(path) != Some(id) {
                return Err(Error::Replaced { path: path.clone() });
            }
        }
        self.mapping().check_size()?;
        self.counters().mapping().check_size()
    }

    fn bump_generation(&self) {
        // Release: a reader that sees the new generation also sees the slot just written.
        self.mapping().header().generation.fetch_add(1, Ordering::Release);
    }

    /// Points `port` at `route`. Port 0 is refused. Writes nothing if the slot already holds
    /// exactly this route. When the port changes hands (another environment or generation)
    /// the route gets a new owner stamp and its counters start over first.
    pub fn set(&mut self, port: u16, route: &Route) -> Result<bool> {
        if port == 0 {
            return Err(Error::InvalidRoute("port 0 cannot be routed".into()));
        }
        route.validate()?;
        Ok(self.write_slot(SlotKey::port(port), route, false))
    }

    /// Writes `route` into the slot `key` unless it already holds exactly that; `keyed` for
    /// hostname slots. Returns whether it wrote.
    fn write_slot(&mut self, key: SlotKey, route: &Route, keyed: bool) -> bool {
        let slot = self.mapping().slot(key);
        let current = seqlock::read(slot);
        let same_owner = current.and_then(|c| c.decode().map(|r| (r, c.owner))).and_then(|(r, owner)| {
            (r.env_id == route.env_id && r.generation == route.generation).then_some(owner)
        });
        let encode = |owner| if keyed { hosts::keyed(route, owner) } else { RawRoute::encode(route, owner) };
        let raw = match same_owner {
            Some(owner) => {
                // Counters reset for another stamp (a writer that died between the reset and
                // the route write) would drop this route's counts for good: tag them again.
                if self.counters().owner_of(key) != owner {
                    self.counters().reset(key, owner);
                }
                let raw = encode(owner);
                if current == Some(raw) {
                    return false;
                }
                raw
            }
            None => {
                let owner = self.counters().next_owner(key, current.map_or(0, |c| c.owner));
                // Before the route write, so the new owner's sessions find their tag.
                self.counters().reset(key, owner);
                encode(owner)
            }
        };
        seqlock::write(slot, &raw);
        if let Some(port) = key.as_port() {
            self.routed.insert(port);
        }
        self.bump_generation();
        true
    }

    /// Stores the hostname route of `route`'s (environment id, service): rewritten in its
    /// slot if the key has one, else in the first free slot of the key's probe sequence.
    /// The route needs an environment id; a table without hostname slots, or with none free
    /// within reach, refuses.
    pub fn set_host(&mut self, route: &Route) -> Result<HostWrite> {
        route.validate()?;
        if route.env_id.as_str().is_empty() {
            return Err(Error::InvalidRoute("a hostname route needs an environment id".into()));
        }
        let slots = self.mapping().host_slots();
        if slots == 0 {
            return Err(Error::InvalidRoute(format!(
                "route table \"{}\" has no hostname slots",
                self.path.display()
            )));
        }
        let key = HostKey::of(route);
        if let Some(at) = self.find_host(key) {
            return Ok(HostWrite { key: at, changed: self.write_slot(at, route, true) });
        }
        // The key is in no slot: take the first free (empty or tombstone) one.
        let limit = self.mapping().header().host_probe_max.load(Ordering::Relaxed);
        for step in 0..slots {
            let at = SlotKey::host(key.probe(step, slots));
            let raw = seqlock::read(self.mapping().slot(at)).unwrap_or(RawRoute::EMPTY);
            if raw.decode().is_some() {
                continue;
            }
            if step >= limit {
                // Release: a reader that sees this slot's new sequence (Acquire) also sees
                // the bound that lets it look this far.
                self.mapping().header().host_probe_max.store(step + 1, Ordering::Release);
            }
            self.write_slot(at, route, true);
            return Ok(HostWrite { key: at, changed: true });
        }
        Err(Error::InvalidRoute(format!(
            "route table \"{}\": all {slots} hostname slots are in use",
            self.path.display()
        )))
    }

    /// The slot keyed with `key`, live or tombstone (the writer's view: no slot is ever busy
    /// for the writer itself).
    fn find_host(&self, key: HostKey) -> Option<SlotKey> {
        let slots = self.mapping().host_slots();
        if slots == 0 {
            return None;
        }
        // Relaxed: only the writer stores it.
        let limit = self.mapping().header().host_probe_max.load(Ordering::Relaxed).min(slots);
        for step in 0..limit {
            let at = SlotKey::host(key.probe(step, slots));
            match seqlock::read(self.mapping().slot(at)).map(|raw| hosts::state(&raw)) {
                Some(SlotState::Empty) => return None,
                Some(SlotState::Keyed(k)) if k == key => return Some(at),
                _ => {}
            }
        }
        None
    }

    /// Removes the hostname route of `key`, leaving a tombstone; returns whether it had one.
    pub fn remove_host(&mut self, key: HostKey) -> Result<bool> {
        let Some(at) = self.find_host(key) else { return Ok(false) };
        let slot = self.mapping().slot(at);
        if seqlock::read(slot).and_then(|raw| raw.decode()).is_none() {
            return Ok(false);
        }
        seqlock::write(slot, &hosts::tombstone(key));
        self.bump_generation();
        Ok(true)
    }

    /// Revokes every session open on `key`'s hostname route (as [`Writer::revoke`] does for
    /// a port); returns the new epoch, or `None` when the key has no slot.
    pub fn revoke_host(&mut self, key: HostKey) -> Result<Option<u64>> {
        let Some(at) = self.find_host(key) else { return Ok(None) };
        Ok(Some(self.bump_epoch(at)))
    }

    /// Raises the revoke epoch of `key`'s hostname slot to `at_least` (see
    /// [`Writer::raise_revoke_epoch`]); false when the key has no slot or the epoch was there.
    pub fn raise_host_revoke_epoch(&mut self, key: HostKey, at_least: u64) -> Result<bool> {
        let Some(at) = self.find_host(key) else { return Ok(false) };
        Ok(self.raise_epoch(at, at_least))
    }

    fn bump_epoch(&mut self, at: SlotKey) -> u64 {
        // Release: ordered after everything written before it (a removal that goes with it).
        let epoch = self.mapping().slot(at).revoke_epoch.fetch_add(1, Ordering::Release) + 1;
        self.bump_generation();
        epoch
    }

    fn raise_epoch(&mut self, at: SlotKey, at_least: u64) -> bool {
        let epoch = &self.mapping().slot(at).revoke_epoch;
        // Relaxed load: only the writer, holding the lock, stores it.
        if epoch.load(Ordering::Relaxed) >= at_least {
            return false;
        }
        epoch.store(at_least, Ordering::Release);
        self.bump_generation();
        true
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
        self.routed.remove(port);
        self.bump_generation();
        Ok(true)
    }

    /// Revokes every session open on `port` now: bumps the port's revoke epoch, and nginx
    /// closes each session opened before it within one flush interval (`gpugate_flush_interval`).
    /// The route itself is unchanged: new connections still go where it points. Returns the
    /// new epoch. To end a route's sessions as it goes, remove it *first*:
    /// [`Writer::remove_and_revoke`].
    pub fn revoke(&mut self, port: u16) -> Result<u64> {
        if port == 0 {
            return Err(Error::InvalidRoute("port 0 cannot be routed".into()));
        }
        Ok(self.bump_epoch(SlotKey::port(port)))
    }

    /// Removes the route of `port`, then revokes the sessions still open on it (none is
    /// revoked when the port had no route); returns whether it had one.
    ///
    /// The order leaves no window: a reader loads the epoch (Acquire) *before* it reads the
    /// route, and the bump here is a Release store made after the removal. A connection that
    /// sees the new epoch therefore sees the removal and is refused; one that still sees the
    /// old epoch may get the old route, but its session holds the old epoch, which this bump
    /// revokes. (Bumping first would let a connection between the two steps take the route
    /// with the new epoch: a session that no later revoke reaches.)
    pub fn remove_and_revoke(&mut self, port: u16) -> Result<bool> {
        if !self.remove(port)? {
            return Ok(false);
        }
        self.revoke(port)?;
        Ok(true)
    }

    /// [`Writer::remove_and_revoke`] for a hostname route: removed (a tombstone), then its
    /// sessions revoked; returns whether it had a route.
    pub fn remove_and_revoke_host(&mut self, key: HostKey) -> Result<bool> {
        if !self.remove_host(key)? {
            return Ok(false);
        }
        self.revoke_host(key)?;
        Ok(true)
    }

    /// Raises `port`'s revoke epoch to `at_least` if it is lower (closing the sessions opened
    /// before now, as [`Writer::revoke`] does); returns whether it did. A request recorded as
    /// "at least the epoch seen plus one" is thus applied once however often it is replayed,
    /// and never closes sessions opened after it was applied.
    pub fn raise_revoke_epoch(&mut self, port: u16, at_least: u64) -> Result<bool> {
        if port == 0 {
            return Err(Error::InvalidRoute("port 0 cannot be routed".into()));
        }
        Ok(self.raise_epoch(SlotKey::port(port), at_least))
    }

    /// [`Table::counted_routes`] over the ports this writer has routed rather than every
    /// port slot: a pass at 10,000 routes reads 10,000 port slots, not 65,535 (the pass an
    /// activity report makes each interval).
    pub fn counted_routes(&self) -> impl Iterator<Item = (SlotKey, Route, Counters)> + '_ {
        self.table.counted_routes_of(self.routed.iter())
    }

    /// Flushes the mappings to their files (meaningful when the table is on disk, not tmpfs).
    pub fn flush(&self) -> Result<()> {
        self.mapping().flush()?;
        self.counters().mapping().flush()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Every write is complete: the next writer may skip settling. Not on a file that
        // shrank (touching it would fault) or that is no longer the table.
        if self.clean_on_drop && self.verify().is_ok() {
            // Release: a later writer (after the lock passes, which orders it anyway) sees
            // every slot store before the mark.
            self.mapping().header().clean.store(1, Ordering::Release);
        }
    }
}

/// The pid recorded by the current holder, if the routes file already has a valid header.
fn holder_pid(path: &Path) -> Option<u32> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).ok()?;
    let mut head = [0u8; 84];
    file.read_exact_at(&mut head, 0).ok()?;
    let magic = u64::from_le_bytes(head[0..8].try_into().ok()?);
    let pid = u32::from_le_bytes(head[80..84].try_into().ok()?);
    (magic == MAGIC && pid != 0).then_some(pid)
}

/// Every port slot key, and every hostname slot key whose bytes exist in the file: a sparse
/// hostname region's holes hold nothing (never written), and reading them would allocate
/// their pages (tmpfs allocates on a read fault of a shared mapping).
fn stored_keys(map: &Mapping) -> Vec<SlotKey> {
    let mut keys: Vec<SlotKey> = (0..=u16::MAX).map(SlotKey::port).collect();
    let slots = map.host_slots() as usize;
    for (off, len) in map.data_extents(HOSTS_OFFSET, slots * SLOT_SIZE) {
        let first = (off - HOSTS_OFFSET) / SLOT_SIZE;
        let last = (off + len - HOSTS_OFFSET).div_ceil(SLOT_SIZE).min(slots);
        keys.extend((first..last).map(|i| SlotKey::host(i as u32)));
    }
    keys
}

const _: () = assert!(PORT_SLOTS == u16::MAX as usize + 1);

#[path = "writer_sync.rs"]
mod sync;

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
