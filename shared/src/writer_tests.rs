//! Unit tests of the writer: what it refuses, what it repairs, what it resets.
//!
//! A table opened again after its writer was dropped is opened with `LockMode::Wait`: a test
//! that spawns a process (here and in the counters' tests) leaves a copy of every open
//! directory lock in its child from fork to exec, so `NoWait` could fail for a moment.

use super::*;
use crate::counters::Outcome;
use crate::layout::FILE_SIZE;
use crate::reader::Lookup;
use crate::route::Service;
use std::os::unix::fs::PermissionsExt;

fn tmp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gpugate-w-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn route(env: &str, port: u16, generation: u64) -> Route {
    Route {
        upstream: SocketAddr::from(([127, 0, 0, 2], port)),
        env_id: env.parse().unwrap(),
        service: Service::Ssh,
        generation,
        expires_ms: None,
    }
}
use std::collections::BTreeMap;
use std::net::SocketAddr;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn creates_files_only_the_writer_can_route_with() {
    let dir = tmp_dir("modes").join("table");
    let path = dir.join("routes");
    let w = Writer::open(&path, LockMode::NoWait).unwrap();
    assert!(w.open_report().created);
    assert_eq!(mode(&dir), 0o755, "directory");
    assert_eq!(mode(&path), 0o644, "routes: nobody but the writer writes");
    assert_eq!(mode(&counters_path(&path)), 0o664, "counters: the workers' group writes");
    // A routes file made group-writable by hand is put back.
    drop(w);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let _w = Writer::open(&path, LockMode::Wait).unwrap();
    assert_eq!(mode(&path), 0o644);
}

#[test]
fn refuses_symlinks_and_directories_others_can_change() {
    let dir = tmp_dir("links");
    let target = dir.join("elsewhere");
    std::fs::write(&target, b"").unwrap();
    let link = dir.join("routes");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = Writer::open(&link, LockMode::NoWait).err().unwrap();
    assert!(matches!(err, Error::Symlink { .. }), "{err}");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(matches!(Table::open_read_only(&link).err().unwrap(), Error::Symlink { .. }));
    assert_eq!(std::fs::read(&target).unwrap().len(), 0, "the link's target is untouched");

    for (m, who) in [(0o775, "its group"), (0o777, "everyone"), (0o1777, "everyone")] {
        let d = tmp_dir("open");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(m)).unwrap();
        let err = Writer::open(&d.join("routes"), LockMode::NoWait).err().unwrap().to_string();
        assert!(err.contains(&format!("writable by {who}")) && err.contains("chmod go-w"), "{m:o}: {err}");
        assert!(!d.join("routes").exists(), "nothing created in an unsafe directory");
    }
    // A setgid directory (the workers' group) that only the writer can write is fine.
    let d = tmp_dir("setgid");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o2755)).unwrap();
    assert!(Writer::open(&d.join("routes"), LockMode::NoWait).is_ok());
}

#[test]
fn refuses_directories_and_files_of_another_user() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("needs root to give files away; covered when tests run as root (CI)");
        return;
    }
    let d = tmp_dir("foreign-dir");
    std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
    let err = Writer::open(&d.join("routes"), LockMode::NoWait).err().unwrap().to_string();
    assert!(err.contains("is owned by uid 65534"), "{err}");

    let d = tmp_dir("foreign-file");
    let path = d.join("routes");
    drop(Writer::open(&path, LockMode::NoWait).unwrap());
    std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
    let err = Writer::open(&path, LockMode::NoWait).err().unwrap().to_string();
    assert!(err.contains("file") && err.contains("is owned by uid 65534"), "{err}");
}

#[test]
fn refuses_files_that_are_not_its_tables_and_leaves_them_alone() {
    let d = tmp_dir("foreign");
    let path = d.join("routes");
    for (content, expect) in [
        (vec![0u8; FILE_SIZE], "not a gpugate route table (magic 0x0000000000000000)"),
        (vec![0x5au8; FILE_SIZE], "not a gpugate route table"),
        (b"short".to_vec(), "is 5 bytes, expected at least"),
    ] {
        std::fs::write(&path, &content).unwrap();
        let err = Writer::open(&path, LockMode::NoWait).err().unwrap().to_string();
        assert!(err.contains(expect), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), content, "the file is never overwritten");
    }
    // A table of ours, truncated: refused by the writer and by readers, never grown back.
    std::fs::remove_file(&path).unwrap();
    drop(Writer::open(&path, LockMode::NoWait).unwrap());
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(8192).unwrap();
    assert!(matches!(Writer::open(&path, LockMode::NoWait).err().unwrap(), Error::TooShort { .. }));
    assert!(matches!(Table::open_read_only(&path).err().unwrap(), Error::TooShort { .. }));
}

