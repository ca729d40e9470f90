//! Sessions true across a fleet of gateways: our nginx on 127.0.0.3 (gateway B) with its own
//! table and `gpugate-api publish`, beside the API's own gateway A. A session through B keeps
//! its workspace awake although A saw nothing; a silent gateway makes the idle task wait.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, Ctx, ISO_IMAGE};
use gpugate_routes::{Lookup, Table};
use serde_json::{json, Value};

/// An OpenSSH session as root to `addr:port` that stays open (remote `sleep`) until killed.
fn ssh_session(addr: &str, port: u16, key: &Path) -> Child {
    Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args([
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-p", &port.to_string(), &format!("root@{addr}"),
            "echo open; sleep 600",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ssh client")
}

/// Opens an SSH session through `addr:port`, retrying while sshd in a fresh container starts;
/// returns it once the remote side said it is open.
fn open_session(addr: &str, port: u16, key: &Path) -> Child {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut child = ssh_session(addr, port, key);
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        let read = std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(out);
            let _ = std::io::BufRead::read_line(&mut r, &mut line);
            (line, r)
        });
        let (line, _keep) = read.join().expect("reader");
        if line.trim() == "open" {
            // The rest of stdout is never read; the remote side prints nothing more.
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(Instant::now() < deadline, "no SSH session through {addr}:{port}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

async fn env_view(ctx: &Ctx, token: &str, id: &str) -> Value {
    let (s, v) = ctx.get(&format!("/api/v1/environments/{id}"), token).await;
    assert_eq!(s, 200, "{v}");
    v["data"].clone()
}

/// Waits until every named gateway is registered and fresh; panics after 20 s.
async fn wait_gateways(ctx: &Ctx, admin: &str, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = ctx.get("/api/v1/admin/gateways", admin).await;
        let fresh: Vec<&str> = v["data"]["gateways"]
            .as_array()
            .map(|a| a.iter().filter(|g| g["stale"] == false).filter_map(|g| g["name"].as_str()).collect())
            .unwrap_or_default();
        if names.iter().all(|n| fresh.contains(n)) {
            return;
        }
        assert!(Instant::now() < deadline, "gateways {names:?} never all fresh: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two gateways' worth of test world: the API publishing gateway A's table, a publisher for
/// gateway B's table, and gateway B's nginx on 127.0.0.3.
struct Fleet {
    ctx: Ctx,
    admin: String,
    alice: String,
    key: PathBuf,
    public: String,
    table_b: PathBuf,
    root_b: PathBuf,
    publisher_b: usize,
    nginx_b: gpugate_tests::Nginx,
}

async fn fleet(name: &str, lo: u16, hi: u16, tune: impl FnOnce(&mut Ctx)) -> Fleet {
    fleet_at(name, lo, hi, gpugate_tests::temp_dir(&format!("{name}-gw-b")), tune).await
}

/// [`fleet`] with gateway B's files under `root_b` (a table may be there already).
async fn fleet_at(name: &str, lo: u16, hi: u16, root_b: PathBuf, tune: impl FnOnce(&mut Ctx)) -> Fleet {
    common::ensure_iso_image();
    let mut ctx = Ctx::new(name).await;
    ctx.cfg.docker.default_image = ISO_IMAGE.into();
    ctx.cfg.docker.allowed_images = vec![ISO_IMAGE.into()];
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.gateway_name = "gw-a".into();
    ctx.cfg.pools.get_mut("ssh").expect("ssh pool").range = format!("{lo}-{hi}").parse().expect("range");
    tune(&mut ctx);
    let table_b = gpugate_tests::table_dir(&root_b).join("routes");
    let (key, public) = common::keypair(&ctx);
    let admin = ctx.token("root", true).await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let publisher_b = start_publisher_b(&mut ctx, &table_b);
    wait_gateways(&ctx, &admin, &["gw-a", "gw-b"]).await;
    let nginx_b = common::gateway(&root_b, "127.0.0.3", &table_b, lo, hi);
    Fleet { ctx, admin, alice, key, public, table_b, root_b, publisher_b, nginx_b }
}

fn start_publisher_b(ctx: &mut Ctx, table_b: &Path) -> usize {
    let table = table_b.display().to_string();
    ctx.spawn(&["publish"], &[("GPUGATE_ROUTE_TABLE", &table), ("GPUGATE_GATEWAY_NAME", "gw-b")]).0
}

/// Creates a workspace with `body` (plus alice's key); returns its id and SSH port once
/// gateway B's table routes it.
async fn create(f: &Fleet, body: Value) -> (String, u16) {
    let mut body = body;
    body["ssh_public_keys"] = json!([f.public.clone()]);
    let (s, v) = f.ctx.post("/api/v1/environments", &f.alice, body).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let port = v["data"]["ports"]["ssh"].as_u64().expect("port") as u16;
    let routed = eventually(Duration::from_secs(10), || {
        Table::open_read_only(&f.table_b).is_ok_and(|t| {
            matches!(t.lookup(port, gpugate_routes::now_ms()), Lookup::Live(r) if r.env_id.as_str() == id)
        })
    })
    .await;
    assert!(routed, "gateway B never routed {id}");
    (id, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_through_another_gateway_keeps_its_workspace_awake_until_it_ends() {
    let (lo, hi) = (24310u16, 24319u16);
    let mut f = fleet("fleet_idle", lo, hi, |ctx| ctx.cfg.idle.check_interval_s = 1).await;
    let (id, port) = create(&f, json!({"name": "busy-via-b", "idle_stop_after_s": 5})).await;

    // A session through gateway B only: gateway A (the API's own table) sees nothing.
    let mut session = open_session("127.0.0.3", port, &f.key);
    let table_a = Table::open_read_only(&f.ctx.table).expect("table A");
    // Three idle limits with the session open: still running.
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        let v = env_view(&f.ctx, &f.alice, &id).await;
        assert_eq!(v["status"], "running", "stopped while a session through gateway B was open: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(table_a.counters(port).connections_active, 0, "the session must not pass gateway A");
    // The API shows the session B reported, and an idle clock that has not run.
    let v = env_view(&f.ctx, &f.alice, &id).await;
    assert_eq!(v["activity"]["ssh"]["connections_active"], 1, "{v}");
    assert!(v["activity"]["ssh"]["bytes_out"].as_u64().is_some_and(|b| b > 0), "{v}");
    assert_eq!(v["idle_seconds"], 0, "{v}");

    // Gateway B's publisher dies (its nginx keeps routing) and the session ends: B's report
    // goes stale, so nobody knows whether the workspace is used there, and the idle task waits.
    f.ctx.kill(f.publisher_b);
    let _ = session.kill();
    let _ = session.wait();
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        let v = env_view(&f.ctx, &f.alice, &id).await;
        assert_eq!(v["status"], "running", "stopped while gateway B's activity was unknown: {v}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    f.ctx.metrics_with(&f.ctx.base, &["gpugate_idle_check_waits_total{reason=\"gateway_stale\"}"]).await;

    // B back: it reports the session closed, and the idle workspace stops.
    f.publisher_b = start_publisher_b(&mut f.ctx, &f.table_b);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = env_view(&f.ctx, &f.alice, &id).await;
        if v["status"] == "stopped" && v["status_reason"].is_string() {
            let reason = v["status_reason"].as_str().unwrap_or_default();
            assert!(reason.starts_with("idle for "), "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "the idle workspace never stopped: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f.nginx_b.assert_no_crash();
    finish(f).await;
}

async fn finish(mut f: Fleet) {
    f.nginx_b.stop();
    f.ctx.kill(f.publisher_b);
    f.ctx.finish().await;
    let _ = std::fs::remove_dir_all(&f.root_b);
}

/// Whether `child` exited within `timeout`.
fn exits_within(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_close_lands_on_a_gateway_whose_epochs_are_ahead() {
    let (lo, hi) = (24320u16, 24329u16);
    // Gateway B's table has a history gateway A's has not: three earlier revokes on every
    // port of the pool (as a gateway that lived through removals A never saw, or whose
    // table is older than A's), made before B's publisher takes the table.
    let root_b = gpugate_tests::temp_dir("fleet_close-gw-b-pre");
    let table_b_pre = gpugate_tests::table_dir(&root_b).join("routes");
    {
        let mut w = gpugate_routes::Writer::open(&table_b_pre, gpugate_routes::LockMode::NoWait).expect("writer B");
        for port in lo..=hi {
            for _ in 0..3 {
                w.revoke(port).expect("revoke");
            }
        }
    }
    let mut f = fleet_at("fleet_close", lo, hi, root_b, |_| {}).await;
    let (id, port) = create(&f, json!({"name": "close-via-b"})).await;
    let table_a = Table::open_read_only(&f.ctx.table).expect("table A");
    let table_b = Table::open_read_only(&f.table_b).expect("table B");
    let (a0, b0) = (table_a.revoke_epoch(port), table_b.revoke_epoch(port));
    assert!(b0 > a0 + 1, "B's epoch {b0} must be ahead of A's {a0}");

    let mut session = open_session("127.0.0.3", port, &f.key);
    let (s, v) = f.ctx.post(&format!("/api/v1/environments/{id}/sessions/close"), &f.alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    // nginx closes the session within its flush interval (1 s).
    assert!(exits_within(&mut session, Duration::from_secs(10)), "the session through gateway B is still open: {v}");
    assert_eq!(v["data"]["gateways"], json!({"applied": 2, "registered": 2}), "{v}");
    assert_eq!(v["data"]["applied"], true, "{v}");
    // Each table raised its own epoch by one, once.
    assert_eq!((table_a.revoke_epoch(port), table_b.revoke_epoch(port)), (a0 + 1, b0 + 1));
    // The route stays: a new session through B works, and a re-sync applies nothing again.
    let mut again = open_session("127.0.0.3", port, &f.key);
    let (s, _) = f.ctx.post("/api/v1/admin/reconcile", &f.admin, json!({})).await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!((table_a.revoke_epoch(port), table_b.revoke_epoch(port)), (a0 + 1, b0 + 1), "a request applied twice");
    assert!(again.try_wait().expect("wait").is_none(), "a later session was closed by the earlier request");

    // B's publisher is down when the next close comes (its nginx keeps the session): when B
    // comes back it applies the request it missed, once, and the session closes.
    f.ctx.kill(f.publisher_b);
    let (s, v) = f.ctx.post(&format!("/api/v1/environments/{id}/sessions/close"), &f.alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert!(again.try_wait().expect("wait").is_none(), "B applied a close without its publisher");
    f.publisher_b = start_publisher_b(&mut f.ctx, &f.table_b);
    assert!(exits_within(&mut again, Duration::from_secs(20)), "gateway B never applied the close it missed");
    assert_eq!(table_b.revoke_epoch(port), b0 + 2);
    let _ = session.wait();
    f.nginx_b.assert_no_crash();
    finish(f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_before_a_gateway_rebuilt_its_table_is_closed_by_a_later_close() {
    let (lo, hi) = (24330u16, 24339u16);
    let f = fleet("fleet_remap", lo, hi, |_| {}).await;
    let (id, port) = create(&f, json!({"name": "remap-via-b"})).await;
    let mut session = open_session("127.0.0.3", port, &f.key);

    // Gateway B's table files are removed under its publisher (an operator's clean-up, a
    // tmpfs emptied): the publisher lets go and builds a new table from the database, whose
    // revoke epochs start over, and B's nginx maps it without a reload.
    let old = Table::open_read_only(&f.table_b).expect("table B").file_id();
    std::fs::remove_file(&f.table_b).expect("remove routes");
    std::fs::remove_file(gpugate_routes::counters_path(&f.table_b)).expect("remove counters");
    let rebuilt = eventually(Duration::from_secs(20), || {
        Table::open_read_only(&f.table_b).is_ok_and(|t| {
            t.file_id() != old && matches!(t.lookup(port, gpugate_routes::now_ms()), Lookup::Live(r) if r.env_id.as_str() == id)
        })
    })
    .await;
    assert!(rebuilt, "gateway B's publisher never rebuilt its table");
    // nginx re-checks its mapping every second: past that, the old session is still open
    // (the re-map itself closes nothing) and a new one works through the new table.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(session.try_wait().expect("wait").is_none(), "the re-map closed the session");
    let mut fresh = open_session("127.0.0.3", port, &f.key);

    // A close now reaches both: the session from before the re-map and the one after it.
    let (s, v) = f.ctx.post(&format!("/api/v1/environments/{id}/sessions/close"), &f.alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["applied"], true, "{v}");
    assert!(exits_within(&mut fresh, Duration::from_secs(10)), "the session after the re-map is still open");
    assert!(exits_within(&mut session, Duration::from_secs(10)), "the session from before the re-map is still open");
    f.nginx_b.assert_no_crash();
    finish(f).await;
}
