//! The per-process view of the route table and the one decision made per connection.
//!
//! Plain Rust with no nginx symbols, so unit tests reach every branch. The nginx glue calls
//! [`RouteSource::decide`] once per connection and [`RouteSource::close`] when it ends, and
//! logs the [`Notice`]s they return.
//!
//! The table may be missing when nginx starts, may appear later, may be deleted, truncated,
//! made unreadable or replaced. The source re-checks its files at most every [`RETRY_MS`]
//! (monotonic milliseconds) while it has no table and every [`RECHECK_MS`] while it has one:
//! the path must still name the mapped file, the file must still be long enough and valid.
//! Anything else fails closed: the mapping is dropped and connections are refused until a
//! valid table is back. A routes mapping is released at once (sessions copy what they need);
//! a counters mapping is kept until the last session that counts into it has ended.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gpugate_routes::{counters_path, CounterFile, Error, HostKey, Lookup, NameRefusal, Outcome, Route, SlotKey, Table, WorkerRow};

pub use crate::names::{check_domain, parse_name};
pub use crate::sink::CounterSink;

/// How often (monotonic ms) a process without a valid table tries to open it again.
pub const RETRY_MS: u64 = 100;
/// How often (monotonic ms) a process with a table checks that it is still the valid file at
/// the path.
pub const RECHECK_MS: u64 = 1000;

/// Checks a `gpugate_flush_interval` value in milliseconds: 0 (off) or 50 ms to 1 hour.
pub fn check_flush_interval(ms: u64) -> Result<u64, &'static str> {
    match ms {
        0 | 50..=3_600_000 => Ok(ms),
        1..50 => Err("is too short: at least 50ms (or 0 to turn live accounting and revoke off)"),
        _ => Err("is too long: at most 1h"),
    }
}

/// Timer deadlines are rounded up to this grid (ms), so the timers of many sessions expire
/// together and a worker wakes about 1000 / TICK_GRID_MS times a second, not once per
/// millisecond in which some session was opened.
pub const TICK_GRID_MS: u64 = 64;

/// The delay to the first grid point at least `interval` from now.
pub fn grid_delay(now: u64, interval: u64) -> u64 {
    let at = now.wrapping_add(interval);
    interval + (TICK_GRID_MS - at % TICK_GRID_MS) % TICK_GRID_MS
}

/// What the module answers for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteStatus {
    /// A live route: proxy to it.
    Ok,
    /// The port has no route.
    NoRoute,
    /// The port's route has expired.
    Expired,
    /// The writer kept rewriting the slot during every retry of the read.
    Busy,
    /// The table file does not exist.
    NoTable,
    /// The table file exists but cannot be used (wrong magic or version, short, unreadable).
    BadTable,
    /// Name routing refused the server name before any lookup (`NoRoute` is a name looked up
    /// and not found).
    Name(NameRefusal),
}

impl RouteStatus {
    /// The value of `$gpugate_route_status`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RouteStatus::Ok => "ok",
            RouteStatus::NoRoute => "no_route",
            RouteStatus::Expired => "expired",
            RouteStatus::Busy => "busy",
            RouteStatus::NoTable => "no_table",
            RouteStatus::BadTable => "bad_table",
            RouteStatus::Name(why) => why.as_str(),
        }
    }
}

/// The decision for one connection, kept in the session for every later use.
#[derive(Clone, Copy, Debug)]
pub struct Decision {
    pub status: RouteStatus,
    /// The slot whose counters and revoke epoch are this session's (the port, or the name
    /// route's slot).
    pub key: SlotKey,
    /// The route found (also for `Expired`, for the log).
    pub route: Option<Route>,
    /// The route's owner stamp, which tags this session's counters.
    pub owner: u64,
    /// Where this session's close is counted (null: not counted), and the worker row its
    /// open was counted in (`None`: not in the gauge).
    pub sink: *const CounterSink,
    pub row: Option<WorkerRow>,
    /// The port's revoke epoch when the session opened, and which mapping of the table it
    /// was read from (epochs of another file mean nothing).
    pub epoch: u64,
    pub table_serial: u32,
}