#[test]
fn a_deleted_table_never_makes_two_writers() {
    let d = tmp_dir("twice");
    let path = d.join("routes");
    let mut w1 = Writer::open(&path, LockMode::NoWait).unwrap();
    w1.set(20000, &route("a", 22, 1)).unwrap();
    let err = Writer::open(&path, LockMode::NoWait).err().unwrap();
    assert!(matches!(err, Error::Locked { holder: Some(p), .. } if p == std::process::id()), "{err}");
    std::fs::remove_file(&path).unwrap();
    // The lock is the directory's: deleting the file frees nothing.
    assert!(matches!(Writer::open(&path, LockMode::NoWait).err().unwrap(), Error::Locked { .. }));
    assert!(matches!(w1.heartbeat().err().unwrap(), Error::Replaced { .. }), "the holder notices");
    assert!(matches!(w1.sync(&BTreeMap::new()).err().unwrap(), Error::Replaced { .. }));
    drop(w1);
    let w2 = Writer::open(&path, LockMode::Wait).unwrap();
    assert!(w2.open_report().created, "the next writer makes a fresh table");
    assert_eq!(w2.table().lookup(20000, 0), crate::Lookup::Absent);
}

#[test]
fn clean_close_skips_settling_and_a_crash_does_not() {
    let d = tmp_dir("clean");
    let path = d.join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("a", 22, 1)).unwrap();
    drop(w);
    assert!(!Writer::open(&path, LockMode::Wait).unwrap().table().header_info().clean, "an open writer is inside");
    let w = Writer::open(&path, LockMode::Wait).unwrap();
    assert!(!w.open_report().settled, "a cleanly closed table is not walked");
    // Play a writer killed inside the second copy of a write: the copy readers do not use
    // is half rewritten, and the writer never marks the table clean.
    let mut w = w;
    w.clean_on_drop = false;
    let slot = w.mapping().port_slot(20000);
    slot.copies[1].upstream_port.store(9999, Ordering::Relaxed);
    drop(w);
    let w = Writer::open(&path, LockMode::Wait).unwrap();
    assert!(w.open_report().settled);
    assert_eq!(w.open_report().repaired, 1, "exactly the torn slot");
    let slot = w.mapping().port_slot(20000);
    assert_eq!(slot.copies[1].upstream_port.load(Ordering::Relaxed), 22);
}

#[test]
fn counters_start_over_when_the_port_changes_hands() {
    let d = tmp_dir("counters");
    let path = d.join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("alpha", 22, 1)).unwrap();
    let worker = CounterFile::open(&counters_path(&path), true).unwrap();
    let row = worker.claim_worker();
    assert!(row.is_some());
    let reader = Table::open_read_only(&path).unwrap();
    let (_, owner_a) = reader.lookup_owned(20000, 0);
    worker.session_open(row, 20000, owner_a, 1_000);
    worker.session_open(row, 20000, owner_a, 1_000);
    worker.session_close(row, 20000, owner_a, Outcome::Proxied, 10, 20, 2_000);
    let c = reader.counters(20000);
    assert_eq!((c.connections_total, c.connections_active, c.bytes_in, c.bytes_out), (1, 1, 10, 20));
    assert_eq!(c.last_activity_ms, 2_000);

    // Same owner re-written (another upstream port): counters carry on.
    w.set(20000, &route("alpha", 23, 1)).unwrap();
    assert_eq!(reader.counters(20000).connections_total, 1);
    assert_eq!(reader.lookup_owned(20000, 0).1, owner_a);

    // Another tenant takes the port while alpha's session is still open.
    w.set(20000, &route("beta", 22, 2)).unwrap();
    let (_, owner_b) = reader.lookup_owned(20000, 0);
    assert_ne!(owner_a, owner_b);
    assert_eq!(reader.counters(20000), crate::Counters::default(), "beta starts at zero");
    worker.session_close(row, 20000, owner_a, Outcome::Proxied, 1000, 1000, 3_000);
    assert_eq!(reader.counters(20000), crate::Counters::default(), "alpha's late close is not beta's");
    worker.session_open(row, 20000, owner_b, 4_000);
    worker.session_close(row, 20000, owner_b, Outcome::UpstreamFailed, 0, 0, 4_001);
    let c = reader.counters(20000);
    assert_eq!((c.connections_total, c.upstream_failed_total, c.connections_active), (0, 1, 0));
    worker.count_refused(20001);
    assert_eq!(reader.counters(20001).refused_total, 1);
}

