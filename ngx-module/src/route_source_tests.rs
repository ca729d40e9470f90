//! Unit tests of the per-connection decision and the table's life cycle in one process.

use super::test_support::{route, table_path};
use super::*;
use gpugate_routes::{LockMode, Service, Writer};

fn tmp() -> PathBuf {
    table_path("src")
}

fn unusable(notices: &[Notice]) -> Option<String> {
    notices.iter().find_map(|n| match n {
        Notice::Unusable(e) => Some(e.to_string()),
        _ => None,
    })
}

#[test]
fn missing_table_is_logged_once_then_picked_up_when_created() {
    let path = tmp();
    let src = RouteSource::new(path.clone());
    let (d, n) = src.decide(20000, 1_000, 1);
    assert_eq!(d.status, RouteStatus::NoTable);
    assert!(unusable(&n).unwrap().contains("does not exist"));
    // Within the retry interval: no new attempt, no new log line.
    let (d, n) = src.decide(20000, 1_050, 1);
    assert_eq!(d.status, RouteStatus::NoTable);
    assert!(n.is_empty());
    // Past it, still missing: same cause, not logged again.
    let (_, n) = src.decide(20000, 1_200, 1);
    assert!(n.is_empty());

    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("127.0.0.1:22")).unwrap();
    let (d, n) = src.decide(20000, 1_400, 1);
    assert_eq!(d.status, RouteStatus::Ok);
    assert_eq!(d.route.unwrap().upstream, "127.0.0.1:22".parse().unwrap());
    assert!(n.iter().any(|n| matches!(n, Notice::Opened { replaced: false, .. })));
    assert!(n.iter().any(|n| matches!(n, Notice::Counting { writable: true, .. })));
    let (refused, _) = src.decide(20001, 1_401, 1);
    assert_eq!(refused.status, RouteStatus::NoRoute);
    let t = w.table();
    assert_eq!(t.counters(20000).connections_active, 1);
    assert_eq!(t.counters(20001).refused_total, 1);
    src.close(&d, Outcome::Proxied, 5, 7, 2);
    let c = t.counters(20000);
    assert_eq!((c.connections_total, c.connections_active, c.bytes_in, c.bytes_out), (1, 0, 5, 7));
    src.close(&refused, Outcome::Proxied, 5, 5, 2);
    assert_eq!(t.counters(20001).bytes_in, 0, "a refused session adds nothing");
}

#[test]
fn garbage_file_fails_closed_and_is_logged_once_per_cause() {
    let path = tmp();
    std::fs::write(&path, vec![0xabu8; 16 << 20]).unwrap();
    let src = RouteSource::new(path.clone());
    let (d, n) = src.decide(20000, 1_000, 1);
    assert_eq!(d.status, RouteStatus::BadTable);
    assert!(unusable(&n).unwrap().contains("not a gpugate route table"));
    let (d, n) = src.decide(20000, 2_000, 1);
    assert_eq!(d.status, RouteStatus::BadTable);
    assert!(unusable(&n).is_none(), "logged once per cause");
    // A short file is another cause.
    std::fs::write(&path, b"short").unwrap();
    let (_, n) = src.decide(20000, 3_000, 1);
    assert!(unusable(&n).unwrap().contains("is 5 bytes"), "{n:?}");
}

#[test]
fn deleted_truncated_or_overwritten_tables_are_refused_not_served_from_the_old_mapping() {
    let path = tmp();
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("127.0.0.1:1000")).unwrap();
    drop(w);
    let src = RouteSource::new(path.clone());
    assert_eq!(src.decide(20000, 1_000, 1).0.status, RouteStatus::Ok);

    // Deleted: refused at the next re-check, logged.
    let saved = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let (d, n) = src.decide(20000, 2_000, 1);
    assert_eq!(d.status, RouteStatus::NoTable);
    assert!(unusable(&n).unwrap().contains("does not exist"));

    // Back (a copy of the same bytes, a new file): served again.
    std::fs::write(&path, &saved).unwrap();
    let (d, n) = src.decide(20000, 2_100, 1);
    assert_eq!(d.status, RouteStatus::Ok);
    assert!(n.iter().any(|n| matches!(n, Notice::Opened { replaced: true, .. })));

    // Overwritten in place with garbage (same inode): refused and logged.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x5a; 64], 0).unwrap();
    }
    let (d, n) = src.decide(20000, 3_100, 1);
    assert_eq!(d.status, RouteStatus::BadTable);
    assert!(unusable(&n).unwrap().contains("not a gpugate route table"));

    // Truncated: refused without touching the mapping (this process would die of SIGBUS).
    std::fs::write(&path, &saved).unwrap();
    assert_eq!(src.decide(20000, 3_300, 1).0.status, RouteStatus::Ok);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
    let (d, n) = src.decide(20000, 4_400, 1);
    assert_eq!(d.status, RouteStatus::BadTable);
    assert!(unusable(&n).unwrap().contains("expected at least"), "{n:?}");
}

