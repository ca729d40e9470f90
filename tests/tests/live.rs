//! Live sessions through a real nginx with the module loaded: bytes reach the counters while a
//! session is open and add up exactly at its end; a revoke closes open sessions within a flush
//! interval while new connections keep working.

use std::time::{Duration, Instant};

use gpugate_tests::*;

/// A routed pool with `gpugate_flush_interval` set (or left at its default with `None`).
fn gateway(tag: &str, lo: u16, hi: u16, flush: Option<&str>) -> (Writer, Nginx) {
    let root = temp_dir(tag);
    let path = table_dir(&root).join("routes");
    let w = Writer::open(&path, LockMode::NoWait).expect("open writer");
    let mut body = routed_stream(&path, lo, hi, ProxyForm::Balancer);
    if let Some(f) = flush {
        body = format!("    gpugate_flush_interval {f};\n{body}");
    }
    let ng = Nginx::start(&root, &nginx_conf(&body));
    (w, ng)
}

#[test]
fn bytes_reach_the_counters_while_the_session_is_open_and_add_up_at_its_end() {
    let (mut w, ng) = gateway("flush", 25500, 25500, Some("200ms"));
    let a = Backend::start("alpha", "127.0.0.1:0");
    w.set(25500, &route(a.addr, "envlive", Service::Ssh)).unwrap();
    let mut c = Client::connect(25500).unwrap();
    let mut sent = 0u64;
    let mut received = "alpha\n".len() as u64;
    assert_eq!(c.read_line().as_deref(), Some("alpha"));
    let mut seen_in = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut i = 0;
    while Instant::now() < deadline {
        let line = format!("slow line {i} {}", "x".repeat(100));
        let reply = c.round_trip(&line).expect("echo");
        sent += line.len() as u64 + 1;
        received += reply.len() as u64 + 1;
        i += 1;
        let counters = w.table().counters(25500);
        assert_eq!(counters.connections_active, 1);
        assert_eq!(counters.connections_total, 0, "a session is counted as proxied when it ends");
        seen_in.push(counters.bytes_in);
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut distinct = seen_in.clone();
    distinct.dedup();
    assert!(distinct.len() >= 5, "bytes grew while the session was open: {seen_in:?}");
    assert!(seen_in.windows(2).all(|p| p[0] <= p[1]), "never backwards: {seen_in:?}");
    assert!(*seen_in.last().unwrap() <= sent);
    let mid = w.table().counters(25500);
    assert!(mid.last_activity_ms + 1000 >= gpugate_routes::now_ms(), "activity follows the bytes");
    drop(c);
    assert!(wait_until(Duration::from_secs(2), || w.table().counters(25500).connections_total == 1));
    let end = w.table().counters(25500);
    assert_eq!((end.bytes_in, end.bytes_out), (sent, received), "exact totals at the end");
    assert_eq!(end.connections_active, 0);
    ng.assert_no_crash();
}

#[test]
fn revoke_closes_open_sessions_within_an_interval_and_new_ones_still_work() {
    let (mut w, ng) = gateway("revoke", 25510, 25511, Some("200ms"));
    let pids = ng.pids();
    let a = Backend::start("alpha", "127.0.0.1:0");
    w.set(25510, &route(a.addr, "envrev", Service::Ssh)).unwrap();
    w.set(25511, &route(a.addr, "envother", Service::Ssh)).unwrap();
    let mut open: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = Client::connect(25510).unwrap();
            assert_eq!(c.read_line().as_deref(), Some("alpha"));
            c
        })
        .collect();
    let mut other = Client::connect(25511).unwrap();
    assert_eq!(other.read_line().as_deref(), Some("alpha"));
    let revoked_at = Instant::now();
    w.revoke(25510).unwrap();
    for c in &mut open {
        // The gateway closes it: the read ends without a line (EOF), well before the
        // client's own 5 s read time-out.
        assert_eq!(c.read_line(), None, "a revoked session is closed");
    }
    assert!(revoked_at.elapsed() < Duration::from_millis(1500), "closed in {:?}", revoked_at.elapsed());
    assert_eq!(other.round_trip("still").as_deref(), Some("alpha:still"), "another port's session stays");
    let mut fresh = Client::connect(25510).unwrap();
    assert_eq!(fresh.read_line().as_deref(), Some("alpha"), "new connections still work");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fresh.round_trip("after").as_deref(), Some("alpha:after"), "and are not revoked");
    drop(fresh);
    assert!(wait_until(Duration::from_secs(2), || w.table().counters(25510).connections_total == 4));
    let c = w.table().counters(25510);
    assert_eq!((c.revoked_total, c.connections_active), (3, 0), "{c:?}");
    // The access log tells the revoked sessions from the one that ended by itself.
    let log = ng.access_log();
    let revoked = log.lines().filter(|l| l.starts_with("25510 revoked ")).count();
    let ended = log.lines().filter(|l| l.starts_with("25510 ok ")).count();
    assert_eq!((revoked, ended), (3, 1), "{log}");
    assert_eq!(ng.pids(), pids);
    ng.assert_no_crash();
}