#[test]
fn rows_of_dead_workers_leave_the_gauge() {
    let d = tmp_dir("gauge");
    let path = d.join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("alpha", 22, 1)).unwrap();
    let reader = Table::open_read_only(&path).unwrap();
    let (_, owner) = reader.lookup_owned(20000, 0);
    // A worker that opened 50 sessions and was then killed: a real process that is gone.
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    let pid = child.id();
    let start = crate::files::process_start(pid).unwrap();
    let counters = w.table().counter_file().unwrap();
    let m = counters.mapping();
    m.worker_slot(5).owner.store(u64::from(pid) | ((start & 0x7fff_ffff) << 32), Ordering::Release);
    m.worker_slot(5).pid_ns.store(crate::files::pid_namespace(), Ordering::Relaxed);
    m.cell(5, SlotKey::port(20000)).store((crate::counters::tag(owner) << 48) | 50, Ordering::Relaxed);
    assert_eq!(reader.counters(20000).connections_active, 50);
    assert_eq!(counters.sweep_dead(), 0, "alive: kept");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(counters.sweep_dead(), 1);
    assert_eq!(reader.counters(20000).connections_active, 0);
    assert_eq!(m.worker_slot(5).owner.load(Ordering::Relaxed), 0, "the row is free again");
}

#[test]
fn sync_writes_differences_and_removes_the_rest() {
    let d = tmp_dir("sync");
    let mut w = Writer::open(&d.join("routes"), LockMode::NoWait).unwrap();
    w.set(20000, &route("a", 22, 1)).unwrap();
    w.set(20001, &route("b", 22, 1)).unwrap();
    let want: BTreeMap<u16, Route> = [(20001, route("b", 22, 1)), (20002, route("c", 22, 1))].into();
    assert_eq!(w.sync(&want).unwrap(), SyncReport { written: 1, removed: 1 });
    assert_eq!(w.sync(&want).unwrap(), SyncReport::default());
    let ports: Vec<u16> = w.table().routes().map(|(p, _)| p).collect();
    assert_eq!(ports, vec![20001, 20002]);
    assert_eq!(w.table().revoke_epoch(20000), 1, "the removed route's sessions are revoked");
    assert_eq!(w.table().revoke_epoch(20001), 0, "the kept ones' are not");
}

#[test]
fn a_new_counters_file_never_reuses_the_owner_stamps_of_kept_routes() {
    let d = tmp_dir("restamp");
    let path = d.join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    for port in 20000..20010 {
        w.set(port, &route("a", 22, 1)).unwrap();
    }
    let kept = w.table().lookup_owned(20000, 0).1;
    drop(w);
    std::fs::remove_file(counters_path(&path)).unwrap();
    let mut w = Writer::open(&path, LockMode::Wait).unwrap();
    w.set(20000, &route("b", 22, 2)).unwrap();
    // Stamps are per slot: the slot's next owner is stamped above the kept route's.
    assert!(w.table().lookup_owned(20000, 0).1 > kept, "stamps continue above the kept one");
}