#[test]
fn rechecks_follow_the_monotonic_clock_not_the_wall_clock() {
    let path = tmp();
    let src = RouteSource::new(path.clone());
    assert_eq!(src.decide(20000, 1_000, 1_700_000_000_000).0.status, RouteStatus::NoTable);
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("127.0.0.1:22")).unwrap();
    // The wall clock was stepped back an hour; the monotonic one moved on: picked up.
    let (d, _) = src.decide(20000, 1_200, 1_699_996_400_000);
    assert_eq!(d.status, RouteStatus::Ok);
}

#[test]
fn replaced_counters_are_kept_until_their_last_session_ends() {
    let path = tmp();
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("127.0.0.1:1000")).unwrap();
    let src = RouteSource::new(path.clone());
    let (open, _) = src.decide(20000, 1_000, 10);
    assert!(!open.sink.is_null());
    drop(w);
    // A new table (both files) takes the path while a session is open.
    let dir = path.parent().unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(dir.join("routes.counters")).unwrap();
    let mut w = Writer::open(&path, LockMode::Wait).unwrap();
    w.set(20000, &route("127.0.0.1:2000")).unwrap();
    let (d, _) = src.decide(20000, 2_500, 20);
    assert_eq!(d.route.unwrap().upstream.port(), 2000);
    assert_eq!(src.mapped_counters(), 2, "the old counters stay mapped for the open session");
    src.close(&open, Outcome::Proxied, 1, 1, 30);
    assert_eq!(src.mapped_counters(), 1, "released when its last session ended");
    assert_eq!(w.table().counters(20000).connections_total, 0, "the old session counts nowhere new");
    src.close(&d, Outcome::Proxied, 1, 1, 30);
    assert_eq!(w.table().counters(20000).connections_total, 1);
}

#[test]
fn expired_route_is_refused() {
    let path = tmp();
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    let mut r = route("[::1]:22");
    r.expires_ms = Some(5_000);
    w.set(20000, &r).unwrap();
    let src = RouteSource::new(path);
    assert_eq!(src.decide(20000, 1, 4_999).0.status, RouteStatus::Ok);
    let (d, _) = src.decide(20000, 2, 5_000);
    assert_eq!(d.status, RouteStatus::Expired);
    assert_eq!(d.route.unwrap().upstream, "[::1]:22".parse().unwrap());
}

#[test]
fn status_names() {
    assert_eq!(RouteStatus::Ok.as_str(), "ok");
    assert_eq!(RouteStatus::NoTable.as_str(), "no_table");
}

#[test]
fn live_flushes_and_revoke() {
    let path = tmp();
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(20000, &route("127.0.0.1:1000")).unwrap();
    let src = RouteSource::new(path.clone());
    let (d, _) = src.decide(20000, 1_000, 10);
    src.flush(&d, 100, 200, 20);
    let c = w.table().counters(20000);
    assert_eq!((c.bytes_in, c.bytes_out, c.connections_active, c.last_activity_ms), (100, 200, 1, 20));
    src.flush(&d, 0, 0, 30);
    assert_eq!(w.table().counters(20000).last_activity_ms, 20, "no bytes moved, no activity");
    assert!(!src.revoked(&d));
    w.revoke(20000).unwrap();
    assert!(src.revoked(&d));
    let (after, _) = src.decide(20000, 1_001, 40);
    assert!(!src.revoked(&after), "a session opened after the revoke stays");
    src.close(&d, Outcome::Revoked, 1, 2, 50);
    let c = w.table().counters(20000);
    assert_eq!((c.bytes_in, c.bytes_out, c.connections_total, c.revoked_total), (101, 202, 1, 1));
    assert_eq!(c.connections_active, 1);
}

#[test]
fn flush_interval_bounds() {
    assert_eq!(check_flush_interval(0), Ok(0));
    assert_eq!(check_flush_interval(1000), Ok(1000));
    assert!(check_flush_interval(10).unwrap_err().contains("at least 50ms"));
    assert!(check_flush_interval(3_600_001).unwrap_err().contains("at most 1h"));
}

#[test]
fn timer_deadlines_fall_on_the_grid_at_least_an_interval_away() {
    for now in [0u64, 1, 63, 64, 1_000_003, u64::MAX - 10] {
        for interval in [50u64, 200, 1000] {
            let d = grid_delay(now, interval);
            assert!(d >= interval && d < interval + TICK_GRID_MS, "{now} {interval} {d}");
            assert_eq!(now.wrapping_add(d) % TICK_GRID_MS, 0, "{now} {interval} {d}");
        }
    }
}

