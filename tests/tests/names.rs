//! Routing by TLS server name through a real nginx with the module loaded, with real TLS
//! clients (OpenSSL's s_client, curl) and the development certificates `make up` makes
//! (scripts/tls-dev.sh): `<env-id>.<service>.<domain>` reaches the environment's name route,
//! terminated at the gateway or passed through to a workspace that serves its own TLS; every
//! other name is refused at once and counted by reason; revokes and removals apply to name
//! routes as to port routes; a replaced certificate is served without a reload.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpugate_routes::{HostKey, NameRefusal};
use gpugate_tests::*;

const DOMAIN: &str = "gpu.example.com";

/// A gateway with one terminating and one passthrough name-routed server.
struct Gate {
    w: Writer,
    ng: Nginx,
    tls: PathBuf,
    /// The terminating server's port and the passthrough server's.
    term: u16,
    pass: u16,
}

fn gate(tag: &str, term: u16, pass: u16) -> Gate {
    let root = temp_dir(tag);
    let path = table_dir(&root).join("routes");
    let w = Writer::open_with(&path, LockMode::NoWait, 1024).expect("open writer");
    let tls = dev_tls(&root, DOMAIN);
    let body = format!(
        r#"
    log_format gpugate '$server_port $gpugate_route_status env=$gpugate_env_id svc=$gpugate_service up=$gpugate_upstream $status';
    access_log logs/access.log gpugate;
    gpugate_route_table {table};
    gpugate_flush_interval 200ms;
    gpugate_name_domain {DOMAIN};
    upstream gpugate {{ gpugate_balancer; }}
    # The certificate is named by a variable, so nginx loads it per handshake (cached for
    # `valid`) and a replaced file is served without a reload.
    map $ssl_server_name $gpugate_tls {{ default gateway; }}
    server {{
        listen 127.0.0.1:{term} ssl;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_certificate {tls}/$gpugate_tls.pem;
        ssl_certificate_key {tls}/$gpugate_tls.pem;
        ssl_certificate_cache max=16 valid=1s;
        gpugate_name_route terminate;
        proxy_connect_timeout 2s;
        proxy_pass gpugate;
    }}
    server {{
        listen 127.0.0.1:{pass};
        gpugate_name_route passthrough;
        proxy_connect_timeout 2s;
        proxy_pass gpugate;
    }}
"#,
        table = path.display(),
        tls = tls.display(),
    );
    let ng = Nginx::start(&root, &nginx_conf(&body));
    Gate { w, ng, tls, term, pass }
}

fn name_route(upstream: SocketAddr, env: &str, service: Service) -> Route {
    route(upstream, env, service)
}

fn key(env: &str, service: Service) -> HostKey {
    HostKey::new(env.parse().unwrap(), service)
}

/// A backend that greets each connection with `<name>\n` and closes it.
struct Greeter {
    addr: SocketAddr,
}

impl Greeter {
    fn start(name: &'static str) -> Greeter {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(format!("{name}\n").as_bytes());
            }
        });
        Greeter { addr }
    }
}

/// A plain-HTTP backend (what a workspace's Jupyter is behind a terminating gateway).
fn http_backend(body: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = c.write_all(reply.as_bytes());
        }
    });
    addr
}

/// `openssl s_client` to the gateway with `name` as SNI (None: no SNI at all), checking the
/// gateway's certificate against the development CA for that name.
fn s_client(g: &Gate, port: u16, name: Option<&str>) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["10", "openssl", "s_client", "-quiet", "-ign_eof", "-verify_return_error"])
        .arg("-connect")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(g.tls.join("ca.crt"));
    match name {
        Some(n) => cmd.args(["-servername", n, "-verify_hostname", n]),
        None => cmd.args(["-noservername"]),
    };
    cmd
}