impl Decision {
    /// What a session holds before its lookup (a ClientHello still arriving): nothing.
    pub fn pending() -> Decision {
        Decision::refused(RouteStatus::Busy)
    }

    /// A refusal that counts nowhere per slot.
    fn refused(status: RouteStatus) -> Decision {
        Decision {
            status,
            key: SlotKey::default(),
            route: None,
            owner: 0,
            sink: std::ptr::null(),
            row: None,
            epoch: 0,
            table_serial: 0,
        }
    }
}

/// What a connection is looked up by.
#[derive(Clone, Copy, Debug)]
enum Target {
    Port(u16),
    Name(HostKey),
}

/// Something the process should log once: a change of the table's state.
#[derive(Debug)]
pub enum Notice {
    /// The routes file was mapped (`replaced`: a new file took the place of another).
    Opened { path: PathBuf, replaced: bool },
    /// The counters file was mapped; `writable`: whether this process may count.
    Counting { path: PathBuf, writable: bool },
    /// The routes file cannot be used; logged once per cause until it can.
    Unusable(Error),
    /// The counters file cannot be used (routing goes on, uncounted); once per cause.
    CountersUnusable(Error),
    /// Every worker row of the counters file is held: this process's open sessions are not
    /// in the gauge until it gets one (it tries again every second); once per file.
    NoRow { path: PathBuf },
}

/// One process's handle on the configured table files.
pub struct RouteSource {
    path: PathBuf,
    counters_path: PathBuf,
    routes: RefCell<Option<Table>>,
    /// How many routes tables were mapped so far: names the current one for revoke checks
    /// (and tells "replaced" from "opened").
    serial: Cell<u32>,
    counters: Cell<*const CounterSink>,
    /// Every counters mapping some session or `counters` still points at; boxed so the
    /// pointers stay valid when the vector reallocates.
    #[allow(clippy::vec_box)]
    sinks: RefCell<Vec<Box<CounterSink>>>,
    next_check_ms: Cell<u64>,
    /// The cause last logged for each file, so each cause is logged once.
    logged_cause: Cell<Option<&'static str>>,
    logged_counters_cause: Cell<Option<&'static str>>,
    /// Whether the last failure was "missing" (NoTable) rather than unusable (BadTable).
    missing: Cell<bool>,
    /// Sessions open now per slot (routed ones), so that a re-map can rebase them.
    open: RefCell<HashMap<SlotKey, u32>>,
    /// For sessions opened under an earlier mapping: each open slot's revoke epoch in the
    /// current mapping when it was mapped. Such a session is revoked once its slot's epoch
    /// moves on from this.
    rebased: RefCell<HashMap<SlotKey, u64>>,
}

fn same_file(path: &Path, id: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id)
}

impl RouteSource {
    /// A source for the routes file at `path` (its counters file beside it); nothing is
    /// opened until [`RouteSource::refresh`] or a decision.
    pub fn new(path: PathBuf) -> RouteSource {
        RouteSource {
            counters_path: counters_path(&path),
            path,
            routes: RefCell::new(None),
            serial: Cell::new(0),
            counters: Cell::new(std::ptr::null()),
            sinks: RefCell::new(Vec::new()),
            next_check_ms: Cell::new(0),
            logged_cause: Cell::new(None),
            logged_counters_cause: Cell::new(None),
            missing: Cell::new(true),
            open: RefCell::new(HashMap::new()),
            rebased: RefCell::new(HashMap::new()),
        }
    }

