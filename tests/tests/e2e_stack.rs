//! End-to-end tests of the Dockerized stack: the gateway image (our nginx with the module), the
//! API image and the PostgreSQL image, started by the test as a private compose project, driven
//! with real curl and OpenSSH through the gateway into real workspace containers. Pools take
//! base..base+79, the API base+80, the database base+81, where base is the first free block of
//! 100 ports in 26000-26999 (26000 unless another run holds it); each stack has its own name, so
//! runs on one machine do not collide. One test, in phases that build on each other (a stack
//! takes seconds to start); each phase prints its timing.

use std::time::{Duration, Instant};

use gpugate_tests::stack::{
    docker, port_refuses, report, run, ssh_command, ssh_run, ssh_run_retry, Login, Session, Stack, Value,
};
use serde_json::json;

/// Stacks are named `gpugate-e2e-<pid>`; each takes the first free block of 100 ports here.
const STACK: &str = "gpugate-e2e";
const BASES: [u16; 10] = [26000, 26100, 26200, 26300, 26400, 26500, 26600, 26700, 26800, 26900];
/// Workspaces created and deleted while an SSH session stays open.
const CHURN: usize = 200;
/// Concurrent API clients during the churn.
const CHURN_CLIENTS: usize = 4;

/// Runs one phase, printing how long it took.
fn phase<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    report(&format!("{name} ..."));
    let out = f();
    report(&format!("{name}: ok in {:.1} s", t.elapsed().as_secs_f64()));
    out
}

/// Polls an HTTP URL with curl until it answers `want`; returns the last (status, body).
fn curl_until(url: &str, want: u16, timeout: Duration) -> (u16, String) {
    let deadline = Instant::now() + timeout;
    loop {
        let out = run(std::process::Command::new("curl").args(["-sS", "-m", "5", "-w", "\n%{http_code}", url]));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        let status = status.trim().parse().unwrap_or(0);
        if status == want || Instant::now() >= deadline {
            return (status, body.to_string());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn port(env: &Value, service: &str) -> u16 {
    env["ports"][service].as_u64().unwrap_or_else(|| panic!("no {service} port in {env}")) as u16
}

fn text<'a>(v: &'a Value, what: &str) -> &'a str {
    v.pointer(what).and_then(Value::as_str).unwrap_or_else(|| panic!("no {what} in {v}"))
}

/// Everything the API says about the caller's environments that must survive restarts.
fn env_snapshot(stack: &Stack) -> Vec<(String, String, Value)> {
    let (status, v) = stack.call("GET", "/api/v1/environments", None);
    assert_eq!(status, 200, "list: {v}");
    let mut envs: Vec<_> = v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("list data: {v}"))
        .iter()
        .map(|e| (text(e, "/id").to_string(), text(e, "/status").to_string(), e["ports"].clone()))
        .collect();
    envs.sort_by(|a, b| a.0.cmp(&b.0));
    envs
}

