//! Route-table integrity through a real nginx with the module loaded: no torn route ever
//! reaches a backend, nothing but the writer can change a route, a truncated table kills no
//! worker, and the counters stay honest across re-points, upstream failures, killed workers
//! and restarts.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpugate_tests::*;

fn gateway(tag: &str, lo: u16, hi: u16, form: ProxyForm) -> (Writer, Nginx, std::path::PathBuf) {
    let root = temp_dir(tag);
    let path = table_dir(&root).join("routes");
    let w = Writer::open(&path, LockMode::NoWait).expect("open writer");
    let ng = Nginx::start(&root, &nginx_conf(&routed_stream(&path, lo, hi, form)));
    (w, ng, path)
}

/// Two backends on distinct loopback addresses with crossed ports, and decoys on the crossed
/// combinations: `good[0]` at 127.0.0.2:x, `good[1]` at 127.0.0.3:y, decoys answering
/// "torn" at 127.0.0.2:y and 127.0.0.3:x. A route mixed from the two (one's address, the
/// other's port) lands on a decoy.
struct Crossed {
    good: [Backend; 2],
    _decoys: [Backend; 2],
}

fn crossed(tag: &str) -> Crossed {
    for _ in 0..50 {
        let a = Backend::start(&format!("{tag}a"), "127.0.0.2:0");
        let x = a.addr.port();
        if TcpListener::bind(("127.0.0.3", x)).is_err() {
            continue;
        }
        let da = Backend::start("torn", &format!("127.0.0.3:{x}"));
        let b = Backend::start(&format!("{tag}b"), "127.0.0.3:0");
        let y = b.addr.port();
        if TcpListener::bind(("127.0.0.2", y)).is_err() {
            continue;
        }
        let db = Backend::start("torn", &format!("127.0.0.2:{y}"));
        return Crossed { good: [a, b], _decoys: [da, db] };
    }
    panic!("no crossed port pair free on 127.0.0.2/127.0.0.3");
}

#[test]
fn routes_flipped_as_fast_as_the_writer_can_never_reach_a_mixed_upstream() {
    let (lo, hi) = (25000u16, 25015u16);
    let (mut w, ng, _) = gateway("mixed", lo, hi, ProxyForm::Balancer);
    let pids = ng.pids();
    let pairs: Vec<Crossed> = (lo..=hi).map(|p| crossed(&format!("p{p}"))).collect();
    let targets: Vec<(u16, [SocketAddr; 2])> =
        (lo..=hi).zip(&pairs).map(|(p, c)| (p, [c.good[0].addr, c.good[1].addr])).collect();
    let route_of = |p: u16, i: u64, addrs: &[SocketAddr; 2], n: u64| {
        let mut r = route(addrs[i as usize], &format!("e{p}{}", ["a", "b"][i as usize]), Service::Ssh);
        r.generation = n;
        r
    };
    for (p, addrs) in &targets {
        w.set(*p, &route_of(*p, 0, addrs, 0)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flips = {
        let (stop, targets) = (stop.clone(), targets.clone());
        std::thread::spawn(move || {
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                for (p, addrs) in &targets {
                    w.set(*p, &route_of(*p, n % 2, addrs, n)).unwrap();
                }
                n += 1;
            }
            n
        })
    };
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut connections = 0u32;
    while Instant::now() < deadline {
        for p in lo..=hi {
            match probe(p) {
                Seen::Backend(name) => {
                    assert!(name == format!("p{p}a") || name == format!("p{p}b"), "port {p} reached {name}");
                    connections += 1;
                }
                Seen::Refused => panic!("port {p} refused while it always had a route"),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = flips.join().unwrap();
    assert!(connections > 200, "only {connections} connections");
    assert!(rounds > 1000, "only {rounds} flip rounds");
    // Every access-log line names an environment and an upstream of the same route.
    let log = ng.access_log();
    for line in log.lines().filter(|l| l.contains(" ok ")) {
        let env = line.split("env=").nth(1).and_then(|s| s.split(' ').next()).unwrap_or("");
        let up = line.split("up=").nth(1).and_then(|s| s.split(' ').next()).unwrap_or("");
        let ip = if env.ends_with('a') { "127.0.0.2:" } else { "127.0.0.3:" };
        assert!(up.starts_with(ip), "env and upstream of different routes: {line}");
    }
    assert_eq!(ng.pids(), pids, "no worker crashed or restarted");
    ng.assert_no_crash();
    eprintln!("{connections} connections during {rounds} rounds of {} route flips, none mixed", hi - lo + 1);
}

/// The permissions of each mapping of `file` in process `pid` ("r--s", "rw-s").
fn mapping_perms(pid: u32, file: &std::path::Path) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let name = file.display().to_string();
    maps.lines()
        .filter(|l| l.ends_with(&name))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

#[test]
fn nginx_maps_routes_read_only_and_workers_cannot_write_them() {
    let (mut w, ng, path) = gateway("readonly", 25100, 25101, ProxyForm::Balancer);
    let a = Backend::start("alpha", "127.0.0.1:0");
    w.set(25100, &route(a.addr, "enva", Service::Ssh)).unwrap();
    assert_eq!(probe(25100), Seen::Backend("alpha".into()));
    let counters = gpugate_routes::counters_path(&path);
    let (master, workers) = ng.pids();
    for pid in std::iter::once(master).chain(workers.iter().copied()) {
        assert_eq!(mapping_perms(pid, &path), vec!["r--s"], "pid {pid}: routes mapped read-only");
        assert_eq!(mapping_perms(pid, &counters), vec!["rw-s"], "pid {pid}: counters writable");
    }
    // The workers' user cannot open the routes file for writing, nor replace it.
    let meta = std::fs::metadata(&path).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o644));
    for cmd in [format!(": >> {}", path.display()), format!("touch {}/x", path.parent().unwrap().display())] {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "sh", "-c", &cmd])
            .output()
            .unwrap();
        assert!(!out.status.success(), "nobody could run {cmd:?}");
    }
    ng.assert_no_crash();
}