/// What a TLS client saw through the terminating server: the greeting, or a refusal; and how
/// long it took.
fn greeting(g: &Gate, name: Option<&str>) -> (Seen, Duration) {
    let t = Instant::now();
    let out = s_client(g, g.term, name).stdin(Stdio::null()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let seen = if text.is_empty() { Seen::Refused } else { Seen::Backend(text) };
    (seen, t.elapsed())
}

fn refused_counts(g: &Gate) -> Vec<(NameRefusal, u64)> {
    g.w.table().counter_file().unwrap().name_refused()
}

fn count(counts: &[(NameRefusal, u64)], why: NameRefusal) -> u64 {
    counts.iter().find(|(r, _)| *r == why).map_or(0, |(_, n)| *n)
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl").args(["-sS", "-m", "10"]).args(args).output().unwrap()
}

#[test]
fn terminate_routes_each_name_to_its_route_and_refuses_every_other_name_at_once() {
    let mut g = gate("names-term", 25600, 25601);
    let (a, b, c) = (Greeter::start("alpha"), Greeter::start("beta"), Greeter::start("gamma"));
    g.w.set_host(&name_route(a.addr, "abc", Service::Jupyter)).unwrap();
    g.w.set_host(&name_route(b.addr, "abc", Service::Code)).unwrap();
    g.w.set_host(&name_route(c.addr, "abc", Service::Ssh)).unwrap();
    let web = http_backend("hello from web");
    g.w.set_host(&name_route(web, "web", Service::Jupyter)).unwrap();

    for (name, want) in [
        ("abc.jupyter.gpu.example.com", "alpha"),
        ("abc.code.gpu.example.com", "beta"),
        ("ABC.SSH.GPU.EXAMPLE.COM", "gamma"),
    ] {
        assert_eq!(greeting(&g, Some(name)).0, Seen::Backend(want.into()), "{name}");
    }
    // A real HTTPS client: the gateway's certificate checks out for the name, the workspace
    // answers in plain HTTP behind it.
    let resolve = format!("web.jupyter.{DOMAIN}:{}:127.0.0.1", g.term);
    let url = format!("https://web.jupyter.{DOMAIN}:{}/api/status", g.term);
    let ca = g.tls.join("ca.crt");
    let out = curl(&["--cacert", ca.to_str().unwrap(), "--resolve", &resolve, &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from web", "{}", String::from_utf8_lossy(&out.stderr));
    // TLS 1.2 and 1.3 only.
    let old = curl(&["--cacert", ca.to_str().unwrap(), "--resolve", &resolve, "--tlsv1.1", "--tls-max", "1.1", &url]);
    assert!(!old.status.success(), "TLS 1.1 must be refused");

    let refusals = [
        (Some("zzz.jupyter.gpu.example.com"), NameRefusal::NoRoute),
        (Some("abc.rdp.gpu.example.com"), NameRefusal::NoRoute),
        (Some("abc.ftp.gpu.example.com"), NameRefusal::UnknownService),
        (Some("abc.jupyter.example.org"), NameRefusal::OtherDomain),
        (Some("a.b.jupyter.gpu.example.com"), NameRefusal::BadName),
        (None, NameRefusal::NoName),
    ];
    let before = refused_counts(&g);
    for (name, why) in refusals {
        // The certificate covers only the domain's wildcards: names outside them are tested
        // without the hostname check, as an attacker would connect.
        let (seen, took) = match name {
            Some(n) if why == NameRefusal::NoRoute => greeting(&g, Some(n)),
            _ => {
                let t = Instant::now();
                let mut cmd = Command::new("timeout");
                cmd.args(["10", "openssl", "s_client", "-quiet", "-ign_eof"])
                    .arg("-connect")
                    .arg(format!("127.0.0.1:{}", g.term));
                match name {
                    Some(n) => cmd.args(["-servername", n]),
                    None => cmd.arg("-noservername"),
                };
                let out = cmd.stdin(Stdio::null()).output().unwrap();
                let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
                (if text.is_empty() { Seen::Refused } else { Seen::Backend(text) }, t.elapsed())
            }
        };
        assert_eq!(seen, Seen::Refused, "{name:?} must be refused ({why:?})");
        assert!(took < Duration::from_secs(3), "{name:?} refused at once, not after a time-out: {took:?}");
    }
    let after = refused_counts(&g);
    for why in NameRefusal::ALL {
        let want = refusals.iter().filter(|(_, w)| *w == why).count() as u64;
        assert_eq!(count(&after, why) - count(&before, why), want, "{} refusals", why.as_str());
    }
    // Sessions by name are counted on the name route's slot.
    let slot = g.w.table().host_slot(key("abc", Service::Jupyter)).unwrap();
    assert!(wait_until(Duration::from_secs(3), || g.w.table().counters(slot).connections_total == 1));
    assert!(g.w.table().counters(slot).bytes_out >= "alpha\n".len() as u64);
    // The access log says why, per connection.
    assert!(wait_until(Duration::from_secs(3), || {
        let log = g.ng.access_log();
        ["no_route", "unknown_service", "other_domain", "bad_name", "no_name"].iter().all(|s| log.contains(s))
            && log.contains("ok env=abc svc=jupyter")
    }), "{}", g.ng.access_log());
    g.ng.assert_no_crash();
    g.ng.stop();
}

#[test]
fn passthrough_reaches_a_workspace_that_serves_its_own_tls() {
    let mut g = gate("names-pass", 25610, 25611);
    // The workspace's own TLS server (the dev certificate covers *.jupyter.<domain>); the
    // passthrough server has no certificate at all.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let pem = g.tls.join("gateway.pem");
    let mut server: Child = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&pem)
        .arg("-key")
        .arg(&pem)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()));
    g.w.set_host(&name_route(SocketAddr::from(([127, 0, 0, 1], port)), "own", Service::Jupyter)).unwrap();

    let ca = g.tls.join("ca.crt");
    let resolve = format!("own.jupyter.{DOMAIN}:{}:127.0.0.1", g.pass);
    let url = format!("https://own.jupyter.{DOMAIN}:{}/", g.pass);
    let out = curl(&["--cacert", ca.to_str().unwrap(), "--resolve", &resolve, "-o", "/dev/null", "-w", "%{http_code}", &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", String::from_utf8_lossy(&out.stderr));

    // Not TLS, an unknown name, no name: refused at once and counted.
    let before = refused_counts(&g);
    assert_eq!(probe(g.pass), Seen::Refused, "plain bytes never reach a workspace");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", g.pass)).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)), "plain HTTP is closed without an answer");
    assert!(t.elapsed() < Duration::from_secs(2));
    let out = curl(&["-k", "--resolve", &format!("nobody.jupyter.{DOMAIN}:{}:127.0.0.1", g.pass), &format!("https://nobody.jupyter.{DOMAIN}:{}/", g.pass)]);
    assert!(!out.status.success());
    let mut no_sni = Command::new("timeout");
    no_sni.args(["10", "openssl", "s_client", "-quiet", "-noservername", "-connect"]).arg(format!("127.0.0.1:{}", g.pass));
    let out = no_sni.stdin(Stdio::null()).output().unwrap();
    assert!(out.stdout.is_empty());
    let after = refused_counts(&g);
    assert!(wait_until(Duration::from_secs(2), || count(&refused_counts(&g), NameRefusal::NotTls) >= count(&before, NameRefusal::NotTls) + 1));
    assert_eq!(count(&after, NameRefusal::NoRoute) - count(&before, NameRefusal::NoRoute), 1);
    assert_eq!(count(&after, NameRefusal::NoName) - count(&before, NameRefusal::NoName), 1);
    let slot = g.w.table().host_slot(key("own", Service::Jupyter)).unwrap();
    assert!(wait_until(Duration::from_secs(3), || g.w.table().counters(slot).connections_total == 1));
    let _ = server.kill();
    let _ = server.wait();
    g.ng.assert_no_crash();
    g.ng.stop();
}

#[test]
fn revoke_and_removal_apply_to_name_routes_as_to_port_routes() {
    let mut g = gate("names-revoke", 25620, 25621);
    let echo = Backend::start("echo", "127.0.0.1:0");
    g.w.set_host(&name_route(echo.addr, "live", Service::Ssh)).unwrap();
    let name = format!("live.ssh.{DOMAIN}");
    let (mut session, mut out) = open_session(&g, &name);
    let slot = g.w.table().host_slot(key("live", Service::Ssh)).unwrap();
    assert!(wait_until(Duration::from_secs(2), || g.w.table().counters(slot).connections_active == 1));

    // Revoke: the open session is closed within a flush interval; new ones still work.
    g.w.revoke_host(key("live", Service::Ssh)).unwrap();
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    assert!(t.elapsed() < Duration::from_secs(3), "revoked session closed in {:?}", t.elapsed());
    let _ = session.wait();
    // A new session still works.
    let (mut again, _out) = open_session(&g, &name);
    let _ = again.kill();
    let _ = again.wait();
    assert!(wait_until(Duration::from_secs(2), || g.w.table().counters(slot).revoked_total == 1));

    // Removal: the name is refused at once, like a port without a route.
    assert!(g.w.remove_host(key("live", Service::Ssh)).unwrap());
    let (seen, took) = greeting(&g, Some(&name));
    assert_eq!(seen, Seen::Refused);
    assert!(took < Duration::from_secs(3));
    g.ng.assert_no_crash();
    g.ng.stop();
}

/// A long-lived session through the terminating server to the echo backend, after its greeting.
fn open_session(g: &Gate, name: &str) -> (Child, std::process::ChildStdout) {
    let mut session = s_client(g, g.term, Some(name)).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut out = session.stdout.take().unwrap();
    let mut first = [0u8; 5];
    out.read_exact(&mut first).expect("the echo backend's greeting");
    assert_eq!(&first, b"echo\n");
    (session, out)
}

fn served_serial(g: &Gate, name: &str) -> String {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "openssl s_client -connect 127.0.0.1:{} -servername {name} </dev/null 2>/dev/null | openssl x509 -noout -serial",
        g.term
    ));
    run_ok_text(&mut cmd)
}

