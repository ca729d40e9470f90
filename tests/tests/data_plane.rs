//! The data plane through a real nginx with the module loaded: routes appear, move and vanish
//! without a reload; every failure closes the connection; nothing crashes.

use std::collections::BTreeMap;
use std::time::Duration;

use gpugate_tests::*;

/// A table (writer open first, so nginx maps it at start) and an nginx routing the pool
/// `lo..=hi` on 127.0.0.1 through it, in a fresh directory.
fn gateway(tag: &str, lo: u16, hi: u16, form: ProxyForm) -> (Writer, Nginx) {
    let root = temp_dir(tag);
    let path = table_dir(&root).join("routes");
    let w = Writer::open(&path, LockMode::NoWait).expect("open writer");
    let ng = Nginx::start(&root, &nginx_conf(&routed_stream(&path, lo, hi, form)));
    (w, ng)
}

#[test]
fn set_repoint_remove_and_unrouted_without_reload() {
    let (mut w, ng) = gateway("lifecycle", 21000, 21009, ProxyForm::Balancer);
    let pids = ng.pids();
    let a = Backend::start("alpha", "127.0.0.1:0");
    let b = Backend::start("beta", "127.0.0.1:0");

    assert_eq!(probe(21000), Seen::Refused, "unrouted port must be refused");
    w.set(21000, &route(a.addr, "envalpha", Service::Ssh)).unwrap();
    assert_eq!(probe(21000), Seen::Backend("alpha".into()), "route set -> next connection reaches it");
    w.set(21000, &route(b.addr, "envbeta", Service::Ssh)).unwrap();
    assert_eq!(probe(21000), Seen::Backend("beta".into()), "re-pointed -> next connection goes to the new one");
    assert!(w.remove(21000).unwrap());
    assert_eq!(probe(21000), Seen::Refused, "removed -> refused");
    assert_eq!(probe(21001), Seen::Refused, "never routed -> refused");

    assert_eq!(ng.pids(), pids, "master and worker pids unchanged: no reload, no crash");
    ng.assert_no_crash();
    let c = w.table().counters(21001);
    assert_eq!(c.refused_total, 1, "the refusal is counted per port");
}

#[test]
fn thousand_port_pool_every_port_reaches_its_own_backend() {
    let (lo, hi) = (22000u16, 22999u16);
    let (mut w, ng) = gateway("pool", lo, hi, ProxyForm::Balancer);
    let backends: Vec<Backend> =
        (lo..=hi).map(|p| Backend::start(&format!("b{p}"), "127.0.0.1:0")).collect();
    let routes: BTreeMap<u16, Route> = (lo..=hi)
        .zip(&backends)
        .map(|(p, b)| (p, route(b.addr, &format!("e{p}"), Service::Jupyter)))
        .collect();
    let report = w.sync(&routes).unwrap();
    assert_eq!(report.written, 1000);
    for p in lo..=hi {
        assert_eq!(probe(p), Seen::Backend(format!("b{p}")), "port {p}");
    }
    ng.assert_no_crash();
}

#[test]
fn ipv6_upstream_and_ttl_expiry() {
    let (mut w, ng) = gateway("v6ttl", 21100, 21109, ProxyForm::Balancer);
    let v6 = Backend::start("six", "[::1]:0");
    assert!(v6.addr.is_ipv6());
    w.set(21100, &route(v6.addr, "envsix", Service::Code)).unwrap();
    assert_eq!(probe(21100), Seen::Backend("six".into()));

    let v4 = Backend::start("four", "127.0.0.1:0");
    let mut r = route(v4.addr, "envttl", Service::Ssh);
    r.expires_ms = Some(gpugate_routes::now_ms() + 1500);
    w.set(21101, &r).unwrap();
    assert_eq!(probe(21101), Seen::Backend("four".into()), "works before its expiry");
    std::thread::sleep(Duration::from_millis(1700));
    assert_eq!(probe(21101), Seen::Refused, "refused after its expiry");
    assert!(ng.access_log().contains("21101 expired"), "{}", ng.access_log());
    ng.assert_no_crash();
}