#[test]
fn server_names_are_read_as_id_service_and_domain() {
    let d = "gpu.example.com";
    let ok = |name: &str| parse_name(name.as_bytes(), d);
    let key = |id: &str, svc| Ok(HostKey::new(id.parse().unwrap(), svc));
    assert_eq!(ok("6hiflzwte2xnkroq.jupyter.gpu.example.com"), key("6hiflzwte2xnkroq", Service::Jupyter));
    assert_eq!(ok("AbC.SSH.GPU.Example.COM."), key("abc", Service::Ssh), "DNS names are case-insensitive");
    assert_eq!(ok("x.code.gpu.example.com"), key("x", Service::Code));
    assert_eq!(ok("x.rdp.gpu.example.com"), key("x", Service::Rdp));
    assert_eq!(ok(""), Err(NameRefusal::NoName));
    assert_eq!(ok("x.jupyter.gpu.example.org"), Err(NameRefusal::OtherDomain));
    assert_eq!(ok("x.jupyter.evilgpu.example.com"), Err(NameRefusal::OtherDomain), "a suffix is not the domain");
    assert_eq!(ok("gpu.example.com"), Err(NameRefusal::OtherDomain));
    assert_eq!(ok("jupyter.gpu.example.com"), Err(NameRefusal::BadName));
    assert_eq!(ok("a.b.jupyter.gpu.example.com"), Err(NameRefusal::BadName));
    assert_eq!(ok(".jupyter.gpu.example.com"), Err(NameRefusal::BadName));
    assert_eq!(ok("x.other.gpu.example.com"), Err(NameRefusal::UnknownService), "'other' is no service by name");
    assert_eq!(ok("x.smtp.gpu.example.com"), Err(NameRefusal::UnknownService));
    assert_eq!(ok("seventeen-chars-x.ssh.gpu.example.com"), Err(NameRefusal::BadName));
    assert_eq!(ok("a+b.ssh.gpu.example.com"), Err(NameRefusal::BadName));
    assert_eq!(parse_name(&[b'a'; 300], d), Err(NameRefusal::BadName));
    assert_eq!(parse_name(b"\xff\xfe.ssh.gpu.example.com", d), Err(NameRefusal::BadName));
}

#[test]
fn domains_are_checked_and_lowercased() {
    assert_eq!(check_domain(b"GPU.Example.com.").unwrap(), "gpu.example.com");
    for bad in [&b"localhost"[..], b"a..b", b"-a.com", b"a_b.com", b"", b"a.com\0"] {
        assert!(check_domain(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn name_routes_are_decided_counted_and_revoked_like_port_routes() {
    let path = tmp();
    let mut w = Writer::open_with(&path, LockMode::NoWait, 1024).unwrap();
    let up = route("127.0.0.1:8888");
    let r = Route { env_id: "abc".parse().unwrap(), service: Service::Jupyter, ..up };
    let slot = w.set_host(&r).unwrap().key;
    let src = RouteSource::new(path.clone());
    let d = "gpu.example.com";
    let (open, _) = src.decide_name(b"abc.jupyter.gpu.example.com", d, 1_000, 10);
    assert_eq!(open.status, RouteStatus::Ok);
    assert_eq!(open.key, slot);
    assert_eq!(open.route, Some(r));
    for (name, status) in [
        (&b""[..], RouteStatus::Name(NameRefusal::NoName)),
        (b"abc.jupyter.other.org", RouteStatus::Name(NameRefusal::OtherDomain)),
        (b"abc.ftp.gpu.example.com", RouteStatus::Name(NameRefusal::UnknownService)),
        (b"abc.code.gpu.example.com", RouteStatus::NoRoute),
        (b"zzz.jupyter.gpu.example.com", RouteStatus::NoRoute),
    ] {
        let (refused, _) = src.decide_name(name, d, 1_001, 10);
        assert_eq!(refused.status, status, "{}", String::from_utf8_lossy(name));
        assert!(refused.sink.is_null(), "a refusal counts no session");
    }
    src.refuse_name(NameRefusal::NotTls, 1_002);
    let t = Table::open_read_only(&path).unwrap();
    let by_reason: Vec<(NameRefusal, u64)> = t.counter_file().unwrap().name_refused();
    let count = |why| by_reason.iter().find(|(r, _)| *r == why).map(|(_, n)| *n).unwrap();
    assert_eq!(count(NameRefusal::NoName), 1);
    assert_eq!(count(NameRefusal::OtherDomain), 1);
    assert_eq!(count(NameRefusal::UnknownService), 1);
    assert_eq!(count(NameRefusal::NoRoute), 2);
    assert_eq!(count(NameRefusal::NotTls), 1);
    assert_eq!(count(NameRefusal::BadName), 0);
    assert_eq!(t.counters(slot).connections_active, 1, "the open session counts on the name route's slot");
    // Revoking the name route reaches the session that came in by name.
    assert!(!src.revoked(&open));
    w.revoke_host(HostKey::of(&r)).unwrap();
    assert!(src.revoked(&open));
    src.flush(&open, 3, 4, 20);
    src.close(&open, Outcome::Revoked, 5, 6, 30);
    let c = t.counters(slot);
    assert_eq!((c.connections_total, c.revoked_total, c.bytes_in, c.bytes_out), (1, 1, 8, 10));
    assert_eq!(t.counters(0u16), gpugate_routes::Counters::default(), "port 0 is never charged");
}