fn run_ok_text(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_replaced_certificate_is_served_to_new_handshakes_without_a_reload() {
    let mut g = gate("names-rotate", 25630, 25631);
    let a = Greeter::start("alpha");
    g.w.set_host(&name_route(a.addr, "rot", Service::Jupyter)).unwrap();
    let name = format!("rot.jupyter.{DOMAIN}");
    let old = served_serial(&g, &name);
    assert!(old.starts_with("serial="), "{old:?}");
    let pids = g.ng.pids();
    // Re-issue (the script issues a certificate that is missing) and rename the new pair over
    // gateway.pem, as an operator's rotation does.
    std::fs::remove_file(g.tls.join("gateway.crt")).unwrap();
    let out = Command::new(stack::repo_root().join("scripts/tls-dev.sh"))
        .arg(&g.tls)
        .arg(DOMAIN)
        .arg("nogroup")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = Instant::now();
    let mut now = old.clone();
    while now == old && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        now = served_serial(&g, &name);
    }
    assert_ne!(now, old, "the new certificate is served within the cache's validity (1 s)");
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert_eq!(greeting(&g, Some(&name)).0, Seen::Backend("alpha".into()), "the new certificate verifies");
    assert_eq!(g.ng.pids(), pids, "same master and workers: no reload, no restart");
    g.ng.assert_no_crash();
    g.ng.stop();
}