#[test]
fn established_connection_keeps_its_upstream_when_the_port_moves_or_goes() {
    let (mut w, ng) = gateway("established", 21200, 21209, ProxyForm::Balancer);
    let a = Backend::start("alpha", "127.0.0.1:0");
    let b = Backend::start("beta", "127.0.0.1:0");
    w.set(21200, &route(a.addr, "enva", Service::Ssh)).unwrap();

    let mut live = Client::connect(21200).unwrap();
    assert_eq!(live.read_line().as_deref(), Some("alpha"));
    w.set(21200, &route(b.addr, "envb", Service::Ssh)).unwrap();
    assert_eq!(live.round_trip("one").as_deref(), Some("alpha:one"), "re-pointing keeps live sessions");
    assert_eq!(probe(21200), Seen::Backend("beta".into()), "new sessions go to the new route");
    w.remove(21200).unwrap();
    assert_eq!(live.round_trip("two").as_deref(), Some("alpha:two"), "removal keeps live sessions");
    assert_eq!(probe(21200), Seen::Refused);
    ng.assert_no_crash();
}

#[test]
fn missing_table_at_start_is_picked_up_without_reload() {
    let root = temp_dir("missing");
    let tdir = table_dir(&root);
    let path = tdir.join("routes");
    let ng = Nginx::start(&root, &nginx_conf(&routed_stream(&path, 21400, 21404, ProxyForm::Balancer)));
    let pids = ng.pids();
    for _ in 0..5 {
        assert_eq!(probe(21400), Seen::Refused, "no table: refused");
    }
    let log = ng.error_log();
    assert_eq!(log.matches("does not exist").count(), 1, "logged once, not per connection:\n{log}");

    let a = Backend::start("alpha", "127.0.0.1:0");
    let mut w = Writer::open(&path, LockMode::NoWait).unwrap();
    w.set(21400, &route(a.addr, "enva", Service::Ssh)).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || probe(21400) == Seen::Backend("alpha".into())),
        "the table created after start must be picked up"
    );
    // Workers (nobody:nogroup) opened the table themselves: the setgid group directory of the
    // README lets them record counters (a session is counted when it ends).
    assert!(
        wait_until(Duration::from_secs(2), || w.table().counters(21400).connections_total >= 1),
        "workers count on a table they opened"
    );
    // The opposite case (a directory without the workers' group: read-only counters, routing
    // goes on) is tests/counters_restart.rs.
    assert!(!ng.error_log().contains("read-only"), "{}", ng.error_log());
    assert_eq!(ng.pids(), pids, "without a reload");
    ng.assert_no_crash();
}

#[test]
fn garbage_or_short_table_fails_closed_and_logs_once() {
    let root = temp_dir("garbage");
    let tdir = table_dir(&root);
    let path = tdir.join("routes");
    std::fs::write(&path, vec![0x5au8; 16 << 20]).unwrap();
    let ng = Nginx::start(&root, &nginx_conf(&routed_stream(&path, 21500, 21504, ProxyForm::Balancer)));
    let pids = ng.pids();
    for _ in 0..6 {
        assert_eq!(probe(21500), Seen::Refused);
    }
    let log = ng.error_log();
    assert_eq!(log.matches("is not a gpugate route table").count(), 1, "{log}");
    assert!(Writer::open(&path, LockMode::NoWait).is_err(), "the writer refuses to overwrite a foreign file");

    std::fs::write(&path, b"short").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    for _ in 0..6 {
        assert_eq!(probe(21501), Seen::Refused);
    }
    assert!(ng.error_log().contains("is 5 bytes, expected at least"), "{}", ng.error_log());
    assert_eq!(ng.pids(), pids, "no worker crashed");
    ng.assert_no_crash();
}

