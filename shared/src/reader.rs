//! The lock-free reader: route lookups, as nginx workers, the API and tools make them, and
//! counter snapshots. Readers map the routes file read-only: nothing but the writer can change
//! a route.

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::counters::{counters_path, CounterFile, Counters};
use crate::error::{Error, Result};
use crate::hosts::{self, HostKey, SlotState};
use crate::layout::{SlotKey, HOSTS_OFFSET, SLOT_SIZE};
use crate::mapping::{Kind, Mapping};
use crate::route::{RawRoute, Route};
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
    /// The writer rewrote the slot throughout every retry of the read: fail closed.
    Busy,
}

/// The header's changing fields, for tools and health checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeaderInfo {
    /// Bumped by the writer on every change.
    pub generation: u64,
    /// The writer's last heartbeat, unix milliseconds.
    pub heartbeat_ms: u64,
    /// The pid that last took the writer lock.
    pub writer_pid: u32,
    /// Whether no writer is inside the table (the last one closed cleanly).
    pub clean: bool,
}

/// A mapped, validated routes file, with its counters file when there is one.
pub struct Table {
    map: Mapping,
    counters: Option<CounterFile>,
}

impl Table {
    /// Opens the routes file at `path` alone, read-only: what nginx needs to route.
    pub fn open_routes(path: &Path) -> Result<Table> {
        let map = Mapping::new(crate::files::open_nofollow(path, false)?, path, Kind::Routes, false)?;
        Table::from_parts(map, None)
    }