#[test]
fn name_directives_are_checked_by_nginx_t() {
    let root = temp_dir("names-conf");
    let table = table_dir(&root).join("routes");
    let server = |inner: &str| {
        format!(
            "gpugate_route_table {};\nupstream gpugate {{ gpugate_balancer; }}\nserver {{ listen 127.0.0.1:25640; {inner} proxy_pass gpugate; }}",
            table.display()
        )
    };
    for (inner, expect) in [
        ("gpugate_name_route passthrough;", "\"gpugate_name_route\" needs \"gpugate_name_domain\""),
        ("gpugate_name_route sideways; gpugate_name_domain gpu.example.com;", "\"gpugate_name_route\" \"sideways\" is not a mode"),
        ("gpugate_name_route terminate; gpugate_name_domain localhost;", "\"gpugate_name_domain\" \"localhost\" is not a DNS name"),
        ("gpugate_name_route terminate; gpugate_name_domain a_b.example.com;", "\"gpugate_name_domain\" \"a_b.example.com\" is not a DNS name"),
        ("gpugate_route on; gpugate_name_route passthrough; gpugate_name_domain gpu.example.com;", "cannot be used in the same server"),
        ("gpugate_name_route passthrough; gpugate_name_route off; gpugate_name_domain gpu.example.com;", "\"gpugate_name_route\" directive is duplicate"),
    ] {
        let out = Nginx::test_config(&root, &nginx_conf(&server(inner)));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expect), "{inner}: {err}");
    }
    let ok = Nginx::test_config(
        &root,
        &nginx_conf(&server("gpugate_name_route passthrough; gpugate_name_domain GPU.Example.com.;")),
    );
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // Without a table in the stream block.
    let out = Nginx::test_config(
        &root,
        &nginx_conf("upstream gpugate { gpugate_balancer; }\nserver { listen 127.0.0.1:25641; gpugate_name_route passthrough; gpugate_name_domain gpu.example.com; proxy_pass gpugate; }"),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"gpugate_route_table\" is not set"));
}
