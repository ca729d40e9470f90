//! The per-process view of the route table and the one decision made per connection.
//!
//! Plain Rust with no nginx symbols, so unit tests reach every branch. The nginx glue calls
//! [`RouteSource::decide`] once per connection and logs the [`Notice`] it may return.
//!
//! The table may be missing when nginx starts, may appear later, may be garbage, and may be
//! replaced by a new file at the same path: the source retries opening at most every
//! [`RETRY_MS`] while it has no valid table, and checks the path for a new file at most every
//! [`RECHECK_MS`] while it has one. Tables it stops using are kept mapped until the process
//! exits, because sessions still hold pointers to them for their counters.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;

use gpugate_routes::{Error, Lookup, Route, Table};

/// How often a process without a valid table tries to open it again.
pub const RETRY_MS: u64 = 100;
/// How often a process with a table checks that the path still names the mapped file.
pub const RECHECK_MS: u64 = 1000;

/// What the module answers for one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteStatus {
    /// A live route: proxy to it.
    Ok,
    /// The port has no route.
    NoRoute,
    /// The port's route has expired.
    Expired,
    /// The slot was being written for too long (a writer died mid-write).
    Busy,
    /// The table file does not exist.
    NoTable,
    /// The table file exists but cannot be used (wrong magic or version, short, unreadable).
    BadTable,
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
        }
    }
}

/// The decision for one connection, kept in the session for every later use.
#[derive(Clone, Copy, Debug)]
pub struct Decision {
    pub status: RouteStatus,
    /// The route found (also for `Expired`, for the log).
    pub route: Option<Route>,
    /// The table the decision came from; counters of this session go there.
    pub table: *const Table,
}

/// Something the process should log once: a change of the table's state.
#[derive(Debug)]
pub enum Notice {
    /// A table was opened (`replaced`: a new file took the place of the mapped one;
    /// `counters`: whether this process may write the counters).
    Opened { path: PathBuf, replaced: bool, counters: bool },
    /// The table cannot be used; logged once per cause until it can.
    Unusable(Error),
}

/// One process's handle on the configured table file.
pub struct RouteSource {
    path: PathBuf,
    current: Cell<*const Table>,
    /// Every table ever opened here; boxed so the pointers handed out stay valid when the
    /// vector reallocates.
    #[allow(clippy::vec_box)]
    tables: RefCell<Vec<Box<Table>>>,
    next_check_ms: Cell<u64>,
    /// The cause last logged, so that each cause is logged once, not per connection.
    logged_cause: Cell<Option<&'static str>>,
    /// Whether the last failure was "missing" (NoTable) rather than unusable (BadTable).
    missing: Cell<bool>,
}

impl RouteSource {
    /// A source for `path`; nothing is opened until [`RouteSource::refresh`] or a decision.
    pub fn new(path: PathBuf) -> RouteSource {
        RouteSource {
            path,
            current: Cell::new(std::ptr::null()),
            tables: RefCell::new(Vec::new()),
            next_check_ms: Cell::new(0),
            logged_cause: Cell::new(None),
            missing: Cell::new(true),
        }
    }

    /// The configured path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn table(&self) -> Option<&Table> {
        let p = self.current.get();
        // SAFETY: `current` is null or points into a Box owned by `self.tables`, which only
        // grows and lives as long as `self`; the borrow is tied to `&self`.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// Opens the table now if it can (at configuration time, and on the retry schedule).
    pub fn refresh(&self, now_ms: u64) -> Option<Notice> {
        self.next_check_ms.set(now_ms.saturating_add(match self.table() {
            Some(_) => RECHECK_MS,
            None => RETRY_MS,
        }));
        if let Some(t) = self.table() {
            // A valid mapped table is kept unless the path now names another valid file.
            if t.validate().is_ok() && same_file(t, &self.path) {
                return None;
            }
        }
        match Table::open(&self.path) {
            Ok(t) => {
                if self.table().is_some_and(|cur| cur.file_id() == t.file_id()) {
                    // Same file, still invalid (validate failed above): keep failing closed.
                    return self.fail(self.table().and_then(|cur| cur.validate().err()));
                }
                let replaced = self.table().is_some();
                let counters = t.counters_writable();
                let boxed = Box::new(t);
                self.current.set(&*boxed as *const Table);
                self.tables.borrow_mut().push(boxed);
                self.logged_cause.set(None);
                self.next_check_ms.set(now_ms.saturating_add(RECHECK_MS));
                Some(Notice::Opened { path: self.path.clone(), replaced, counters })
            }
            Err(e) => {
                if self.table().is_some_and(|cur| cur.validate().is_ok()) {
                    // The path is gone or broken but the mapped table is fine: keep using it.
                    return None;
                }
                self.fail(Some(e))
            }
        }
    }