    /// Opens the routes file read-only and its counters file read-only, for tools and the API
    /// (a missing counters file reads as zero counters).
    pub fn open_read_only(path: &Path) -> Result<Table> {
        let mut t = Table::open_routes(path)?;
        t.counters = match CounterFile::open(&counters_path(path), false) {
            Ok(c) => Some(c),
            Err(Error::Missing { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(t)
    }

    pub(crate) fn from_parts(map: Mapping, counters: Option<CounterFile>) -> Result<Table> {
        map.validate()?;
        Ok(Table { map, counters })
    }

    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// The counters file opened with this table, if any.
    pub fn counter_file(&self) -> Option<&CounterFile> {
        self.counters.as_ref()
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

    /// Re-checks the header (magic, version, geometry); a few atomic loads.
    pub fn validate(&self) -> Result<()> {
        self.map.validate()
    }

    /// Re-checks the file's size (one `fstat`) and the header: a file that shrank must not be
    /// read again.
    pub fn check(&self) -> Result<()> {
        self.map.check_size()?;
        self.map.validate()
    }

    /// Whether an access faulted past the end of a shrunken file (one atomic load; see
    /// [`crate::install_sigbus_guard`]).
    pub fn poisoned(&self) -> bool {
        self.map.poisoned()
    }

    /// The header's generation, heartbeat, writer pid and clean mark.
    pub fn header_info(&self) -> HeaderInfo {
        let h = self.map.header();
        // Relaxed + fence(Acquire) (read-only mapping): a reader that sees a generation also
        // sees the slot writes before it.
        let generation = h.generation.load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        HeaderInfo {
            generation,
            heartbeat_ms: h.heartbeat_ms.load(Ordering::Relaxed),
            writer_pid: h.writer_pid.load(Ordering::Relaxed),
            clean: h.clean.load(Ordering::Relaxed) == 1,
        }
    }

    /// Looks `port` up at wall-clock time `now_ms` (unix milliseconds). One seqlock read.
    #[inline]
    pub fn lookup(&self, port: u16, now_ms: u64) -> Lookup {
        self.lookup_owned(port, now_ms).0
    }

    /// [`Table::lookup`], with the owner stamp of the route found (0 when there is none), which
    /// tags the session's counters.
    #[inline]
    pub fn lookup_owned(&self, port: u16, now_ms: u64) -> (Lookup, u64) {
        match seqlock::read(self.map.port_slot(port)) {
            None => (Lookup::Busy, 0),
            Some(raw) => match raw.decode() {
                None => (Lookup::Absent, 0),
                Some(r) if r.expired_at(now_ms) => (Lookup::Expired(r), raw.owner),
                Some(r) => (Lookup::Live(r), raw.owner),
            },
        }
    }

    /// The revoke epoch of `key` (a port or a hostname slot): sessions opened under an
    /// earlier epoch are to be closed.
    #[inline]
    pub fn revoke_epoch(&self, key: impl Into<SlotKey>) -> u64 {
        // Relaxed: a session compares it with the value it read at open; a late sight of a
        // bump only delays the close to the next flush.
        self.map.slot(key.into()).revoke_epoch.load(Ordering::Relaxed)
    }

    /// Every port with a route (live or expired), in port order.
    pub fn routes(&self) -> impl Iterator<Item = (u16, Route)> + '_ {
        (1..=u16::MAX).filter_map(move |port| {
            seqlock::read(self.map.port_slot(port)).and_then(|raw| raw.decode()).map(|r| (port, r))
        })
    }

    /// Hostname slots of this table (0: it has no hostname region).
    pub fn host_slots(&self) -> u32 {
        self.map.host_slots()
    }

    /// The longest probe a hostname lookup makes (the header's bound, capped by the region).
    pub fn host_probe_max(&self) -> u32 {
        // Relaxed + fence(Acquire): the writer raises it (Release) before it writes a slot that
        // far out; a reader that then sees the slot's sequence also sees the bound (and a
        // reader that sees an old bound cannot have seen the new slot's key either).
        let n = self.map.header().host_probe_max.load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        n.min(self.map.host_slots())
    }

    /// Finds the slot keyed with `key`: `Ok(Some((slot key, words)))`, `Ok(None)` when the key
    /// is in no slot, `Err(())` when a slot on the way stayed busy (fail closed).
    pub(crate) fn find_host(&self, key: HostKey) -> std::result::Result<Option<(SlotKey, RawRoute)>, ()> {
        let slots = self.map.host_slots();
        if slots == 0 {
            return Ok(None);
        }
        for step in 0..self.host_probe_max() {
            let at = SlotKey::host(key.probe(step, slots));
            let raw = seqlock::read(self.map.slot(at)).ok_or(())?;
            match hosts::state(&raw) {
                SlotState::Empty => return Ok(None),
                SlotState::Keyed(k) if k == key => return Ok(Some((at, raw))),
                SlotState::Keyed(_) => {}
            }
        }
        Ok(None)
    }

    /// Looks the hostname route of `key` up at `now_ms`: what [`Table::lookup_owned`] answers
    /// for a port, plus the slot it lives in (which names its counters and revoke epoch).
    /// At most `host_probe_max` seqlock reads.
    pub fn lookup_host(&self, key: HostKey, now_ms: u64) -> (Lookup, u64, Option<SlotKey>) {
        match self.find_host(key) {
            Err(()) => (Lookup::Busy, 0, None),
            Ok(None) => (Lookup::Absent, 0, None),
            Ok(Some((at, raw))) => match raw.decode() {
                None => (Lookup::Absent, 0, None),
                Some(r) if r.expired_at(now_ms) => (Lookup::Expired(r), raw.owner, Some(at)),
                Some(r) => (Lookup::Live(r), raw.owner, Some(at)),
            },
        }
    }

    /// The slot of `key`'s hostname route (live or expired), if it has one: where its
    /// counters are.
    pub fn host_slot(&self, key: HostKey) -> Option<SlotKey> {
        match self.find_host(key) {
            Ok(Some((at, raw))) if raw.decode().is_some() => Some(at),
            _ => None,
        }
    }

    /// Every hostname route (live or expired), in slot order. Reads only the parts of the
    /// region that exist in the file (never-written slots of a sparse file are holes, and
    /// reading them would allocate their pages).
    pub fn host_routes(&self) -> impl Iterator<Item = (SlotKey, Route)> + '_ {
        self.host_slot_words().filter_map(|(at, raw)| raw.and_then(|raw| raw.decode()).map(|r| (at, r)))
    }

    /// The hostname slots in the file's data extents with their words (`None`: the slot
    /// stayed busy throughout the read).
    fn host_slot_words(&self) -> impl Iterator<Item = (SlotKey, Option<RawRoute>)> + '_ {
        let slots = self.map.host_slots() as usize;
        let extents = self.map.data_extents(HOSTS_OFFSET, slots * SLOT_SIZE);
        extents
            .into_iter()
            .flat_map(move |(off, len)| {
                let first = (off - HOSTS_OFFSET) / SLOT_SIZE;
                let last = (off + len - HOSTS_OFFSET).div_ceil(SLOT_SIZE).min(slots);
                first..last
            })
            .map(move |i| {
                let at = SlotKey::host(i as u32);
                (at, seqlock::read(self.map.slot(at)))
            })
    }

    /// Every route with its counters, port slots first, then hostname slots: each slot is
    /// read once and the counting worker rows are listed once for the whole pass (what an
    /// activity report reads each interval; [`Table::counters`] per key reads its slot again
    /// and every row). Counters are zero without a counters file.
    pub fn counted_routes(&self) -> impl Iterator<Item = (SlotKey, Route, Counters)> + '_ {
        self.counted_routes_of(1..=u16::MAX)
    }