    /// The configured path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-checks both files now (at configuration time, worker start and on the schedule);
    /// returns what to log.
    pub fn refresh(&self, mono_ms: u64) -> Vec<Notice> {
        let mut notices = Vec::new();
        self.refresh_routes(&mut notices);
        self.refresh_counters(&mut notices);
        let next = if self.routes.borrow().is_some() { RECHECK_MS } else { RETRY_MS };
        self.next_check_ms.set(mono_ms.saturating_add(next));
        notices
    }

    fn refresh_routes(&self, notices: &mut Vec<Notice>) {
        let mut slot = self.routes.borrow_mut();
        if let Some(t) = slot.as_ref() {
            let broken = if t.poisoned() {
                Some(t.check().err().unwrap_or(Error::Replaced { path: self.path.clone() }))
            } else if !same_file(&self.path, t.file_id()) {
                None
            } else {
                match t.check() {
                    Ok(()) => return,
                    Err(e) => Some(e),
                }
            };
            // Deleted, replaced, shrunk or overwritten: stop using it at once.
            *slot = None;
            if let Some(e) = broken {
                self.fail(e, notices);
                return;
            }
        }
        match Table::open_routes(&self.path) {
            Ok(t) => {
                // Sessions of earlier mappings stay revocable: from now on they answer to
                // this table's epochs, as they stand at the re-map.
                let rebased = self.open.borrow().keys().map(|&k| (k, t.revoke_epoch(k))).collect();
                *self.rebased.borrow_mut() = rebased;
                *slot = Some(t);
                self.logged_cause.set(None);
                let serial = self.serial.get();
                self.serial.set(serial.wrapping_add(1));
                notices.push(Notice::Opened { path: self.path.clone(), replaced: serial > 0 });
            }
            Err(e) => self.fail(e, notices),
        }
    }

    fn fail(&self, err: Error, notices: &mut Vec<Notice>) {
        self.missing.set(matches!(err, Error::Missing { .. }));
        if self.logged_cause.get() != Some(err.cause()) {
            self.logged_cause.set(Some(err.cause()));
            notices.push(Notice::Unusable(err));
        }
    }

