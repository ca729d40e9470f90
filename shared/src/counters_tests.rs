//! Counters that survive restarts: read-only mappings, dead rows of other pid namespaces,
//! owner stamps after long churn, re-created files, full hostname regions, revoke races.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;
use crate::hosts::HostKey;
use crate::reader::{Lookup, Table};
use crate::route::{Route, Service};
use crate::writer::{LockMode, Writer};

fn tmp_dir(tag: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!(
        "gpugate-c-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn route(env: &str, generation: u64) -> Route {
    Route {
        upstream: SocketAddr::from(([127, 0, 0, 2], 22)),
        env_id: env.parse().unwrap(),
        service: Service::Ssh,
        generation,
        expires_ms: None,
    }
}

fn name_route(env: &str, generation: u64) -> Route {
    Route { service: Service::Jupyter, ..route(env, generation) }
}

#[test]
fn a_process_with_a_read_only_mapping_counts_nothing_and_never_faults() {
    let d = tmp_dir("ro");
    let path = d.join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("alpha", 1)).unwrap();
    let owner = w.table().lookup_owned(20000, 0).1;
    let ro = CounterFile::open(&counters_path(&path), false).unwrap();
    assert!(!ro.writable());
    // In a child: an atomic read-modify-write on a PROT_READ page is a SIGSEGV.
    // SAFETY: fork in a test; the child only touches the existing mapping (no allocation,
    // no lock) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let row = ro.claim_worker();
        ro.count_refused(20001u16);
        ro.count_name_refused(NameRefusal::NoRoute);
        ro.session_open(row, 20000u16, owner, 5);
        ro.session_flush(20000u16, owner, 10, 20, 6);
        ro.session_close(row, 20000u16, owner, Outcome::Proxied, 1, 2, 7);
        ro.sweep_dead();
        let code = if row.is_none() { 0 } else { 3 };
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for the child forked above.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child must exit normally (status {status:#x}, signal {})",
        libc::WTERMSIG(status)
    );
    assert_eq!(w.table().counters(20000u16), Counters::default(), "nothing was counted");
}

/// Pids of the direct children of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

const CHILD_ENV: &str = "GPUGATE_TEST_ROW_HOLDER";

/// Run as a child (with [`CHILD_ENV`] naming the routes file): claims a row, opens one
/// session on port 20000, says so on stdout, and waits to be killed.
fn hold_a_row(path: &Path) {
    let table = Table::open_read_only(path).unwrap();
    let owner = table.lookup_owned(20000, 0).1;
    let c = CounterFile::open(&counters_path(path), true).unwrap();
    let row = c.claim_worker().expect("a row");
    c.session_open(Some(row), 20000u16, owner, 1);
    println!("HOLDING {}", row.index());
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn rows_of_a_process_killed_in_another_pid_namespace_are_swept() {
    if let Some(p) = std::env::var_os(CHILD_ENV) {
        hold_a_row(Path::new(&p));
        return;
    }
    let d = tmp_dir("pidns");
    let path = d.join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("alpha", 1)).unwrap();
    // The holder runs as pid 1 of a pid namespace of its own, like a gateway container.
    let exe = std::env::current_exe().unwrap();
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork"])
        .arg(&exe)
        .args(["--exact", "counters::restart_tests::rows_of_a_process_killed_in_another_pid_namespace_are_swept"])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .spawn()
        .expect("unshare");
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.table().counters(20000u16).connections_active == 0 {
        assert!(Instant::now() < deadline, "the holder never opened its session");
        std::thread::sleep(Duration::from_millis(20));
    }
    let holder = children_of(unshare.id());
    assert_eq!(holder.len(), 1, "the namespace's first process");
    let counters = w.table().counter_file().unwrap();
    assert_eq!(counters.sweep_dead(), 0, "a live holder keeps its row");
    assert_eq!(w.table().counters(20000u16).connections_active, 1);

    // SAFETY: kill(2) on the process this test started.
    unsafe { libc::kill(holder[0] as i32, libc::SIGKILL) };
    let _ = unshare.wait();
    assert_eq!(counters.sweep_dead(), 1, "the dead holder's row is cleared from here");
    assert_eq!(w.table().counters(20000u16).connections_active, 0, "no phantom session");
    assert_eq!(counters.workers(), 0);
}

#[test]
fn owner_tags_stay_true_after_seventy_thousand_owner_changes() {
    let d = tmp_dir("tags");
    let path = d.join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    let worker = CounterFile::open(&counters_path(&path), true).unwrap();
    let row = worker.claim_worker();
    w.set(20000, &route("alpha", 1)).unwrap();
    let owner_a = w.table().lookup_owned(20000, 0).1;
    worker.session_open(row, 20000u16, owner_a, 1);
    // Churn elsewhere: 65,535 owner changes on another port, then 20000 goes to beta (with one
    // global stamp sequence, beta's stamp would then share alpha's 16-bit tag).
    for n in 0..65_535u64 {
        w.set(30000, &route(if n % 2 == 0 { "churna" } else { "churnb" }, n)).unwrap();
    }
    w.set(20000, &route("beta", 2)).unwrap();
    let owner_b = w.table().lookup_owned(20000, 0).1;
    // Alpha's long session moves bytes and ends: none of it is beta's.
    worker.session_flush(20000u16, owner_a, 123_456, 654_321, 2);
    worker.session_close(row, 20000u16, owner_a, Outcome::Proxied, 1, 1, 3);
    assert_eq!(w.table().counters(20000u16), Counters::default(), "alpha's session charged to beta");
    for n in 65_535..70_000u64 {
        w.set(30000, &route(if n % 2 == 0 { "churna" } else { "churnb" }, n)).unwrap();
    }
    // Beta's own session counts for beta.
    worker.session_open(row, 20000u16, owner_b, 4);
    worker.session_close(row, 20000u16, owner_b, Outcome::Proxied, 10, 20, 5);
    let c = w.table().counters(20000u16);
    assert_eq!((c.connections_total, c.connections_active, c.bytes_in, c.bytes_out), (1, 0, 10, 20));
}

#[test]
fn a_recreated_counters_file_counts_the_routes_that_were_kept() {
    let d = tmp_dir("recreate");
    let path = d.join("routes");
    let mut w = Writer::open_with(&path, LockMode::NoWait, 1024).unwrap();
    w.set(20000, &route("alpha", 1)).unwrap();
    let name = w.set_host(&name_route("beta", 1)).unwrap().key;
    drop(w);
    std::fs::remove_file(counters_path(&path)).unwrap();
    let w = Writer::open(&path, LockMode::Wait).unwrap();
    let worker = CounterFile::open(&counters_path(&path), true).unwrap();
    let row = worker.claim_worker();
    for key in [SlotKey::port(20000), name] {
        let owner = Table::open_routes(&path).unwrap().counters(key);
        assert_eq!(owner, Counters::default());
        let (lookup, owner) = match key.as_port() {
            Some(p) => w.table().lookup_owned(p, 0),
            None => {
                let (l, o, _) = w.table().lookup_host(HostKey::of(&name_route("beta", 1)), 0);
                (l, o)
            }
        };
        assert!(matches!(lookup, Lookup::Live(_)));
        worker.session_open(row, key, owner, 10);
        assert_eq!(w.table().counters(key).connections_active, 1, "{key}: gauge");
        worker.session_close(row, key, owner, Outcome::Proxied, 1010, 2020, 11);
        let c = w.table().counters(key);
        assert_eq!((c.connections_total, c.bytes_in, c.bytes_out, c.last_activity_ms), (1, 1010, 2020, 11), "{key}");
    }
}

#[test]
fn a_full_hostname_region_still_loses_its_stale_names() {
    let d = tmp_dir("fullsync");
    let mut w = Writer::open_with(&d.join("routes"), LockMode::NoWait, 1024).unwrap();
    for i in 0..1024 {
        w.set_host(&name_route(&format!("stale{i}"), 1)).unwrap();
    }
    assert!(w.set_host(&name_route("extra", 1)).is_err(), "the region is full");
    let mut names: BTreeMap<HostKey, Route> =
        (0..10).map(|i| name_route(&format!("fresh{i}"), 1)).map(|r| (HostKey::of(&r), r)).collect();
    let report = w.sync_all(&BTreeMap::new(), &names).expect("sync with a full region");
    assert_eq!((report.written, report.removed), (10, 1024));
    assert_eq!(w.table().host_routes().count(), 10, "only the wanted names are left");
    // One bad name does not stop the rest: a route filed under another key is refused, the
    // others are still written and the stale ones still removed.
    let bad = name_route("bad", 1);
    names.insert(HostKey::of(&name_route("other", 1)), bad);
    names.remove(&HostKey::of(&name_route("fresh0", 1)));
    let late = name_route("late", 1);
    names.insert(HostKey::of(&late), late);
    assert!(w.sync_all(&BTreeMap::new(), &names).is_err(), "the bad name is reported");
    assert!(w.table().host_slot(HostKey::of(&late)).is_some(), "the others are written");
    assert!(w.table().host_slot(HostKey::of(&name_route("fresh0", 1))).is_none(), "stale removed");
}

#[test]
fn no_session_keeps_a_removed_route_unrevoked_under_races() {
    let d = tmp_dir("race");
    let path = d.join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    let reader = Table::open_routes(&path).unwrap();
    const ROUNDS: u64 = 100_000;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (seen, bad) = std::thread::scope(|s| {
        let r = s.spawn(|| {
            let (mut seen, mut bad) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                if let (Lookup::Live(route), _, epoch) = reader.lookup_for_session(20000, 0) {
                    seen += 1;
                    // Generation g is removed, then revoked to epoch g: a session that got it
                    // must hold an earlier epoch, or no later revoke closes it.
                    if epoch >= route.generation {
                        bad.push((route.generation, epoch));
                    }
                }
            }
            (seen, bad)
        });
        for g in 1..=ROUNDS {
            w.set(20000, &route("alpha", g)).unwrap();
            assert!(w.remove_and_revoke(20000).unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        r.join().unwrap()
    });
    assert_eq!(reader.revoke_epoch(20000u16), ROUNDS);
    assert!(seen > 0, "the reader saw the route");
    assert!(bad.is_empty(), "{} of {seen} sessions got a removed route with the new epoch: {:?}", bad.len(), &bad[..bad.len().min(5)]);
}

#[test]
fn a_new_table_allocates_its_port_slots_only() {
    use std::os::unix::fs::MetadataExt;
    // On tmpfs (where tables live), a read fault on a hole of a shared mapping allocates the
    // page; a disk file system maps the zero page instead and would hide it.
    let shm = Path::new("/dev/shm");
    let d = if shm.is_dir() {
        let d = shm.join(format!("gpugate-c-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    } else {
        tmp_dir("sparse")
    };
    let path = d.join("routes");
    let w = Writer::open(&path, LockMode::NoWait).unwrap();
    let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let routes = allocated(&path);
    let ports = (crate::layout::HOSTS_OFFSET) as u64;
    assert!(routes <= ports + (1 << 20), "routes file: {routes} bytes allocated, port slots are {ports}");
    let cpath = counters_path(&path);
    let before = allocated(&cpath);
    let c = CounterFile::open(&cpath, true).unwrap();
    let row = c.claim_worker().unwrap();
    c.session_open(Some(row), 20000u16, 1, 1);
    c.release_worker(row);
    let grown = allocated(&cpath) - before;
    assert!(grown <= 64 << 10, "a row claimed and released allocated {grown} bytes");
    drop(w);
    let _ = std::fs::remove_dir_all(&d);
}