    /// [`Table::counted_routes`] over the port slots of `ports` (and every hostname slot).
    pub(crate) fn counted_routes_of<'a>(
        &'a self,
        ports: impl Iterator<Item = u16> + 'a,
    ) -> impl Iterator<Item = (SlotKey, Route, Counters)> + 'a {
        let rows = self.counters.as_ref().map(CounterFile::counting_rows).unwrap_or_default();
        let ports = ports.map(|port| (SlotKey::port(port), seqlock::read(self.map.port_slot(port))));
        let hosts = self.host_slot_words();
        ports.chain(hosts).filter_map(move |(key, raw)| {
            let raw = raw?;
            let route = raw.decode()?;
            let counters = self.counters.as_ref().map_or_else(Counters::default, |c| c.snapshot_in(key, Some(raw.owner), rows));
            Some((key, route, counters))
        })
    }

    /// The revoke epoch of `key`, loaded so that every read after it is ordered after it.
    fn epoch_before(&self, key: SlotKey) -> u64 {
        // Relaxed + fence(Acquire) (read-only mapping): pairs with the writer's Release bump
        // after a removal, so the route read that follows sees the removal if this load saw
        // the bump (see [`crate::Writer::remove_and_revoke`]).
        let epoch = self.map.slot(key).revoke_epoch.load(Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Acquire);
        epoch
    }

    /// What a new session of `port` needs, in the order that leaves no revoke window: the
    /// port's revoke epoch first, then the route read after it (as [`Table::lookup_owned`]).
    /// Returns (lookup, owner stamp, epoch).
    pub fn lookup_for_session(&self, port: u16, now_ms: u64) -> (Lookup, u64, u64) {
        let epoch = self.epoch_before(SlotKey::port(port));
        let (lookup, owner) = self.lookup_owned(port, now_ms);
        (lookup, owner, epoch)
    }

    /// [`Table::lookup_for_session`] for a hostname route: the slot is found first, then its
    /// epoch is loaded and the slot read again after it; the second read decides (a route
    /// removed meanwhile is absent). Returns (lookup, owner stamp, slot, epoch).
    pub fn lookup_host_for_session(&self, key: HostKey, now_ms: u64) -> (Lookup, u64, Option<SlotKey>, u64) {
        let at = match self.find_host(key) {
            Err(()) => return (Lookup::Busy, 0, None, 0),
            Ok(None) => return (Lookup::Absent, 0, None, 0),
            Ok(Some((at, _))) => at,
        };
        let epoch = self.epoch_before(at);
        let Some(raw) = seqlock::read(self.map.slot(at)) else { return (Lookup::Busy, 0, None, 0) };
        if hosts::state(&raw) != SlotState::Keyed(key) {
            return (Lookup::Absent, 0, None, 0);
        }
        match raw.decode() {
            None => (Lookup::Absent, 0, None, 0),
            Some(r) if r.expired_at(now_ms) => (Lookup::Expired(r), raw.owner, Some(at), epoch),
            Some(r) => (Lookup::Live(r), raw.owner, Some(at), epoch),
        }
    }

    /// A snapshot of the counters of `key` (a port or a hostname slot) for its current route
    /// (zero without a counters file).
    pub fn counters(&self, key: impl Into<SlotKey>) -> Counters {
        let key = key.into();
        let Some(c) = &self.counters else { return Counters::default() };
        let owner = seqlock::read(self.map.slot(key))
            .filter(|raw| raw.decode().is_some())
            .map(|raw| raw.owner);
        c.snapshot(key, owner)
    }
}