#[test]
fn truncating_the_table_under_load_kills_no_worker_and_a_new_table_is_picked_up() {
    let (lo, hi) = (25200u16, 25203u16);
    let (mut w, ng, path) = gateway("truncate", lo, hi, ProxyForm::Balancer);
    let pids = ng.pids();
    let a = Backend::start("alpha", "127.0.0.1:0");
    for p in lo..=hi {
        w.set(p, &route(a.addr, "enva", Service::Ssh)).unwrap();
    }
    drop(w);
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (lo..=hi)
        .map(|p| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = (0u32, 0u32);
                while !stop.load(Ordering::Relaxed) {
                    match probe(p) {
                        Seen::Backend(_) => seen.0 += 1,
                        Seen::Refused => seen.1 += 1,
                    }
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // As root, the only user who can: the file shrinks to nothing under the workers.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(0).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!((lo..=hi).all(|p| probe(p) == Seen::Refused), "a truncated table is refused");
    assert_eq!(ng.pids(), pids, "no worker died (SIGBUS) or was respawned");

    // The operator removes the broken file; the writer creates a fresh table.
    std::fs::remove_file(&path).unwrap();
    let b = Backend::start("beta", "127.0.0.1:0");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(lo, &route(b.addr, "envb", Service::Ssh)).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || probe(lo) == Seen::Backend("beta".into())),
        "the re-created table is picked up without reload"
    );
    stop.store(true, Ordering::Relaxed);
    let (ok, refused): (u32, u32) =
        load.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |acc, s| (acc.0 + s.0, acc.1 + s.1));
    assert!(ok > 20 && refused > 20, "load before and after the truncation: {ok} ok, {refused} refused");
    assert_eq!(ng.pids(), pids, "master and workers unchanged: no crash, no reload");
    let log = ng.error_log();
    assert!(log.contains("is 0 bytes, expected at least"), "{log}");
    assert!(!log.contains("signal 7") && !log.contains("exited on signal"), "{log}");
    ng.assert_no_crash();
}