#[test]
fn raising_the_revoke_epoch_applies_a_request_once() {
    let d = tmp_dir("raise");
    let mut w = Writer::open(&d.join("routes"), LockMode::NoWait).unwrap();
    w.set(20000, &route("a", 22, 1)).unwrap();
    // The API read epoch 0 and asked for "at least 1".
    assert!(w.raise_revoke_epoch(20000, 1).unwrap());
    assert_eq!(w.table().revoke_epoch(20000), 1);
    // Replayed (a publisher restart, a re-sync): nothing more is closed.
    assert!(!w.raise_revoke_epoch(20000, 1).unwrap());
    assert_eq!(w.table().revoke_epoch(20000), 1);
    // A removal bumped the epoch past a later request: that request is already satisfied.
    w.revoke(20000).unwrap();
    w.revoke(20000).unwrap();
    assert!(!w.raise_revoke_epoch(20000, 2).unwrap());
    assert_eq!(w.table().revoke_epoch(20000), 3);
    // A fresh table (epochs from 0) meets an old, large request: one raise, not a loop.
    assert!(w.raise_revoke_epoch(20001, 40).unwrap());
    assert_eq!(w.table().revoke_epoch(20001), 40);
    assert!(w.raise_revoke_epoch(0, 1).is_err());
    // The route is untouched: new connections still go where it points.
    assert!(matches!(w.table().lookup(20000, crate::now_ms()), crate::Lookup::Live(_)));
}

fn name_route(env: &str, service: Service, port: u16, generation: u64) -> Route {
    Route { service, ..route(env, port, generation) }
}

fn hk(env: &str, service: Service) -> HostKey {
    HostKey::new(env.parse().unwrap(), service)
}

#[test]
fn name_routes_are_found_by_id_and_service_and_removal_leaves_the_rest_reachable() {
    let d = tmp_dir("hosts");
    // The smallest region, filled to 90%: long probe chains, wrap-around, many collisions.
    let mut w = Writer::open_with(&d.join("routes"), LockMode::NoWait, 1024).unwrap();
    let ids: Vec<String> = (0..460).map(|i| format!("env{i:05}")).collect();
    for (i, id) in ids.iter().enumerate() {
        for (svc, port) in [(Service::Jupyter, 8888), (Service::Code, 8080)] {
            let put = w.set_host(&name_route(id, svc, port, i as u64 + 1)).unwrap();
            assert!(put.changed && put.key.host_index().is_some());
        }
    }
    let now = crate::now_ms();
    let t = w.table();
    for (i, id) in ids.iter().enumerate() {
        let (found, owner, key) = t.lookup_host(hk(id, Service::Jupyter), now);
        assert_eq!(found, Lookup::Live(name_route(id, Service::Jupyter, 8888, i as u64 + 1)), "{id}");
        assert!(owner > 0 && key.is_some());
    }
    assert_eq!(t.lookup_host(hk("env00001", Service::Ssh), now).0, Lookup::Absent, "service is part of the key");
    assert_eq!(t.lookup_host(hk("nobody", Service::Jupyter), now).0, Lookup::Absent);
    let probe_max = t.host_probe_max();
    assert!(probe_max >= 2 && probe_max < 1024, "probe bound {probe_max}");

    // Remove every other environment: the others stay reachable past the tombstones.
    for id in ids.iter().step_by(2) {
        assert!(w.remove_host(hk(id, Service::Jupyter)).unwrap());
        assert!(!w.remove_host(hk(id, Service::Jupyter)).unwrap(), "already gone");
    }
    let t = w.table();
    for (i, id) in ids.iter().enumerate() {
        let got = t.lookup_host(hk(id, Service::Jupyter), now).0;
        if i % 2 == 0 {
            assert_eq!(got, Lookup::Absent, "{id} was removed");
        } else {
            assert!(matches!(got, Lookup::Live(_)), "{id} lost behind a tombstone: {got:?}");
        }
        assert!(matches!(t.lookup_host(hk(id, Service::Code), now).0, Lookup::Live(_)));
    }
    // Churn: new keys re-use tombstones, so the table never fills and probes stay bounded.
    for round in 0..20 {
        for (i, id) in ids.iter().enumerate().step_by(2) {
            let gone = format!("{id}r{}", round);
            let put = w.set_host(&name_route(&gone, Service::Jupyter, 8888, 1)).unwrap();
            assert!(put.changed);
            w.remove_host(hk(&gone, Service::Jupyter)).unwrap();
            let _ = i;
        }
    }
    assert!(w.table().host_probe_max() < 1024, "probes stay bounded under churn");
    assert_eq!(w.table().host_routes().count(), 460 + 230);
}