fn allocated(stack: &Stack, service: &str) -> f64 {
    let series = format!("gpugate_ports{{service=\"{service}\",state=\"allocated\"}}");
    stack.metric(&series).unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[test]
fn stack_end_to_end() {
    let started = Instant::now();
    let stack = phase("start the private stack (compose up, /readyz, token)", || Stack::start_private(STACK, &BASES));
    phase("the API's database role is not a superuser; the superuser has no TCP login", || {
        let psql = |args: &[&str]| {
            let mut cmd = std::process::Command::new("docker");
            cmd.args(["exec", "-u", "postgres", &stack.container("postgres"), "psql", "-w", "-At"]).args(args);
            run(&mut cmd)
        };
        let out = psql(&[
            "-c",
            "SELECT rolsuper::text || ' ' || rolcreaterole::text || ' ' || rolcreatedb::text || ' ' || \
             (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'gpugate') \
             FROM pg_roles WHERE rolname = 'gpugate'",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "false false false gpugate",
            "role gpugate (superuser, createrole, createdb, owner of database gpugate): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tcp = psql(&["-h", "127.0.0.1", "-U", "postgres", "-c", "SELECT 1"]);
        assert!(!tcp.status.success(), "the superuser logged in over TCP without a password");
    });
    let keys = gpugate_tests::temp_dir("e2e-keys");
    let key = keys.join("id_ed25519");
    run(std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key));
    let pubkey = std::fs::read_to_string(keys.join("id_ed25519.pub")).expect("public key");

    // --- A workspace with every default service, reached with real clients through the gateway.
    let env = phase("create a workspace; ssh (password and key), scp", || {
        let env = stack.create(&json!({"name": "e2e-main", "gpus": 0, "ssh_public_keys": [pubkey.trim()]}));
        let id = text(&env, "/id");
        let ssh_port = port(&env, "ssh");
        let (lo, hi) = stack.ports.ssh();
        assert!((lo..=hi).contains(&ssh_port), "ssh port {ssh_port} outside the private pool");
        let password = Login::Password(text(&env, "/access_info/ssh/password").to_string());
        let hostname = ssh_run_retry(ssh_port, &password, "hostname", Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}\n{}", stack.api_logs()));
        assert_eq!(hostname, id, "ssh with the password reached another host");
        let by_key = ssh_run(ssh_port, &Login::Key(key.clone()), "hostname").expect("ssh with the injected key");
        assert_eq!(by_key, id, "ssh with the key reached another host");
        assert!(
            ssh_run(ssh_port, &Login::Password("wrong".into()), "true").is_err(),
            "a wrong password logged in"
        );

        let blob = keys.join("blob");
        let data: Vec<u8> = (0..1_048_576u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        std::fs::write(&blob, &data).expect("write blob");
        let login = Login::Key(key.clone());
        let up = run(ssh_command("scp", &login).args(["-q", "-P", &ssh_port.to_string()]).arg(&blob).arg("remotegpu@127.0.0.1:blob"));
        assert!(up.status.success(), "scp in: {}", String::from_utf8_lossy(&up.stderr));
        let back = keys.join("blob.back");
        let down =
            run(ssh_command("scp", &login).args(["-q", "-P", &ssh_port.to_string()]).arg("remotegpu@127.0.0.1:blob").arg(&back));
        assert!(down.status.success(), "scp back: {}", String::from_utf8_lossy(&down.stderr));
        assert!(std::fs::read(&back).expect("read back") == data, "scp round trip changed the file");
        assert_eq!(ssh_run(ssh_port, &login, "wc -c < blob").as_deref(), Ok("1048576"));
        env
    });
    let id = text(&env, "/id").to_string();
    let ssh_port = port(&env, "ssh");
    let key_login = Login::Key(key.clone());

    phase("JupyterLab and the code port through the gateway", || {
        let jport = port(&env, "jupyter");
        let token = text(&env, "/access_info/jupyter/token");
        let (status, body) =
            curl_until(&format!("http://127.0.0.1:{jport}/api/status?token={token}"), 200, Duration::from_secs(60));
        assert_eq!(status, 200, "JupyterLab /api/status through port {jport}: {body}");
        assert!(body.contains("started"), "JupyterLab status: {body}");
        let (status, _) = curl_until(&format!("http://127.0.0.1:{jport}/api/status"), 403, Duration::from_secs(5));
        assert_eq!(status, 403, "JupyterLab without the token");
        let cport = port(&env, "code");
        let (status, body) = curl_until(&format!("http://127.0.0.1:{cport}/health"), 200, Duration::from_secs(60));
        assert_eq!(status, 200, "code port {cport}: {body}");
    });

    phase("restart the gateway container; routes still work", || {
        let before = stack.gateway_pids();
        let out = docker(&["restart", "-t", "5", &stack.container("gateway")]);
        assert!(out.status.success(), "docker restart gateway");
        let after = stack.gateway_pids();
        assert_ne!(before.0, after.0, "the gateway did not restart");
        let h = ssh_run_retry(ssh_port, &key_login, "hostname", Duration::from_secs(10)).expect("ssh after restart");
        assert_eq!(h, id);
        let jport = port(&env, "jupyter");
        let token = text(&env, "/access_info/jupyter/token");
        let (status, _) =
            curl_until(&format!("http://127.0.0.1:{jport}/api/status?token={token}"), 200, Duration::from_secs(10));
        assert_eq!(status, 200, "JupyterLab after a gateway restart");
    });

    // From here on the gateway must never reload or restart.
    let pids = stack.gateway_pids();
    assert!(!pids.1.is_empty(), "no nginx workers under the gateway's master {}", pids.0);
    report(&format!("gateway master {} workers {:?}", pids.0, pids.1));
    let mut session = Session::open(ssh_port, &key_login, Duration::from_secs(10)).expect("open an SSH session");

    phase("restart the API; the session and routes keep working, nothing duplicated", || {
        let envs = env_snapshot(&stack);
        let ssh_allocated = allocated(&stack, "ssh");
        let containers = stack.containers(None).len();
        let out = docker(&["restart", "-t", "10", &stack.container("api")]);
        assert!(out.status.success(), "docker restart api");
        assert!(stack.wait_ready(Duration::from_secs(60)), "the API is not ready again: {}", stack.api_logs());
        session.round_trip("after-api-restart", Duration::from_secs(5)).expect("session after the API restart");
        assert_eq!(ssh_run(ssh_port, &key_login, "hostname").as_deref(), Ok(id.as_str()));
        assert_eq!(env_snapshot(&stack), envs, "environments changed across an API restart");
        assert_eq!(allocated(&stack, "ssh"), ssh_allocated, "allocated ssh ports changed");
        assert_eq!(stack.containers(Some(&id)).len(), 1, "containers of {id}");
        assert_eq!(stack.containers(None).len(), containers, "workspace containers changed");
    });

    phase("stop the database; routes and the session keep working, the API answers 503", || {
        let out = docker(&["stop", "-t", "5", &stack.container("postgres")]);
        assert!(out.status.success(), "docker stop postgres");
        let t = Instant::now();
        let (status, v) = stack.call("GET", "/api/v1/environments", None);
        report(&format!("  list without a database: {status} in {:.1} s: {v}", t.elapsed().as_secs_f64()));
        assert_eq!(status, 503, "list without a database: {v}");
        // Bounded by the API's 2 s acquire time-out (plus slack for a loaded host), well inside
        // the 5 s of a typical probe — not the pool's old 10 s.
        assert!(t.elapsed() < Duration::from_secs(5), "the 503 took {:?}", t.elapsed());
        let message = v["message"].as_str().unwrap_or_default();
        assert!(message.contains("database"), "503 without a message naming the database: {v}");
        let (status, v) = stack.call("GET", "/readyz", None);
        assert_eq!(status, 503, "/readyz without a database: {v}");
        assert_eq!(v["data"]["database"], false, "/readyz without a database: {v}");
        assert!(v["data"]["reasons"]["database"].is_string(), "/readyz names no reason: {v}");
        assert!(!v.to_string().contains("os error"), "/readyz leaks the driver's error: {v}");
        session.round_trip("database-down", Duration::from_secs(5)).expect("session with the database down");
        assert_eq!(ssh_run(ssh_port, &key_login, "hostname").as_deref(), Ok(id.as_str()), "new ssh, database down");

        let out = docker(&["start", &stack.container("postgres")]);
        assert!(out.status.success(), "docker start postgres");
        let t = Instant::now();
        let back = gpugate_tests::wait_until(Duration::from_secs(60), || {
            std::thread::sleep(Duration::from_millis(250));
            stack.call("GET", "/api/v1/environments", None).0 == 200
        });
        assert!(back, "the API did not recover with the database: {}", stack.api_logs());
        report(&format!("  API answers again {:.1} s after the database started", t.elapsed().as_secs_f64()));
        assert!(stack.wait_ready(Duration::from_secs(30)), "/readyz after the database is back");
        session.round_trip("database-back", Duration::from_secs(5)).expect("session after the database is back");
    });

    phase(&format!("{CHURN} workspaces created and deleted around an open session, no reload"), || {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        let t = Instant::now();
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..CHURN_CLIENTS)
                .map(|_| {
                    s.spawn(|| {
                        let mut ok = 0;
                        while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < CHURN {
                            let e = stack.create(&json!({"name": "churn", "gpus": 0, "services": ["ssh"]}));
                            stack.delete(text(&e, "/id"));
                            ok += 1;
                        }
                        ok
                    })
                })
                .collect();
            let checker = s.spawn(|| {
                let mut n = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    session.round_trip(&format!("churn-{n}"), Duration::from_secs(5)).expect("session during the churn");
                    n += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                n
            });
            // Join every client before judging any, and stop the checker either way: a failed
            // client must fail the test, not leave the checker looping forever.
            let joined: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            let checks = checker.join().expect("session checker panicked");
            let made: usize = joined.into_iter().map(|r| r.expect("churn client panicked")).sum();
            assert_eq!(made, CHURN);
            report(&format!(
                "  {made} created and deleted in {:.1} s ({:.0} ms each, {CHURN_CLIENTS} clients); session answered {checks} round trips",
                t.elapsed().as_secs_f64(),
                t.elapsed().as_secs_f64() * 1000.0 / made as f64
            ));
        });
        assert_eq!(stack.gateway_pids(), pids, "the gateway's master or workers changed: nginx reloaded");
        assert_eq!(stack.containers(None).len(), 1, "churn workspaces left behind");
        session.round_trip("after-churn", Duration::from_secs(5)).expect("session after the churn");
        assert_eq!(ssh_run(ssh_port, &key_login, "hostname").as_deref(), Ok(id.as_str()));
    });

    phase("delete the workspace; its port refuses within a second, the container is gone", || {
        stack.delete(&id);
        let t = Instant::now();
        let refused = gpugate_tests::wait_until(Duration::from_secs(1), || port_refuses(ssh_port));
        assert!(refused, "port {ssh_port} still answers 1 s after the delete");
        report(&format!("  refused {} ms after the delete returned", t.elapsed().as_millis()));
        assert!(ssh_run(ssh_port, &key_login, "true").is_err(), "ssh still logs in after the delete");
        let gone = gpugate_tests::wait_until(Duration::from_secs(10), || stack.containers(Some(&id)).is_empty());
        assert!(gone, "the container of {id} is still there");
        let (status, v) = stack.call("GET", &format!("/api/v1/environments/{id}"), None);
        assert!(status == 404 || v["data"]["status"] == "deleted", "after delete: {status} {v}");
    });
    assert_eq!(stack.gateway_pids(), pids, "the gateway's master or workers changed");
    drop(session);
    drop(stack);
    let _ = std::fs::remove_dir_all(&keys);
    report(&format!("all phases passed in {:.1} s", started.elapsed().as_secs_f64()));
}
