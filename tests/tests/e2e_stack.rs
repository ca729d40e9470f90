//! End-to-end tests of the Dockerized stack: the gateway image (our nginx with the module), the
//! API image and the PostgreSQL image, started by the test as a private compose project, driven
//! with real curl and OpenSSH through the gateway into real workspace containers. Pools take
//! base..base+79, the API base+80, the database base+81, the TLS port (names) base+82, where base is the first free block of
//! 100 ports in 26000-26999 (26000 unless another run holds it); each stack has its own name, so
//! runs on one machine do not collide. One test, in phases that build on each other (a stack
//! takes seconds to start); each phase prints its timing.

use std::path::Path;
use std::time::{Duration, Instant};

use gpugate_tests::host_identity;
use gpugate_tests::ssh::{self, Agent, Forwards, Via};
use gpugate_tests::stack::{
    docker, port_refuses, repo_root, report, run, run_ok, ssh_command, ssh_run, ssh_run_retry, Login, Session, Stack,
    Value, WebSocket, DOMAIN,
};
use serde_json::json;

/// Stacks are named `gpugate-e2e-<pid>`; each takes the first free block of 100 ports here.
const STACK: &str = "gpugate-e2e";
const BASES: [u16; 10] = [26000, 26100, 26200, 26300, 26400, 26500, 26600, 26700, 26800, 26900];
/// Workspaces created and deleted while an SSH session stays open (GPUGATE_E2E_CHURN
/// overrides it for quicker runs while developing).
fn churn() -> usize {
    std::env::var("GPUGATE_E2E_CHURN").ok().and_then(|v| v.parse().ok()).unwrap_or(200)
}
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

/// The API's view of one environment.
fn show(stack: &Stack, id: &str) -> Value {
    let (status, v) = stack.call("GET", &format!("/api/v1/environments/{id}"), None);
    assert_eq!(status, 200, "GET {id}: {v}");
    v["data"].clone()
}

/// A live counter of one service of an environment, as the API shows it.
fn activity(stack: &Stack, id: &str, service: &str, field: &str) -> u64 {
    let v = show(stack, id);
    v["activity"][service][field].as_u64().unwrap_or_else(|| panic!("no activity.{service}.{field}: {v}"))
}

/// The counter once it reaches `at_least`, or its value after five seconds: the API sums what
/// every gateway reports once a second, so a change shows up a report or two after it happened.
fn activity_reaching(stack: &Stack, id: &str, service: &str, field: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = activity(stack, id, service, field);
        if value >= at_least || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Access-log lines of the gateway for sessions on `port` that it closed because their route
/// was revoked.
fn revoked_in_log(stack: &Stack, port: u16) -> usize {
    let out = docker(&["logs", &stack.container("gateway")]);
    let needle = format!("port={port} route=revoked ");
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&needle)).count()
}

/// Runs `end` (a stop or a delete) on another thread while `open` is connected to `port`, and
/// checks that the gateway closed the session (a revoked close in its access log) rather than
/// the container going away under it.
fn closed_by_the_gateway(stack: &Stack, open: &mut Session, port: u16, end: impl FnOnce() + Send) {
    let before = revoked_in_log(stack, port);
    std::thread::scope(|s| {
        let ender = s.spawn(end);
        assert!(open.closed_within(Duration::from_secs(5)), "the session outlived the stop or delete");
        ender.join().expect("stop/delete thread");
    });
    // The access log is flushed every second.
    let seen = gpugate_tests::wait_until(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(250));
        revoked_in_log(stack, port) > before
    });
    assert!(seen, "no revoked session on port {port} in the gateway's access log: the container closed it");
}