#[test]
fn variable_form_counters_and_access_log() {
    let (mut w, ng) = gateway("variable", 21600, 21609, ProxyForm::Variable);
    let a = Backend::start("alpha", "127.0.0.1:0");
    w.set(21600, &route(a.addr, "6hiflzwte2xnkroq", Service::Jupyter)).unwrap();
    let mut c = Client::connect(21600).unwrap();
    assert_eq!(c.read_line().as_deref(), Some("alpha"));
    assert!(wait_until(Duration::from_secs(2), || w.table().counters(21600).connections_active == 1));
    assert_eq!(c.round_trip("hello").as_deref(), Some("alpha:hello"));
    drop(c);
    assert!(
        wait_until(Duration::from_secs(2), || w.table().counters(21600).connections_active == 0),
        "active gauge drops when the connection closes"
    );
    let counters = w.table().counters(21600);
    assert_eq!(counters.connections_total, 1);
    assert_eq!(counters.bytes_in, "hello\n".len() as u64, "client -> workspace bytes");
    assert_eq!(counters.bytes_out, "alpha\nalpha:hello\n".len() as u64, "workspace -> client bytes");
    assert!(counters.last_activity_ms > 0);
    assert_eq!(probe(21601), Seen::Refused);
    let log = ng.access_log();
    assert!(
        log.contains(&format!("21600 ok env=6hiflzwte2xnkroq svc=jupyter up={} 200", a.addr)),
        "{log}"
    );
    assert!(log.contains("21601 no_route env=- svc=- up=- 403"), "{log}");
    ng.assert_no_crash();
}

#[test]
fn bad_directives_fail_nginx_t_naming_the_directive() {
    let root = temp_dir("badconf");
    let cases: [(&str, &str); 7] = [
        (
            "server { listen 127.0.0.1:21700; gpugate_route on; proxy_pass $gpugate_upstream; }",
            "\"gpugate_route\" is on but \"gpugate_route_table\" is not set",
        ),
        (
            "gpugate_route_table /tmp/a; gpugate_route_table /tmp/b;",
            "\"gpugate_route_table\" directive is duplicate",
        ),
        ("gpugate_route_table;", "invalid number of arguments in \"gpugate_route_table\" directive"),
        ("gpugate_route_table /tmp/dir/;", "\"gpugate_route_table\" \"/tmp/dir/\" names a directory"),
        (
            "gpugate_route_table /tmp/x; server { listen 127.0.0.1:21700; gpugate_route maybe; proxy_pass $gpugate_upstream; }",
            "invalid value \"maybe\" in \"gpugate_route\" directive",
        ),
        (
            "gpugate_route_table /tmp/x; upstream u { server 127.0.0.1:1; gpugate_balancer; } server { listen 127.0.0.1:21700; proxy_pass u; }",
            "\"gpugate_balancer\" upstream \"u\" must not contain \"server\" directives",
        ),
        (
            "gpugate_route_table /tmp/x; upstream u { gpugate_balancer; gpugate_balancer; } server { listen 127.0.0.1:21700; proxy_pass u; }",
            "\"gpugate_balancer\" is duplicate",
        ),
    ];
    for (body, expected) in cases {
        let out = Nginx::test_config(&root, &nginx_conf(body));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "nginx -t accepted: {body}\n{stderr}");
        assert!(stderr.contains(expected), "for {body}\nexpected {expected:?} in:\n{stderr}");
    }
    // And the minimal configuration from the README passes.
    let good = "gpugate_route_table /tmp/gpugate-t/routes; server { listen 127.0.0.1:21700-21701; gpugate_route on; proxy_pass $gpugate_upstream; }";
    let out = Nginx::test_config(&root, &nginx_conf(good));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn shipped_nginx_conf_passes_nginx_t() {
    let root = temp_dir("shipped");
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nginx-conf/nginx.conf"),
    )
    .unwrap();
    for needle in ["proxy_timeout          24h;", "proxy_socket_keepalive on;", "gpugate_route on;", "gpugate_flush_interval 1s;", "preread_timeout 5s;"] {
        assert!(shipped.contains(needle), "nginx.conf lost {needle:?}");
    }
    // The pools as shipped bind every address; test the same file on loopback test ports.
    let mut conf = shipped.replace(
        "load_module modules/",
        &format!("load_module {}/modules/", dist().display()),
    );
    for (i, pool) in ["20000-20999", "30000-30999", "31000-31999", "32000-32499"].iter().enumerate() {
        let lo = 24000 + i * 10;
        conf = conf.replace(&format!("listen {pool};"), &format!("listen 127.0.0.1:{lo}-{};", lo + 9));
    }
    assert_eq!(conf.matches("listen 127.0.0.1:").count(), 4, "every pool rewritten");
    let out = Nginx::test_config(&root, &conf);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