#[test]
fn counters_of_an_old_route_never_reach_the_next_tenant_and_failures_are_not_proxied() {
    let (mut w, ng, _) = gateway("honest", 25300, 25301, ProxyForm::Balancer);
    let a = Backend::start("alpha", "127.0.0.1:0");
    let b = Backend::start("beta", "127.0.0.1:0");
    w.set(25300, &route(a.addr, "tenanta", Service::Ssh)).unwrap();
    let mut old = Client::connect(25300).unwrap();
    assert_eq!(old.read_line().as_deref(), Some("alpha"));
    let mut r = route(b.addr, "tenantb", Service::Ssh);
    r.generation = 2;
    w.set(25300, &r).unwrap();
    // Tenant a's session moves bytes and ends after the port went to tenant b.
    for i in 0..20 {
        assert!(old.round_trip(&format!("old session line {i}")).is_some());
    }
    drop(old);
    let mut new = Client::connect(25300).unwrap();
    assert_eq!(new.read_line().as_deref(), Some("beta"));
    assert_eq!(new.round_trip("hi").as_deref(), Some("beta:hi"));
    drop(new);
    assert!(wait_until(Duration::from_secs(2), || w.table().counters(25300).connections_total == 1));
    std::thread::sleep(Duration::from_millis(200));
    let c = w.table().counters(25300);
    assert_eq!((c.connections_total, c.connections_active), (1, 0), "only tenant b's session: {c:?}");
    assert_eq!(c.bytes_in, "hi\n".len() as u64, "tenant a's bytes are not tenant b's: {c:?}");
    assert_eq!(c.bytes_out, "beta\nbeta:hi\n".len() as u64);

    // An upstream that refuses: counted as failed, not as proxied.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    w.set(25301, &route(closed, "tenantc", Service::Ssh)).unwrap();
    assert_eq!(probe(25301), Seen::Refused);
    assert!(wait_until(Duration::from_secs(2), || w.table().counters(25301).upstream_failed_total == 1));
    assert_eq!(w.table().counters(25301).connections_total, 0);
    ng.assert_no_crash();
}

#[test]
fn open_sessions_gauge_is_true_after_a_killed_worker_and_after_a_crashed_nginx() {
    let root = temp_dir("gauge");
    let path = table_dir(&root).join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    let conf = nginx_conf(&routed_stream(&path, 25400, 25400, ProxyForm::Balancer));
    let mut ng = Nginx::start(&root, &conf);
    let a = Backend::start("alpha", "127.0.0.1:0");
    w.set(25400, &route(a.addr, "enva", Service::Ssh)).unwrap();
    let mut clients: Vec<Client> = (0..50)
        .map(|_| {
            let mut c = Client::connect(25400).unwrap();
            assert_eq!(c.read_line().as_deref(), Some("alpha"));
            c
        })
        .collect();
    let t = w.table();
    assert!(wait_until(Duration::from_secs(2), || t.counters(25400).connections_active == 50));

    let (master, workers) = ng.pids();
    let victim = workers[0];
    assert!(ng.kill_worker(victim), "the master respawns the killed worker");
    clients.retain_mut(|c| c.round_trip("still there?").is_some());
    let alive = clients.len() as u64;
    assert!(alive < 50, "the killed worker held some of the sessions ({alive} alive)");
    assert!(
        wait_until(Duration::from_secs(3), || t.counters(25400).connections_active == alive),
        "gauge {} after the kill, {alive} sessions really open",
        t.counters(25400).connections_active
    );
    assert_eq!(ng.master_pid(), master);

    // nginx dies whole (master and workers, no clean exit) and is started again.
    for pid in std::iter::once(master).chain(ng.worker_pids()) {
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    drop(clients);
    assert!(wait_until(Duration::from_secs(5), || !std::path::Path::new(&format!("/proc/{master}")).exists()));
    ng.forget();
    let _ = std::fs::remove_file(root.join("nginx/logs/nginx.pid"));
    let ng = Nginx::start(&root, &conf);
    assert!(
        wait_until(Duration::from_secs(3), || t.counters(25400).connections_active == 0),
        "the new workers clear the dead ones' rows: gauge {}",
        t.counters(25400).connections_active
    );
    let mut c = Client::connect(25400).unwrap();
    assert_eq!(c.read_line().as_deref(), Some("alpha"));
    assert!(wait_until(Duration::from_secs(2), || t.counters(25400).connections_active == 1));
    drop(c);
    // The only signal in the log is the test's own SIGKILL.
    let log = ng.error_log();
    assert!(log.contains("exited on signal 9"), "{log}");
    for bad in ["signal 7", "signal 11", "signal 6", "[emerg]", "[crit]"] {
        assert!(!log.contains(bad), "{bad}: {log}");
    }
}