    fn fail(&self, err: Option<Error>) -> Option<Notice> {
        let err = err?;
        self.missing.set(matches!(err, Error::Missing { .. }));
        if self.logged_cause.get() == Some(err.cause()) {
            return None;
        }
        self.logged_cause.set(Some(err.cause()));
        Some(Notice::Unusable(err))
    }

    /// The one lookup of a connection to local `port` at `now_ms` (unix milliseconds).
    pub fn decide(&self, port: u16, now_ms: u64) -> (Decision, Option<Notice>) {
        let mut notice = None;
        if now_ms >= self.next_check_ms.get() {
            notice = self.refresh(now_ms);
        }
        let table = match self.table() {
            Some(t) => t,
            None => return (self.unavailable(), notice),
        };
        if let Err(e) = table.validate() {
            // The mapped file was overwritten with something else: fail closed, and look again
            // soon (the retry schedule, not every connection).
            self.next_check_ms.set(self.next_check_ms.get().min(now_ms.saturating_add(RETRY_MS)));
            let n = self.fail(Some(e));
            return (
                Decision { status: RouteStatus::BadTable, route: None, table },
                notice.or(n),
            );
        }
        let (status, route) = match table.lookup(port, now_ms) {
            Lookup::Live(r) => (RouteStatus::Ok, Some(r)),
            Lookup::Absent => (RouteStatus::NoRoute, None),
            Lookup::Expired(r) => (RouteStatus::Expired, Some(r)),
            Lookup::Busy => (RouteStatus::Busy, None),
        };
        match status {
            RouteStatus::Ok => table.count_open(port, now_ms),
            _ => table.count_refused(port, now_ms),
        }
        (Decision { status, route, table }, notice)
    }

    fn unavailable(&self) -> Decision {
        let status = if self.missing.get() { RouteStatus::NoTable } else { RouteStatus::BadTable };
        Decision { status, route: None, table: std::ptr::null() }
    }
}

fn same_file(t: &Table, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => (m.dev(), m.ino()) == t.file_id(),
        // Gone: keep the mapped table (it still serves); a new file is picked up when it appears.
        Err(_) => true,
    }
}

