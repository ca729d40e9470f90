//! Counters through a real nginx across the failures a gateway meets: workers that may not
//! write the counters file, and a gateway killed inside its own pid namespace (a container
//! killed with SIGKILL) and started again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use gpugate_tests::*;

/// A table directory the workers (nobody:nogroup) may read but not write: root's, 0755, no
/// setgid group, so the counters file is root:root 0664.
fn root_only_table_dir(root: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join("table");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// The routed pool with a short flush interval (live sessions flush and check revokes).
fn stream(table: &Path, lo: u16, hi: u16) -> String {
    routed_stream(table, lo, hi, ProxyForm::Balancer)
        .replace("gpugate_route on;", "gpugate_route on;\n        gpugate_flush_interval 200ms;")
}

#[test]
fn workers_that_cannot_write_the_counters_route_every_connection_and_stay_alive() {
    let root = temp_dir("rocounters");
    let path = root_only_table_dir(&root).join("routes");
    // nginx first: the workers open the table themselves when it appears (the master, root,
    // would otherwise map it writable for them before they drop privileges).
    let ng = Nginx::start(&root, &nginx_conf(&stream(&path, 21800, 21804)));
    let pids = ng.pids();
    let a = Backend::start("alpha", "127.0.0.1:0");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(21800, &route(a.addr, "enva", Service::Ssh)).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || probe(21800) == Seen::Backend("alpha".into())),
        "the table created after start is picked up (workers that died: {})",
        ng.error_log().matches("exited on signal").count()
    );
    // A session that lives through several flushes, then routed and refused connections.
    let mut live = Client::connect(21800).unwrap();
    assert_eq!(live.read_line().as_deref(), Some("alpha"));
    for i in 0..5 {
        assert_eq!(live.round_trip(&format!("m{i}")).as_deref(), Some(format!("alpha:m{i}").as_str()));
        std::thread::sleep(Duration::from_millis(150));
    }
    drop(live);
    for _ in 0..20 {
        assert_eq!(probe(21800), Seen::Backend("alpha".into()), "every connection is routed");
        assert_eq!(probe(21801), Seen::Refused, "an unrouted port is refused");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ng.pids(), pids, "master and worker pids unchanged: no worker crashed");
    ng.assert_no_crash();
    let log = ng.error_log();
    let said = log.matches("mapped read-only: counters are not recorded").count();
    assert!((1..=2).contains(&said), "each worker says once that it cannot count ({said}):\n{log}");
    let c = w.table().counters(21800);
    assert_eq!((c.connections_total, c.refused_total), (0, 0), "nothing is counted by workers that may not");
}

/// nginx (in the foreground) as the first process of a pid namespace of its own, like the
/// gateway in a container; returns the `unshare` child.
fn start_in_pid_namespace(root: &Path, conf_text: &str) -> Child {
    let prefix = root.join("nginx-ns");
    std::fs::create_dir_all(prefix.join("logs")).unwrap();
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, conf_text).unwrap();
    Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(dist().join("sbin/nginx"))
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off;"])
        .spawn()
        .expect("unshare nginx")
}

#[test]
fn a_gateway_killed_in_its_pid_namespace_and_started_again_leaves_no_phantom_session() {
    let root = temp_dir("pidnskill");
    let path = table_dir(&root).join("routes");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    let a = Backend::start("alpha", "127.0.0.1:0");
    w.set(21810, &route(a.addr, "enva", Service::Ssh)).unwrap();
    let conf = nginx_conf(&stream(&path, 21810, 21814));
    let mut unshare = start_in_pid_namespace(&root, &conf);
    assert!(
        wait_until(Duration::from_secs(10), || probe(21810) == Seen::Backend("alpha".into())),
        "the gateway in its namespace routes"
    );
    let mut sessions: Vec<Client> = (0..3).map(|_| Client::connect(21810).unwrap()).collect();
    for c in &mut sessions {
        assert_eq!(c.read_line().as_deref(), Some("alpha"));
    }
    assert!(
        wait_until(Duration::from_secs(3), || w.table().counters(21810).connections_active == 3),
        "three open sessions in the gauge"
    );

    // SIGKILL to the namespace's first process (the master): the kernel kills every worker
    // with it, and nobody runs an exit hook.
    let master = children_of(unshare.id());
    assert_eq!(master.len(), 1, "nginx is the namespace's first process");
    // SAFETY: kill(2) on the process this test started.
    unsafe { libc::kill(master[0] as i32, libc::SIGKILL) };
    let _ = unshare.wait();
    for c in &mut sessions {
        assert_eq!(c.read_line(), None, "the session died with its gateway");
    }
    assert!(wait_until(Duration::from_secs(5), || probe(21810) == Seen::Refused), "the gateway is gone");
    assert_eq!(w.table().counters(21810).connections_active, 3, "the dead workers' rows are still there");

    // Started again (here in the host's namespace, as a new container's would be another).
    let ng = Nginx::start(&temp_dir("pidnsagain"), &conf);
    assert!(
        wait_until(Duration::from_millis(2 * 200 + 1000), || w.table().counters(21810).connections_active == 0),
        "connections_active back to 0 within a flush interval or two: {:?}",
        w.table().counters(21810)
    );
    let mut again = Client::connect(21810).unwrap();
    assert_eq!(again.read_line().as_deref(), Some("alpha"));
    assert!(wait_until(Duration::from_secs(2), || w.table().counters(21810).connections_active == 1));
    drop(again);
    ng.assert_no_crash();
}