#[test]
fn flush_interval_zero_turns_live_accounting_off_and_bad_values_fail_nginx_t() {
    let (mut w, ng) = gateway("flushoff", 25520, 25520, Some("0"));
    let a = Backend::start("alpha", "127.0.0.1:0");
    w.set(25520, &route(a.addr, "envoff", Service::Ssh)).unwrap();
    let mut c = Client::connect(25520).unwrap();
    assert_eq!(c.read_line().as_deref(), Some("alpha"));
    assert!(c.round_trip("hello").is_some());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(w.table().counters(25520).bytes_in, 0, "no live flush with the interval off");
    drop(c);
    assert!(wait_until(Duration::from_secs(2), || w.table().counters(25520).bytes_in == 6));
    ng.assert_no_crash();

    let root = temp_dir("flushconf");
    for (value, expected) in [
        ("10ms", "\"gpugate_flush_interval\" \"10ms\" is too short"),
        ("2h", "\"gpugate_flush_interval\" \"2h\" is too long"),
        ("soon", "\"gpugate_flush_interval\" \"soon\" is not a time"),
    ] {
        let body = format!(
            "gpugate_route_table /tmp/x; gpugate_flush_interval {value}; server {{ listen 127.0.0.1:25529; gpugate_route on; proxy_pass $gpugate_upstream; }}"
        );
        let out = Nginx::test_config(&root, &nginx_conf(&body));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expected), "{value}: {stderr}");
    }
    let dup = "gpugate_route_table /tmp/x; server { listen 127.0.0.1:25529; gpugate_flush_interval 1s; gpugate_flush_interval 2s; gpugate_route on; proxy_pass $gpugate_upstream; }";
    let out = Nginx::test_config(&root, &nginx_conf(dup));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"gpugate_flush_interval\" directive is duplicate"));
}

#[test]
fn a_killed_worker_loses_at_most_its_last_flush_interval_of_bytes_and_leaves_no_drift() {
    let (mut w, ng) = gateway("killflush", 25530, 25530, Some("200ms"));
    let a = Backend::start("alpha", "127.0.0.1:0");
    w.set(25530, &route(a.addr, "envkill", Service::Ssh)).unwrap();
    let mut clients: Vec<Client> = (0..40)
        .map(|_| {
            let mut c = Client::connect(25530).unwrap();
            assert_eq!(c.read_line().as_deref(), Some("alpha"));
            c
        })
        .collect();
    let line = "y".repeat(999);
    let mut sent = 0u64;
    for c in &mut clients {
        assert!(c.round_trip(&line).is_some());
        sent += 1000;
    }
    // Two intervals later every open session has flushed everything it moved.
    std::thread::sleep(Duration::from_millis(500));
    let t = w.table();
    assert_eq!(t.counters(25530).bytes_in, sent, "open sessions flushed exactly what moved");
    // One more line each, then a worker dies before its next flush.
    for c in &mut clients {
        assert!(c.round_trip(&line).is_some());
    }
    let burst = 1000 * clients.len() as u64;
    let victim = ng.worker_pids()[0];
    assert!(ng.kill_worker(victim), "the master respawns the killed worker");
    let before = clients.len();
    clients.retain_mut(|c| c.round_trip("alive?").is_some());
    let killed = (before - clients.len()) as u64;
    assert!(killed > 0, "the killed worker held none of the {before} sessions");
    let alive = clients.len() as u64;
    assert!(wait_until(Duration::from_secs(3), || t.counters(25530).connections_active == alive), "no drift in the gauge");
    // The survivors end cleanly: their totals are exact. The killed sessions keep what they had
    // flushed; only their last line (the last interval) may be lost.
    let survivors_extra = alive * "alive?\n".len() as u64;
    drop(clients);
    assert!(wait_until(Duration::from_secs(3), || t.counters(25530).connections_active == 0));
    let end = t.counters(25530).bytes_in;
    let everything = sent + burst + survivors_extra;
    let lost = everything - end;
    assert!(end <= everything, "counted {end} of {everything}: more than moved");
    assert!(lost <= killed * 1000, "lost {lost} bytes, more than the killed sessions' last interval ({killed} x 1000)");
}
