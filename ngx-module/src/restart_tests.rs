//! The per-process view across restarts and failures: a worker that may not write the
//! counters, a worker that found no row, sessions of a table that was re-mapped.

use std::os::unix::fs::FileExt;
use std::path::Path;

use super::test_support::{route, table_path as tmp};
use super::*;
use gpugate_routes::layout::{CountersGeometry, WORKER_SLOT_SIZE, MAX_WORKERS};
use gpugate_routes::{LockMode, Writer};

const CHILD_ENV: &str = "GPUGATE_TEST_NOBODY_TABLE";

/// In the child (as nobody): route and refuse through a table whose counters it may only read.
fn route_as_nobody(path: &Path) {
    let src = RouteSource::new(path.to_owned());
    let notices = src.worker_start(1_000);
    assert!(
        notices.iter().any(|n| matches!(n, Notice::Counting { writable: false, .. })),
        "says once that it does not count: {notices:?}"
    );
    for i in 0..3u64 {
        let (d, _) = src.decide(20000, 1_000 + i, 10 + i);
        assert_eq!(d.status, RouteStatus::Ok, "routed");
        src.flush(&d, 10, 20, 11 + i);
        src.close(&d, Outcome::Proxied, 10, 20, 12 + i);
        assert_eq!(src.decide(20001, 1_000 + i, 10).0.status, RouteStatus::NoRoute, "refused");
        assert_eq!(src.refuse_name(NameRefusal::NoName, 1_000 + i).0.status, RouteStatus::Name(NameRefusal::NoName));
    }
}

#[test]
fn a_worker_that_cannot_write_the_counters_routes_every_connection_and_lives() {
    if let Some(p) = std::env::var_os(CHILD_ENV) {
        route_as_nobody(Path::new(&p));
        return;
    }
    use std::os::unix::process::CommandExt;
    let path = tmp("nobody");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("127.0.0.1:1000")).unwrap();
    // The counters file is the writer's (0664, its group): nobody may read it, not write it.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "route_source::restart_tests::a_worker_that_cannot_write_the_counters_routes_every_connection_and_lives"])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the worker must live and route ({:?}):\n{text}", out.status);
    assert!(text.contains("1 passed"), "{text}");
    assert_eq!(w.table().counters(20000).connections_total, 0, "nothing counted by a read-only worker");
}

/// Process 1's row identity word (pid | start time << 32): a live process of this namespace.
fn init_identity() -> u64 {
    let stat = std::fs::read_to_string("/proc/1/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    let start: u64 = rest.split_whitespace().nth(22 - 3).unwrap().parse().unwrap();
    1 | ((start & 0x7fff_ffff) << 32)
}

/// Writes worker row `i`'s owner and pid namespace words straight into the counters file.
fn set_row(path: &Path, i: usize, owner: u64) {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::OpenOptions::new().write(true).open(counters_path(path)).unwrap();
    let at = (CountersGeometry::new(gpugate_routes::DEFAULT_HOST_SLOTS).workers_offset + i * WORKER_SLOT_SIZE) as u64;
    let ns = std::fs::metadata("/proc/self/ns/pid").unwrap().ino();
    f.write_all_at(&owner.to_le_bytes(), at).unwrap();
    f.write_all_at(&ns.to_le_bytes(), at + 8).unwrap();
}

#[test]
fn a_worker_that_found_every_row_held_claims_one_when_one_frees() {
    let path = tmp("rows");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("127.0.0.1:1000")).unwrap();
    for i in 0..MAX_WORKERS {
        set_row(&path, i, init_identity());
    }
    let src = RouteSource::new(path.clone());
    src.worker_start(1_000);
    let (first, notices) = src.decide(20000, 1_000, 10);
    assert_eq!(first.status, RouteStatus::Ok);
    assert!(notices.iter().any(|n| matches!(n, Notice::NoRow { .. })), "said once: {notices:?}");
    let (extra, notices) = src.decide(20000, 1_001, 10);
    assert!(notices.is_empty(), "not twice: {notices:?}");
    src.close(&extra, Outcome::Proxied, 0, 0, 10);
    assert_eq!(w.table().counters(20000).connections_active, 0, "no row: not in the gauge");
    for i in 0..MAX_WORKERS {
        set_row(&path, i, 0);
    }
    let (second, _) = src.decide(20000, 1_000 + crate::sink::ROW_RETRY_MS, 11);
    assert_eq!(w.table().counters(20000).connections_active, 1, "a row freed up: claimed and counted");
    src.close(&first, Outcome::Proxied, 0, 0, 12);
    assert_eq!(w.table().counters(20000).connections_active, 1, "the uncounted session does not take the other out");
    src.close(&second, Outcome::Proxied, 0, 0, 13);
    assert_eq!(w.table().counters(20000).connections_active, 0);
}

#[test]
fn a_session_opened_before_a_remap_is_closed_by_a_later_revoke() {
    let path = tmp("remap");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("127.0.0.1:1000")).unwrap();
    let src = RouteSource::new(path.clone());
    let (d, _) = src.decide(20000, 1_000, 10);
    assert_eq!(d.status, RouteStatus::Ok);
    // The table files are removed and the writer builds them again (epochs start over).
    drop(w);
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(counters_path(&path)).unwrap();
    // Wait, not NoWait: a sibling test's child holds a copy of the directory lock from its
    // fork until its exec, and may still be there when this writer was dropped.
    let mut w = Writer::open(&path, LockMode::Wait).unwrap();
    w.set(20000, &route("127.0.0.1:1000")).unwrap();
    let notices = src.tick(1_000 + RECHECK_MS);
    assert!(notices.iter().any(|n| matches!(n, Notice::Opened { replaced: true, .. })), "{notices:?}");
    assert!(!src.revoked(&d), "not revoked by the re-map itself");
    w.revoke(20000).unwrap();
    assert!(src.revoked(&d), "a revoke after the re-map closes the session opened before it");
    src.close(&d, Outcome::Revoked, 0, 0, 20);
}