    fn sink(&self) -> Option<&CounterSink> {
        let p = self.counters.get();
        // SAFETY: `counters` is null or points into a Box owned by `self.sinks`, which frees
        // a sink only after `counters` stopped pointing at it; the borrow is tied to `&self`.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    fn refresh_counters(&self, notices: &mut Vec<Notice>) {
        if let Some(s) = self.sink() {
            let ok = !s.file.poisoned()
                && same_file(&self.counters_path, s.file.file_id())
                && s.file.check().is_ok();
            if ok {
                return;
            }
            self.retire_current();
        }
        let opened = match CounterFile::open(&self.counters_path, true) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::PermissionDenied => {
                CounterFile::open(&self.counters_path, false)
            }
            other => other,
        };
        match opened {
            Ok(file) => {
                let writable = file.writable();
                let sink = Box::new(CounterSink::new(file));
                self.counters.set(&*sink as *const CounterSink);
                self.sinks.borrow_mut().push(sink);
                self.logged_counters_cause.set(None);
                notices.push(Notice::Counting { path: self.counters_path.clone(), writable });
            }
            Err(e) => {
                if self.logged_counters_cause.get() != Some(e.cause()) {
                    self.logged_counters_cause.set(Some(e.cause()));
                    notices.push(Notice::CountersUnusable(e));
                }
            }
        }
    }

    /// Stops counting into the current counters file; frees it once no session uses it.
    fn retire_current(&self) {
        let p = self.counters.replace(std::ptr::null());
        self.release_row(p);
        self.free_idle_sinks();
    }

    fn release_row(&self, p: *const CounterSink) {
        if p.is_null() {
            return;
        }
        // SAFETY: `p` was the current sink, owned by `self.sinks` and not yet freed.
        unsafe { &*p }.release();
    }

    fn free_idle_sinks(&self) {
        let current = self.counters.get();
        self.sinks
            .borrow_mut()
            .retain(|s| std::ptr::eq(&**s, current) || s.sessions.get() > 0);
    }

    /// At worker start: map the table if needed and claim this worker's counter row, which
    /// also clears the rows of workers that died (so the open-session gauge is true again).
    pub fn worker_start(&self, mono_ms: u64) -> Vec<Notice> {
        let notices = self.refresh(mono_ms);
        if let Some(s) = self.sink() {
            let _ = s.row(mono_ms);
        }
        notices
    }

    /// At worker exit: give back this worker's counter rows (its sessions end with it).
    pub fn worker_exit(&self) {
        for s in self.sinks.borrow().iter() {
            s.release();
        }
    }

    /// The one lookup of a connection to local `port`: `mono_ms` schedules re-checks,
    /// `wall_ms` (unix milliseconds) decides expiry.
    pub fn decide(&self, port: u16, mono_ms: u64, wall_ms: u64) -> (Decision, Vec<Notice>) {
        self.decide_for(Target::Port(port), mono_ms, wall_ms)
    }

    /// The one lookup of a connection routed by name: `name` is the TLS server name the
    /// client sent (empty: none), `domain` the server's `gpugate_name_domain`. A name that is
    /// not `<env-id>.<service>.<domain>`, or that has no live route, is refused and counted
    /// by reason.
    pub fn decide_name(&self, name: &[u8], domain: &str, mono_ms: u64, wall_ms: u64) -> (Decision, Vec<Notice>) {
        match parse_name(name, domain) {
            Ok(key) => self.decide_for(Target::Name(key), mono_ms, wall_ms),
            Err(why) => self.refuse_name(why, mono_ms),
        }
    }

    /// Refuses a connection that name routing could not even look up (not TLS, no name, a
    /// name outside the domain), counting it by reason.
    pub fn refuse_name(&self, why: NameRefusal, mono_ms: u64) -> (Decision, Vec<Notice>) {
        let notices = self.maybe_refresh(mono_ms);
        if let Some(s) = self.sink() {
            s.file.count_name_refused(why);
        }
        (Decision::refused(RouteStatus::Name(why)), notices)
    }

    /// On a session's timer: the re-checks a decision would make (so that an idle worker
    /// notices a replaced table too); returns what to log.
    pub fn tick(&self, mono_ms: u64) -> Vec<Notice> {
        self.maybe_refresh(mono_ms)
    }

    fn maybe_refresh(&self, mono_ms: u64) -> Vec<Notice> {
        let poisoned = self.routes.borrow().as_ref().is_some_and(|t| t.poisoned())
            || self.sink().is_some_and(|s| s.file.poisoned());
        if mono_ms >= self.next_check_ms.get() || poisoned {
            self.refresh(mono_ms)
        } else {
            Vec::new()
        }
    }

    fn decide_for(&self, target: Target, mono_ms: u64, wall_ms: u64) -> (Decision, Vec<Notice>) {
        let mut notices = self.maybe_refresh(mono_ms);
        let routes = self.routes.borrow();
        let Some(table) = routes.as_ref() else {
            let status = if self.missing.get() { RouteStatus::NoTable } else { RouteStatus::BadTable };
            return (Decision::refused(status), notices);
        };
        // The epoch first, then the route, read after it (Acquire): the writer removes a
        // route before it bumps the epoch, so a session that gets a route removed for good
        // always holds an epoch from before the bump (see `Writer::remove_and_revoke`).
        let (lookup, owner, key, epoch) = match target {
            Target::Port(port) => {
                let (lookup, owner, epoch) = table.lookup_for_session(port, wall_ms);
                (lookup, owner, Some(SlotKey::port(port)), epoch)
            }
            Target::Name(k) => table.lookup_host_for_session(k, wall_ms),
        };
        let (status, route) = match lookup {
            Lookup::Live(r) => (RouteStatus::Ok, Some(r)),
            Lookup::Absent => (RouteStatus::NoRoute, None),
            Lookup::Expired(r) => (RouteStatus::Expired, Some(r)),
            Lookup::Busy => (RouteStatus::Busy, None),
        };
        let mut sink = std::ptr::null();
        let mut row = None;
        if let (RouteStatus::Ok, Some(k)) = (status, key) {
            *self.open.borrow_mut().entry(k).or_insert(0) += 1;
        }
        if let Some(s) = self.sink() {
            match (status, key) {
                (RouteStatus::Ok, Some(k)) => {
                    row = s.row(mono_ms);
                    if row.is_none() && s.file.writable() && !s.said_no_row.replace(true) {
                        notices.push(Notice::NoRow { path: self.counters_path.clone() });
                    }
                    s.file.session_open(row, k, owner, wall_ms);
                    s.sessions.set(s.sessions.get() + 1);
                    sink = s as *const CounterSink;
                }
                (_, Some(k)) => s.file.count_refused(k),
                // A name with no slot: counted by reason only (there is nothing per name).
                (_, None) => s.file.count_name_refused(NameRefusal::NoRoute),
            }
        }
        let key = key.unwrap_or_default();
        (Decision { status, key, route, owner, sink, row, epoch, table_serial: self.serial.get() }, notices)
    }

    /// Whether the session given `d` was revoked since it opened: its slot's revoke epoch
    /// moved on, in the mapping it opened under, or (opened under an earlier mapping of the
    /// table) since the current mapping was made. Unknown while no table is mapped: false.
    pub fn revoked(&self, d: &Decision) -> bool {
        let routes = self.routes.borrow();
        let Some(t) = routes.as_ref().filter(|t| !t.poisoned()) else { return false };
        let now = t.revoke_epoch(d.key);
        if self.serial.get() == d.table_serial {
            return now != d.epoch;
        }
        self.rebased.borrow().get(&d.key).is_some_and(|&at_remap| now != at_remap)
    }

    /// Adds the bytes an open session moved since its last flush (deltas) to its counters.
    pub fn flush(&self, d: &Decision, bytes_in: u64, bytes_out: u64, wall_ms: u64) {
        if d.sink.is_null() {
            return;
        }
        // SAFETY: as in `close`: the sink outlives every session that points at it.
        let s = unsafe { &*d.sink };
        if !s.file.poisoned() {
            s.file.session_flush(d.key, d.owner, bytes_in, bytes_out, wall_ms);
        }
    }

    /// Counts the end of a session that [`RouteSource::decide`] gave `d`.
    pub fn close(&self, d: &Decision, outcome: Outcome, bytes_in: u64, bytes_out: u64, wall_ms: u64) {
        if d.status == RouteStatus::Ok {
            let mut open = self.open.borrow_mut();
            if let Some(n) = open.get_mut(&d.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(&d.key);
                    self.rebased.borrow_mut().remove(&d.key);
                }
            }
        }
        if d.sink.is_null() {
            return;
        }
        // SAFETY: a sink a session points at stays in `self.sinks` until its session count
        // is back to zero, which only this call brings about.
        let s = unsafe { &*d.sink };
        // A file that shrank is not touched; its sessions are simply not counted.
        if !s.file.poisoned() {
            s.file.session_close(d.row, d.key, d.owner, outcome, bytes_in, bytes_out, wall_ms);
        }
        s.sessions.set(s.sessions.get().saturating_sub(1));
        if s.sessions.get() == 0 && !std::ptr::eq(d.sink, self.counters.get()) {
            self.free_idle_sinks();
        }
    }

    /// How many counters mappings this process holds (the current one and retired ones still
    /// used by open sessions).
    pub fn mapped_counters(&self) -> usize {
        self.sinks.borrow().len()
    }
}

#[cfg(test)]
#[path = "test_support.rs"]
mod test_support;

#[cfg(test)]
#[path = "route_source_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "restart_tests.rs"]
mod restart_tests;