/// The workspace by name over TLS, through the `~/.ssh/config` block the API prints
/// (`access_info.ssh.tls.ssh_config`), written into `dir` as a user would; the test resolves
/// the name to 127.0.0.1 and trusts the stack's development CA.
fn by_name(stack: &Stack, env: &Value, dir: &Path) -> Via {
    let block = text(env, "/access_info/ssh/tls/ssh_config")
        .replace("-connect %h:", "-connect 127.0.0.1:")
        .replace("-verify_return_error", &format!("-verify_return_error -CAfile {}", stack.ca().display()));
    assert!(block.contains(&format!("Host *.ssh.{DOMAIN}")) && block.contains("ProxyCommand openssl s_client"), "{block}");
    let config = dir.join("ssh_config");
    std::fs::write(&config, block).expect("write ssh config");
    Via::Name { config, host: format!("{}.ssh.{DOMAIN}", text(env, "/id")) }
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
    let env = phase("create a workspace with wait: ready; the first ssh and JupyterLab requests work; scp", || {
        let t = Instant::now();
        // Every service by port and by name: the port phases below and the names phase use one
        // workspace.
        let access = json!({"ssh": "both", "jupyter": "both", "code": "both"});
        let env = stack.create(
            &json!({"name": "e2e-main", "gpus": 0, "ssh_public_keys": [pubkey.trim()], "wait": "ready", "access": access}),
        );
        report(&format!("  create with wait: ready answered in {:.1} s", t.elapsed().as_secs_f64()));
        let id = text(&env, "/id");
        assert_eq!(env["ready"], true, "not ready after wait: ready: {}", env["readiness"]);
        for svc in ["ssh", "jupyter", "code"] {
            assert_eq!(env["readiness"][svc]["ready"], true, "{svc}: {}", env["readiness"]);
            // The probes went to the published addresses, not through the gateway.
            assert_eq!(activity(&stack, id, svc, "connections_total"), 0, "{svc}: a probe passed the gateway");
            assert_eq!(activity(&stack, id, svc, "connections_active"), 0, "{svc}: a probe passed the gateway");
        }
        let ssh_port = port(&env, "ssh");
        let (lo, hi) = stack.ports.ssh();
        assert!((lo..=hi).contains(&ssh_port), "ssh port {ssh_port} outside the private pool");
        // No retry: the first login after the answer works.
        let password = Login::Password(text(&env, "/access_info/ssh/password").to_string());
        let hostname = ssh_run(ssh_port, &password, "hostname").unwrap_or_else(|e| panic!("{e}\n{}", stack.api_logs()));
        assert_eq!(hostname, id, "ssh with the password reached another host");
        let jport = port(&env, "jupyter");
        let token = text(&env, "/access_info/jupyter/token");
        let (status, body) = curl_until(&format!("http://127.0.0.1:{jport}/api/status?token={token}"), 200, Duration::ZERO);
        assert_eq!(status, 200, "the first JupyterLab request after wait: ready: {body}");
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

    phase("full SSH on a pool port and by name over TLS: scp, sftp, rsync, -L, -R, -D, agent; a forward from A cannot reach B", || {
        let token = text(&env, "/access_info/jupyter/token");
        let agent_key = keys.join("agent_ed25519");
        run_ok(std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&agent_key));
        let agent = Agent::start(&keys, &agent_key);
        for (via, remote_port) in [(Via::Port(ssh_port), 17001), (by_name(&stack, &env, &keys), 17002)] {
            let t = Instant::now();
            ssh::copies(&via, &key, &keys);
            ssh::forwards(&via, &key_login, token, remote_port);
            ssh::agent_forwarding(&via, &key_login, &agent, &keys.join("agent_ed25519.pub"));
            report(&format!("  via {}: copies, forwards and agent in {:.1} s", via.label(), t.elapsed().as_secs_f64()));
        }

        // Isolation: B's SSH server listens on B's address on the workspace network (B itself
        // sees its banner there), yet a -L through A to that address gets nothing, nor to B's
        // published port on the host's side of the network; through A, A's own address answers.
        let t = Instant::now();
        let b = stack.create(
            &json!({"name": "e2e-other", "gpus": 0, "services": ["ssh"], "ssh_public_keys": [pubkey.trim()], "wait": "ready"}),
        );
        let bid = text(&b, "/id").to_string();
        let inspect = |id: &str, format: &str| {
            let cid = stack.containers(Some(id)).pop().unwrap_or_else(|| panic!("no container for {id}"));
            run_ok(std::process::Command::new("docker").args(["inspect", "-f", format, &cid]))
        };
        let a_ip = inspect(&id, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}");
        let b_ip = inspect(&bid, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}");
        let bridge = inspect(&bid, "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}");
        let b_published = inspect(&bid, "{{(index (index .NetworkSettings.Ports \"22/tcp\") 0).HostPort}}");
        assert!(!a_ip.is_empty() && !b_ip.is_empty() && a_ip != b_ip, "addresses: A {a_ip:?}, B {b_ip:?}");
        let [own, to_b, to_b_host, b_self] = [0; 4].map(|_| ssh::free_port());
        let specs = |pairs: &[(u16, &str)]| -> Vec<String> {
            pairs.iter().flat_map(|(l, to)| ["-L".to_string(), format!("127.0.0.1:{l}:{to}")]).collect()
        };
        let b_forward = specs(&[(b_self, &format!("{b_ip}:22"))]);
        let mut through_b = Forwards::open(&Via::Port(port(&b, "ssh")), &key_login, &b_forward, &[b_self], Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{e}"));
        let seen = ssh::first_bytes(b_self, Duration::from_secs(3));
        assert!(seen.starts_with("SSH-2.0-"), "B's sshd does not answer at {b_ip}:22 from B itself: {seen:?}");
        assert!(through_b.alive());
        let a_forwards = specs(&[
            (own, &format!("{a_ip}:22")),
            (to_b, &format!("{b_ip}:22")),
            (to_b_host, &format!("{bridge}:{b_published}")),
        ]);
        let locals = [own, to_b, to_b_host];
        let mut through_a = Forwards::open(&Via::Port(ssh_port), &key_login, &a_forwards, &locals, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{e}"));
        let seen = ssh::first_bytes(own, Duration::from_secs(3));
        assert!(seen.starts_with("SSH-2.0-"), "A's -L to its own address {a_ip}:22: {seen:?}");
        let seen = ssh::first_bytes(to_b, Duration::from_secs(2));
        assert!(!seen.starts_with("SSH-"), "a -L through A reached B's sshd at {b_ip}:22: {seen:?}");
        let seen = ssh::first_bytes(to_b_host, Duration::from_secs(2));
        assert!(!seen.starts_with("SSH-"), "a -L through A reached B's published port {bridge}:{b_published}: {seen:?}");
        assert!(through_a.alive(), "the forwarding ssh through A exited");
        drop((through_a, through_b, agent));
        stack.delete(&bid);
        report(&format!("  isolation checks in {:.1} s", t.elapsed().as_secs_f64()));
    });

    phase("account keys: an added key logs in through the gateway within 5 s, the password stops; removed, refused", || {
        let account = keys.join("account_ed25519");
        run_ok(std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&account));
        let public = std::fs::read_to_string(keys.join("account_ed25519.pub")).expect("public key");
        let password = Login::Password(text(&env, "/access_info/ssh/password").to_string());
        let by_account = Login::Key(account.clone());
        assert!(ssh_run(ssh_port, &by_account, "true").is_err(), "a key nobody added logged in");
        let (status, v) = stack.call("POST", "/api/v1/users/me/ssh-keys", Some(&json!({"public_key": public.trim()}).to_string()));
        assert_eq!(status, 201, "{v}");
        let key_id = v["data"]["id"].as_i64().expect("key id");
        let t = Instant::now();
        ssh_run_retry(ssh_port, &by_account, "true", Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("the account key did not log in within 5 s: {e}\n{}", stack.api_logs()));
        report(&format!("  added → first login through the gateway in {} ms", t.elapsed().as_millis()));
        let off = Instant::now() + Duration::from_secs(5);
        while ssh_run(ssh_port, &password, "true").is_ok() {
            assert!(Instant::now() < off, "password login still works 5 s after the first account key (password_login auto)");
            std::thread::sleep(Duration::from_millis(200));
        }
        let (status, v) = stack.call("DELETE", &format!("/api/v1/users/me/ssh-keys/{key_id}"), None);
        assert_eq!(status, 200, "{v}");
        let gone = Instant::now() + Duration::from_secs(5);
        while ssh_run(ssh_port, &by_account, "true").is_ok() {
            assert!(Instant::now() < gone, "a removed account key still logs in after 5 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        ssh_run_retry(ssh_port, &password, "true", Duration::from_secs(5)).expect("password login back once the last account key went");
        ssh_run(ssh_port, &key_login, "true").expect("the key named at create stopped working");
    });

    phase("the gpugate client: login, ls, keys, ssh by name, config-ssh, port-forward, the lifecycle, its errors", || {
        gpugate_tests::client::commands_against(&stack, &env, &keys);
    });

    phase("JupyterLab and the code port through the gateway", || {
        let jport = port(&env, "jupyter");
        let token = text(&env, "/access_info/jupyter/token");
        // Ready since the create answered: no waiting here.
        let (status, body) = curl_until(&format!("http://127.0.0.1:{jport}/api/status?token={token}"), 200, Duration::ZERO);
        assert_eq!(status, 200, "JupyterLab /api/status through port {jport}: {body}");
        assert!(body.contains("started"), "JupyterLab status: {body}");
        let (status, _) = curl_until(&format!("http://127.0.0.1:{jport}/api/status"), 403, Duration::from_secs(5));
        assert_eq!(status, 403, "JupyterLab without the token");
        let cport = port(&env, "code");
        let (status, body) = curl_until(&format!("http://127.0.0.1:{cport}/health"), 200, Duration::ZERO);
        assert_eq!(status, 200, "code port {cport}: {body}");
    });

    phase("names on the TLS port: JupyterLab, a kernel over wss, the editor and OpenSSH by name", || {
        let tls = stack.ports.tls();
        let token = text(&env, "/access_info/jupyter/token");
        assert_eq!(env["access_info"]["jupyter"]["url"], format!("https://{id}.jupyter.{DOMAIN}:{tls}/").as_str());
        assert_eq!(
            env["access_info"]["jupyter"]["port_url"],
            format!("http://{id}.jupyter.{DOMAIN}:{}/", port(&env, "jupyter")).as_str(),
            "a pool port is plain HTTP"
        );
        let (status, body) = stack.https(&id, "jupyter", &format!("/api/status?token={token}"));
        assert_eq!(status, 200, "JupyterLab by name: {body}");
        assert!(body.contains("started"), "JupyterLab status by name: {body}");
        let (status, _) = stack.https(&id, "jupyter", "/api/status");
        assert_eq!(status, 403, "JupyterLab by name without the token");
        let (status, body) = stack.https(&id, "code", "/health");
        assert_eq!(status, 200, "the editor by name: {body}");
        // A kernel executes code over wss:// through the name.
        let host = format!("{id}.jupyter.{DOMAIN}");
        let out = run(std::process::Command::new("python3")
            .arg(repo_root().join("tests/tools/jupyter_kernel.py"))
            .args([host.as_str(), &tls.to_string(), token])
            .arg(stack.ca())
            .arg("print(6 * 7)"));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "kernel over wss by name: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // OpenSSH by name inside TLS, with the printed ~/.ssh/config block.
        let out = run(&mut by_name(&stack, &env, &keys).ssh(&key_login, &[], Some("hostname")));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            id,
            "ssh by name through TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Names the gateway does not route are refused (no HTTP answer at all).
        assert_eq!(stack.https("nobody0000000000", "jupyter", "/").0, 0, "an unknown id by name");
        assert_eq!(stack.https(&id, "rdp", "/").0, 0, "a service without a name route");
        assert!(activity_reaching(&stack, &id, "jupyter", "connections_total", 3) >= 3, "sessions by name are counted");

        // A real browser: headless Chromium resolves the name to 127.0.0.1 (as DNS would),
        // trusts the stack's development CA (an NSS database of its own, as a user who
        // imported it) and renders JupyterLab's launcher at the name URL.
        let home = keys.join("browser");
        let nssdb = home.join(".pki/nssdb");
        std::fs::create_dir_all(&nssdb).expect("browser profile");
        let db = format!("sql:{}", nssdb.display());
        run_ok(std::process::Command::new("certutil").args(["-d", &db, "-N", "--empty-password"]));
        run_ok(std::process::Command::new("certutil").args(["-d", &db, "-A", "-n", "gpugate-dev", "-t", "C,,", "-i"]).arg(stack.ca()));
        let url = format!("https://{id}.jupyter.{DOMAIN}:{tls}/lab?token={token}");
        let t = Instant::now();
        let out = run(std::process::Command::new("timeout")
            .args(["120", "chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000"])
            .arg(format!("--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1"))
            .arg("--dump-dom")
            .arg(&url)
            .env("HOME", &home));
        let dom = String::from_utf8_lossy(&out.stdout);
        assert!(
            dom.contains("jp-LauncherCard"),
            "Chromium did not render JupyterLab's launcher at {url} ({} bytes of DOM): {}",
            dom.len(),
            String::from_utf8_lossy(&out.stderr).lines().filter(|l| !l.contains("dbus")).take(5).collect::<Vec<_>>().join("\n")
        );
        // No first-run question about Jupyter news: the image turns the announcements off
        // (with them on, the rendered page carries "...notified about official Jupyter news?").
        assert!(!dom.contains("Jupyter news"), "JupyterLab asks every user about Jupyter news at {url}");
        report(&format!("  Chromium rendered the launcher by name in {:.1} s", t.elapsed().as_secs_f64()));
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
        // Creates come back once the API holds its liveness lock again (it notices the lost
        // connection within a few seconds): a client retrying on 503 gets its workspace.
        let t = Instant::now();
        let body = json!({"name": "after-db", "gpus": 0, "services": ["ssh"]}).to_string();
        let mut created = None;
        while created.is_none() && t.elapsed() < Duration::from_secs(30) {
            match stack.call("POST", "/api/v1/environments", Some(&body)) {
                (201, v) => created = Some(text(&v, "/data/id").to_string()),
                (503, _) => std::thread::sleep(Duration::from_millis(250)),
                (status, v) => panic!("create after the database came back: {status} {v}"),
            }
        }
        let created = created.unwrap_or_else(|| panic!("no create within 30 s of the database's return: {}", stack.api_logs()));
        report(&format!("  creates work again {:.1} s after /readyz", t.elapsed().as_secs_f64()));
        stack.delete(&created);
        assert!(stack.wait_ready(Duration::from_secs(30)), "/readyz after the first create");
        session.round_trip("database-back", Duration::from_secs(5)).expect("session after the database is back");
    });

    phase(&format!("{} workspaces created and deleted around an open session, no reload", churn()), || {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        let t = Instant::now();
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..CHURN_CLIENTS)
                .map(|_| {
                    s.spawn(|| {
                        let mut ok = 0;
                        while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < churn() {
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
            assert_eq!(made, churn());
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

    phase("live accounting: a slow scp's bytes grow in the API while it runs", || {
        let blob = keys.join("slow");
        let size = 2 * 1_048_576usize;
        let data: Vec<u8> = (0..size as u32).map(|i| (i.wrapping_mul(2_246_822_519) >> 24) as u8).collect();
        std::fs::write(&blob, &data).expect("write blob");
        let before = activity(&stack, &id, "ssh", "bytes_in");
        // 4000 Kbit/s: about 4 s for 2 MiB, so several flush intervals pass while it runs.
        let mut scp = ssh_command("scp", &key_login)
            .args(["-q", "-l", "4000", "-P", &ssh_port.to_string()])
            .arg(&blob)
            .arg("remotegpu@127.0.0.1:slow")
            .spawn()
            .expect("spawn scp");
        let mut seen = vec![];
        let mut active_seen = 0;
        while scp.try_wait().expect("scp status").is_none() {
            let v = show(&stack, &id);
            let a = &v["activity"]["ssh"];
            seen.push(a["bytes_in"].as_u64().unwrap_or(0));
            active_seen = active_seen.max(a["connections_active"].as_u64().unwrap_or(0));
            std::thread::sleep(Duration::from_millis(400));
        }
        assert!(scp.wait().expect("scp").success(), "slow scp failed");
        let moved = activity_reaching(&stack, &id, "ssh", "bytes_in", before + size as u64) - before;
        let growing: Vec<u64> = seen.iter().map(|b| b - before).filter(|d| *d > 0 && *d < size as u64).collect();
        report(&format!("  while open: {growing:?}; at the end {moved} bytes for a {size}-byte file"));
        // Counted while the session was open (not only at its end), and growing.
        assert!(growing.len() >= 2 && growing.windows(2).any(|w| w[1] > w[0]), "bytes did not grow while open: {seen:?}");
        assert!(active_seen >= 2, "the scp and the long session were not both seen open: {active_seen}");
        // The end total holds the file and SSH's own framing, nothing lost, nothing doubled.
        assert!(moved >= size as u64 && moved < size as u64 + size as u64 / 10 + 65_536, "{moved} bytes for {size}");
        assert_eq!(ssh_run(ssh_port, &key_login, "wc -c < slow").as_deref(), Ok("2097152"));
    });

    phase("sessions/close: SSH and a Jupyter websocket cut within 2 s, new logins work", || {
        let jport = port(&env, "jupyter");
        let token = text(&env, "/access_info/jupyter/token");
        let mut ws = WebSocket::open(jport, &format!("/api/events/subscribe?token={token}")).expect("Jupyter websocket");
        let mut second = Session::open(ssh_port, &key_login, Duration::from_secs(10)).expect("second SSH session");
        assert!(!ws.closed_within(Duration::from_millis(300)), "the websocket closed by itself");
        let (status, v) = stack.call("POST", &format!("/api/v1/environments/{id}/sessions/close"), Some("{}"));
        assert_eq!(status, 200, "sessions/close: {v}");
        assert_eq!(v["data"]["applied"], true, "{v}");
        let t = Instant::now();
        assert!(session.closed_within(Duration::from_secs(2)), "the long SSH session is still open");
        assert!(second.closed_within(Duration::from_secs(2)), "the second SSH session is still open");
        assert!(ws.closed_within(Duration::from_secs(2)), "the Jupyter websocket is still open");
        report(&format!("  every session closed {} ms after sessions/close returned", t.elapsed().as_millis()));
        assert_eq!(ssh_run(ssh_port, &key_login, "hostname").as_deref(), Ok(id.as_str()), "new login after the close");
        let (status, _) = curl_until(&format!("http://127.0.0.1:{jport}/api/status?token={token}"), 200, Duration::from_secs(5));
        assert_eq!(status, 200, "JupyterLab after the close");
        assert!(activity_reaching(&stack, &id, "ssh", "connections_revoked", 2) >= 2, "revoked sessions not counted: {}", show(&stack, &id));
    });

    phase("idle: an open session keeps a workspace; once it ends, the workspace stops by itself; its host identity holds", || {
        let nap = stack.create(&json!({"name": "nap", "gpus": 0, "services": ["ssh"], "ssh_public_keys": [pubkey.trim()], "wait": "ready"}));
        let nid = text(&nap, "/id").to_string();
        let nport = port(&nap, "ssh");
        // A strict client (StrictHostKeyChecking=yes, no prompt) whose known_hosts holds only
        // the deployment's CA line logs in by pool port under the workspace's real name and by
        // name over TLS, from the first login; the key it meets is the one the API shows.
        let ca_only = keys.join("known_hosts_ca");
        std::fs::write(&ca_only, format!("{}\n", text(&nap, "/access_info/ssh/cert_authority"))).expect("known_hosts");
        let user_at = format!("remotegpu@{nid}.ssh.{DOMAIN}");
        let Via::Name { config, host } = by_name(&stack, &nap, &keys) else { unreachable!("by_name gives a name") };
        let strict_logins = |when: &str| {
            let h = host_identity::by_port(nport, &user_at, &key, &ca_only, "hostname")
                .unwrap_or_else(|e| panic!("strict login by pool port {when}: {e}"));
            assert_eq!(h, nid, "{when}");
            let h = host_identity::by_name(&config, &host, &key, &ca_only, "hostname")
                .unwrap_or_else(|e| panic!("strict login by name {when}: {e}"));
            assert_eq!(h, nid, "{when}");
        };
        strict_logins("after the create");
        let key_at_create = host_identity::scanned_key(nport);
        assert_eq!(key_at_create, text(&nap, "/access_info/ssh/host_key"), "the key served is not the one the API shows");
        // The workspace's own known_hosts lines serve clients without certificate support.
        let own = keys.join("known_hosts_own");
        std::fs::write(&own, text(&nap, "/access_info/ssh/known_hosts")).expect("known_hosts");
        host_identity::by_port(nport, &user_at, &key, &own, "true").unwrap_or_else(|e| panic!("its own known_hosts lines: {e}"));
        // A client trusting another CA only is refused: the CA line is what vouches.
        let foreign = keys.join("known_hosts_foreign");
        std::fs::write(&foreign, format!("{}\n", host_identity::foreign_ca_line(&keys, DOMAIN))).expect("known_hosts");
        let refused = host_identity::by_port(nport, &user_at, &key, &foreign, "true").expect_err("a foreign CA vouched for the workspace");
        assert!(refused.contains("Host key verification failed"), "{refused}");
        let mut held = Session::open(nport, &key_login, Duration::from_secs(20)).expect("session on the idle workspace");
        let (status, v) =
            stack.call("PATCH", &format!("/api/v1/environments/{nid}"), Some(r#"{"idle_stop_after_s": 2}"#));
        assert_eq!(status, 200, "PATCH: {v}");
        // Policy no_connections (the default): a silent open session is activity.
        std::thread::sleep(Duration::from_secs(5));
        let v = show(&stack, &nid);
        assert_eq!(v["status"], "running", "stopped with a session open: {v}");
        assert_eq!(v["idle_seconds"], 0, "{v}");
        held.round_trip("still-here", Duration::from_secs(5)).expect("the session survived");
        drop(held);
        let t = Instant::now();
        let stopped = gpugate_tests::wait_until(Duration::from_secs(20), || {
            std::thread::sleep(Duration::from_millis(250));
            let v = show(&stack, &nid);
            v["status"] == "stopped" && v["status_reason"].is_string()
        });
        assert!(stopped, "the idle workspace did not stop: {}\n{}", show(&stack, &nid), stack.api_logs());
        report(&format!("  stopped {:.1} s after its last session ended", t.elapsed().as_secs_f64()));
        assert!(text(&show(&stack, &nid), "/status_reason").starts_with("idle for "));
        assert!(port_refuses(nport), "the stopped workspace's port still answers");
        assert_eq!(stack.metric("gpugate_idle_stops_total"), Some(1.0));
        // Started again: same port, logins work, the idle clock starts over.
        let (status, v) = stack.call("PATCH", &format!("/api/v1/environments/{nid}"), Some(r#"{"idle_stop_after_s": 0}"#));
        assert_eq!(status, 200, "{v}");
        let (status, v) = stack.call("POST", &format!("/api/v1/environments/{nid}/start?wait=ready"), Some("{}"));
        assert_eq!(status, 200, "start: {v}");
        assert_eq!(port(&v["data"], "ssh"), nport);
        assert_eq!(v["data"]["readiness"]["ssh"]["ready"], true, "{v}");
        let h = ssh_run(nport, &key_login, "hostname").expect("the first ssh after start?wait=ready");
        assert_eq!(h, nid);
        // A new container, the same identity: no warning for the strict client.
        strict_logins("after an idle stop and a start");
        assert_eq!(host_identity::scanned_key(nport), key_at_create, "the host key changed across a stop and start");

        // A stop cuts open sessions from the gateway before the container stops.
        let mut open = Session::open(nport, &key_login, Duration::from_secs(10)).expect("session before the stop");
        closed_by_the_gateway(&stack, &mut open, nport, || {
            let (status, v) = stack.call("POST", &format!("/api/v1/environments/{nid}/stop"), Some("{}"));
            assert_eq!(status, 200, "stop: {v}");
        });
        stack.delete(&nid);
    });

    phase("deployment defaults with TLS: Jupyter and the editor by name only, no pool port", || {
        let v = stack.create(&json!({"name": "e2e-names", "gpus": 0, "wait": "ready"}));
        let nid = text(&v, "/id").to_string();
        assert_eq!(v["access"], json!({"ssh": "both", "jupyter": "hostname", "code": "hostname"}), "{v}");
        assert!(v["ports"].get("jupyter").is_none() && v["ports"].get("code").is_none(), "{v}");
        let token = text(&v, "/access_info/jupyter/token");
        let (status, body) = stack.https(&nid, "jupyter", &format!("/api/status?token={token}"));
        assert_eq!(status, 200, "JupyterLab by name only: {body}");
        // Stop: the name is refused; start: it answers again.
        let (status, r) = stack.call("POST", &format!("/api/v1/environments/{nid}/stop"), Some("{}"));
        assert_eq!(status, 200, "stop: {r}");
        assert_eq!(stack.https(&nid, "jupyter", "/api/status").0, 0, "a stopped workspace's name answers");
        let (status, r) = stack.call("POST", &format!("/api/v1/environments/{nid}/start?wait=ready"), Some("{}"));
        assert_eq!(status, 200, "start: {r}");
        let (status, body) = stack.https(&nid, "jupyter", &format!("/api/status?token={token}"));
        assert_eq!(status, 200, "JupyterLab by name after a start: {body}");
        stack.delete(&nid);
    });

    phase("delete the workspace; its port refuses within a second, the container is gone", || {
        let mut open = Session::open(ssh_port, &key_login, Duration::from_secs(10)).expect("session before the delete");
        closed_by_the_gateway(&stack, &mut open, ssh_port, || stack.delete(&id));
        let t = Instant::now();
        let refused = gpugate_tests::wait_until(Duration::from_secs(1), || port_refuses(ssh_port));
        assert!(refused, "port {ssh_port} still answers 1 s after the delete");
        report(&format!("  refused {} ms after the delete returned", t.elapsed().as_millis()));
        assert!(ssh_run(ssh_port, &key_login, "true").is_err(), "ssh still logs in after the delete");
        let token = text(&env, "/access_info/jupyter/token");
        assert_eq!(stack.https(&id, "jupyter", &format!("/api/status?token={token}")).0, 0, "the name still answers after the delete");
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