/// Counts the end of a session that [`RouteSource::decide`] counted as open.
///
/// # Safety
/// `d.table` must be null or a pointer handed out by a [`RouteSource`] that is still alive.
pub unsafe fn count_close(d: &Decision, port: u16, bytes_in: u64, bytes_out: u64, now_ms: u64) {
    if d.status != RouteStatus::Ok || d.table.is_null() {
        return;
    }
    // SAFETY: the caller guarantees the source that handed out the pointer is alive, and a
    // source never frees a table it handed out.
    let table = unsafe { &*d.table };
    table.count_close(port, bytes_in, bytes_out, now_ms);
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpugate_routes::{LockMode, Writer};

    fn tmp() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "gpugate-src-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("routes")
    }

    fn route(up: &str) -> Route {
        Route::to(up.parse().unwrap())
    }

    #[test]
    fn missing_table_is_logged_once_then_picked_up_when_created() {
        let path = tmp();
        let src = RouteSource::new(path.clone());
        let (d, n) = src.decide(20000, 1_000);
        assert_eq!(d.status, RouteStatus::NoTable);
        assert!(matches!(n, Some(Notice::Unusable(Error::Missing { .. }))));
        // Within the retry interval: no new attempt, no new log line.
        let (d, n) = src.decide(20000, 1_050);
        assert_eq!(d.status, RouteStatus::NoTable);
        assert!(n.is_none());
        // Past it, still missing: same cause, not logged again.
        let (_, n) = src.decide(20000, 1_200);
        assert!(n.is_none());

        let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
        w.set(20000, &route("127.0.0.1:22")).unwrap();
        let (d, n) = src.decide(20000, 1_400);
        assert_eq!(d.status, RouteStatus::Ok);
        assert_eq!(d.route.unwrap().upstream, "127.0.0.1:22".parse().unwrap());
        assert!(matches!(n, Some(Notice::Opened { replaced: false, .. })));
        let (d, _) = src.decide(20001, 1_401);
        assert_eq!(d.status, RouteStatus::NoRoute);
        let t = w.table();
        assert_eq!(t.counters(20000).connections_total, 1);
        assert_eq!(t.counters(20000).connections_active, 1);
        assert_eq!(t.counters(20001).refused_total, 1);
        // SAFETY: `src` is alive.
        unsafe { count_close(&d, 20001, 5, 5, 1_500) };
        assert_eq!(t.counters(20001).bytes_in, 0, "a refused session adds no bytes");
    }

    #[test]
    fn garbage_file_fails_closed_and_is_logged_once() {
        let path = tmp();
        std::fs::write(&path, vec![0xabu8; 16 << 20]).unwrap();
        let src = RouteSource::new(path.clone());
        let (d, n) = src.decide(20000, 1_000);
        assert_eq!(d.status, RouteStatus::BadTable);
        let msg = match n {
            Some(Notice::Unusable(e)) => e.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(msg.contains("not a gpugate route table"), "{msg}");
        let (d, n) = src.decide(20000, 2_000);
        assert_eq!(d.status, RouteStatus::BadTable);
        assert!(n.is_none(), "logged once per cause");

        // A short file is another cause.
        std::fs::write(&path, b"short").unwrap();
        let (_, n) = src.decide(20000, 3_000);
        assert!(matches!(n, Some(Notice::Unusable(Error::TooShort { .. }))), "{n:?}");
    }

    #[test]
    fn table_replaced_by_a_new_file_is_remapped() {
        let path = tmp();
        let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
        w.set(20000, &route("127.0.0.1:1000")).unwrap();
        let src = RouteSource::new(path.clone());
        let (d, _) = src.decide(20000, 1_000);
        assert_eq!(d.route.unwrap().upstream.port(), 1000);
        drop(w);
        std::fs::remove_file(&path).unwrap();
        // Path gone: the mapped table keeps serving.
        let (d, n) = src.decide(20000, 5_000);
        assert_eq!(d.route.unwrap().upstream.port(), 1000);
        assert!(n.is_none());
        let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
        w.set(20000, &route("127.0.0.1:2000")).unwrap();
        let (d, n) = src.decide(20000, 10_000);
        assert_eq!(d.route.unwrap().upstream.port(), 2000);
        assert!(matches!(n, Some(Notice::Opened { replaced: true, .. })));
    }

    #[test]
    fn expired_route_is_refused() {
        let path = tmp();
        let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
        let mut r = route("[::1]:22");
        r.expires_ms = Some(5_000);
        w.set(20000, &r).unwrap();
        let src = RouteSource::new(path);
        assert_eq!(src.decide(20000, 4_999).0.status, RouteStatus::Ok);
        let (d, _) = src.decide(20000, 5_000);
        assert_eq!(d.status, RouteStatus::Expired);
        assert_eq!(d.route.unwrap().upstream, "[::1]:22".parse().unwrap());
    }

    #[test]
    fn status_names() {
        assert_eq!(RouteStatus::Ok.as_str(), "ok");
        assert_eq!(RouteStatus::NoTable.as_str(), "no_table");
    }
}