#[test]
fn a_name_route_rewritten_for_a_new_generation_starts_its_counters_over_in_the_same_slot() {
    let d = tmp_dir("hostcount");
    let mut w = Writer::open_with(&d.join("routes"), LockMode::NoWait, 1024).unwrap();
    let first = w.set_host(&name_route("a", Service::Jupyter, 8888, 1)).unwrap();
    let (_, owner, key) = w.table().lookup_host(hk("a", Service::Jupyter), 0);
    assert_eq!(key, Some(first.key));
    let counters = Table::open_read_only(&d.join("routes")).unwrap();
    let c = counters.counter_file().unwrap();
    let c = CounterFile::open(c.path(), true).unwrap();
    c.session_open(None, first.key, owner, 5);
    c.session_close(None, first.key, owner, Outcome::Proxied, 10, 20, 6);
    assert_eq!(w.table().counters(first.key).bytes_out, 20);
    assert_eq!(w.table().counters(first.key).connections_total, 1);
    assert_eq!(w.table().host_slot(hk("a", Service::Jupyter)), Some(first.key));
    // The same route again: nothing written.
    assert!(!w.set_host(&name_route("a", Service::Jupyter, 8888, 1)).unwrap().changed);
    // Re-created (new generation): same slot, fresh counters; the old owner cannot count.
    let again = w.set_host(&name_route("a", Service::Jupyter, 9999, 2)).unwrap();
    assert_eq!(again.key, first.key);
    assert_eq!(w.table().counters(first.key), crate::Counters::default());
    c.session_close(None, first.key, owner, Outcome::Proxied, 10, 20, 7);
    assert_eq!(w.table().counters(first.key).bytes_out, 0, "a session of the old owner is not charged");
    // Port routes and name routes do not share counters.
    w.set(20000, &route("a", 22, 1)).unwrap();
    assert_eq!(w.table().counters(20000u16), crate::Counters::default());
}

#[test]
fn sync_makes_the_name_routes_exactly_the_wanted_ones_and_revokes_the_rest() {
    let d = tmp_dir("hostsync");
    let mut w = Writer::open_with(&d.join("routes"), LockMode::NoWait, 1024).unwrap();
    w.set_host(&name_route("old", Service::Jupyter, 8888, 1)).unwrap();
    let old_key = w.table().host_slot(hk("old", Service::Jupyter)).unwrap();
    let epoch = w.table().revoke_epoch(old_key);
    let keep = name_route("keep", Service::Code, 8080, 4);
    let names = BTreeMap::from([(HostKey::of(&keep), keep)]);
    let report = w.sync_all(&BTreeMap::new(), &names).unwrap();
    assert_eq!(report, SyncReport { written: 1, removed: 1 });
    assert_eq!(w.table().lookup_host(hk("old", Service::Jupyter), 0).0, Lookup::Absent);
    assert!(w.table().revoke_epoch(old_key) > epoch, "sessions of a dropped name route are revoked");
    assert_eq!(w.table().host_routes().map(|(_, r)| r).collect::<Vec<_>>(), vec![keep]);
    assert_eq!(w.sync_all(&BTreeMap::new(), &names).unwrap(), SyncReport::default(), "idempotent");
    // A name route filed under another key is refused, not stored under the wrong name; the
    // rest of that sync still applies ("keep" is not in that set: removed, then revoked).
    let wrong = BTreeMap::from([(hk("other", Service::Code), keep)]);
    assert!(w.sync_all(&BTreeMap::new(), &wrong).unwrap_err().to_string().contains("carries keep.code"));
    assert_eq!(w.table().host_routes().count(), 0, "nothing stored under the wrong name");
    // Revoke by key, and raise once.
    assert_eq!(w.revoke_host(hk("keep", Service::Code)).unwrap(), Some(2));
    assert!(!w.raise_host_revoke_epoch(hk("keep", Service::Code), 2).unwrap());
    assert!(w.raise_host_revoke_epoch(hk("keep", Service::Code), 5).unwrap());
    assert_eq!(w.revoke_host(hk("nobody", Service::Code)).unwrap(), None);
}

#[test]
fn a_table_without_name_slots_or_with_another_count_is_refused_clearly() {
    let d = tmp_dir("hostgeom");
    let path = d.join("routes");
    assert!(Writer::open_with(&path, LockMode::NoWait, 1000).err().unwrap().to_string().contains("power of two"));
    let mut w = Writer::open_with(&path, LockMode::NoWait, 0).unwrap();
    let err = w.set_host(&name_route("a", Service::Jupyter, 8888, 1)).unwrap_err().to_string();
    assert!(err.contains("has no hostname slots"), "{err}");
    assert!(w.set_host(&Route { env_id: crate::route::EnvId::default(), ..name_route("a", Service::Jupyter, 8888, 1) }).is_err());
    drop(w);
    let err = Writer::open_with(&path, LockMode::Wait, 2048).err().unwrap().to_string();
    assert!(err.contains("has 0 hostname slots, but 2048 are configured"), "{err}");
    // Without a wish (the CLI), an existing table is opened with the count it has.
    assert_eq!(Writer::open(&path, LockMode::Wait).unwrap().table().host_slots(), 0);
    // Readers of a table with name slots see the region's size.
    let p2 = d.join("t2").join("routes");
    drop(Writer::open_with(&p2, LockMode::NoWait, 4096).unwrap());
    assert_eq!(Table::open_read_only(&p2).unwrap().host_slots(), 4096);
    assert_eq!(std::fs::metadata(&p2).unwrap().len() as usize, crate::layout::routes_file_size(4096));
}

#[test]
fn a_full_name_region_refuses_the_next_route_and_keeps_the_others() {
    let d = tmp_dir("hostfull");
    let mut w = Writer::open_with(&d.join("routes"), LockMode::NoWait, 1024).unwrap();
    for i in 0..1024 {
        w.set_host(&name_route(&format!("e{i}"), Service::Ssh, 22, 1)).unwrap();
    }
    let err = w.set_host(&name_route("one-more", Service::Ssh, 22, 1)).unwrap_err().to_string();
    assert!(err.contains("all 1024 hostname slots are in use"), "{err}");
    assert!(matches!(w.table().lookup_host(hk("e7", Service::Ssh), 0).0, Lookup::Live(_)));
    assert_eq!(w.table().lookup_host(hk("one-more", Service::Ssh), 0).0, Lookup::Absent);
}

#[test]
fn the_writers_pass_finds_what_a_walk_of_every_slot_finds() {
    let d = tmp_dir("counted");
    let path = d.join("routes");
    let walk = |w: &Writer| w.table().counted_routes().collect::<Vec<_>>();
    let pass = |w: &Writer| w.counted_routes().collect::<Vec<_>>();
    let mut w = Writer::open_with(&path, LockMode::NoWait, 1024).unwrap();
    for port in [1, 63, 64, 20_000, 20_001, 65_535] {
        w.set(port, &route("a", port, 1)).unwrap();
    }
    w.set_host(&name_route("b", Service::Jupyter, 8888, 1)).unwrap();
    w.remove(20_001).unwrap();
    w.remove_and_revoke(63).unwrap();
    w.set(64, &route("c", 64, 2)).unwrap();
    // A session moves bytes on one route: the pass reads its counters.
    let worker = CounterFile::open(&counters_path(&path), true).unwrap();
    let row = worker.claim_worker().unwrap();
    let owner = w.table().lookup_owned(20_000, 0).1;
    worker.session_open(Some(row), 20_000u16, owner, 1);
    worker.session_flush(20_000, owner, 7, 9, 2);
    let found = pass(&w);
    assert_eq!(found, walk(&w));
    let ports: Vec<Option<u16>> = found.iter().map(|(k, _, _)| k.as_port()).collect();
    assert_eq!(ports, vec![Some(1), Some(64), Some(20_000), Some(65_535), None]);
    let (_, _, c) = found.iter().find(|(k, _, _)| k.as_port() == Some(20_000)).unwrap();
    assert_eq!((c.connections_active, c.bytes_in, c.bytes_out), (1, 7, 9));
    // A writer that opens the table again knows its routes from the slots.
    drop(w);
    let w = Writer::open(&path, LockMode::Wait).unwrap();
    assert_eq!(pass(&w), found);
    worker.release_worker(row);
}
