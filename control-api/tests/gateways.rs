//! The gateway registry with real publishers: two `gpugate-api publish` processes, each the
//! writer of its own table, report the generation their tables hold; a killed one keeps its
//! table routing while the registry shows it stale and lagging, and catches up when it comes
//! back. Also: the admin view is for admins, a bad gateway name stops the start, and a
//! publisher's `/readyz` tells the writer from a standby.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, Ctx};
use gpugate_api::db::{envs, gateways};
use gpugate_routes::{Lookup, Table};
use serde_json::{json, Value};

/// Heartbeat of every registry row in these tests (ms): stale after 600 ms.
const BEAT_MS: &str = "200";

/// Whether the table at `path` routes `port` to `env` now.
fn live_in(path: &Path, port: u16, env: &str) -> bool {
    let Ok(t) = Table::open_read_only(path) else { return false };
    matches!(t.lookup(port, gpugate_routes::now_ms()), Lookup::Live(r) if r.env_id.as_str() == env)
}

/// Whether the table at `path` has no route on `port`.
fn absent_in(path: &Path, port: u16) -> bool {
    Table::open_read_only(path).is_ok_and(|t| t.lookup(port, gpugate_routes::now_ms()) == Lookup::Absent)
}

/// Spawns a publisher named `name` writing `table`; returns its index and base URL.
fn publisher(ctx: &mut Ctx, name: &str, table: &Path) -> (usize, String) {
    let table = table.display().to_string();
    ctx.spawn(
        &["publish"],
        &[("GPUGATE_ROUTE_TABLE", &table), ("GPUGATE_GATEWAY_NAME", name), ("GPUGATE_GATEWAY_HEARTBEAT_MS", BEAT_MS)],
    )
}

/// `GET <base>/readyz`: (status, body).
async fn readyz(ctx: &Ctx, base: &str) -> (u16, Value) {
    match ctx.http.get(format!("{base}/readyz")).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// Waits until `<base>/readyz` answers `want`; panics with the last answer after 30 s.
async fn wait_readyz(ctx: &Ctx, base: &str, want: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = readyz(ctx, base).await;
        if s == want {
            return v;
        }
        assert!(Instant::now() < deadline, "{base}/readyz: {s} {v}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The admin view's row of gateway `name` once `ok` holds for it; panics after 15 s.
async fn gateway_when(ctx: &Ctx, admin: &str, name: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (s, v) = ctx.get("/api/v1/admin/gateways", admin).await;
        assert_eq!(s, 200, "{v}");
        let row = v["data"]["gateways"].as_array().and_then(|gs| gs.iter().find(|g| g["name"] == name)).cloned();
        if let Some(row) = row.filter(|r| ok(r)) {
            return row;
        }
        assert!(Instant::now() < deadline, "gateway {name} never {what}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn generation_of(ctx: &Ctx, id: &str) -> i64 {
    sqlx::query_scalar("SELECT route_generation FROM environments WHERE id = $1")
        .bind(id)
        .fetch_one(ctx.db().pool())
        .await
        .expect("route_generation")
}

/// Creates a workspace; returns its id, ssh port and route generation.
async fn create(ctx: &Ctx, token: &str, name: &str) -> (String, u16, i64) {
    let (s, v) = ctx.post("/api/v1/environments", token, json!({ "name": name, "image": common::IMAGE })).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["routes_live"], true, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let port = v["data"]["ports"]["ssh"].as_u64().expect("ssh port") as u16;
    let generation = generation_of(ctx, &id).await;
    (id, port, generation)
}

/// The names in the registry.
async fn registered(ctx: &Ctx) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM gateways ORDER BY name").fetch_all(ctx.db().pool()).await.expect("gateways")
}

fn caught_up(generation: i64) -> impl Fn(&Value) -> bool {
    move |g: &Value| {
        g["applied_generation"].as_i64().is_some_and(|a| a >= generation) && g["lag_generations"] == 0 && g["stale"] == false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_gateway_reports_its_generation_and_a_dead_one_keeps_routing_until_it_catches_up() {
    let mut ctx = Ctx::new("gateways").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    // The API's own publisher (on ctx.table) is a gateway too.
    ctx.cfg.gateway_name = "gw-api".into();
    ctx.cfg.gateway_heartbeat_ms = 200;
    let admin = ctx.token("root", true).await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let table_a: PathBuf = ctx.dir.join("gw-a").join("routes");
    let table_b: PathBuf = ctx.dir.join("gw-b").join("routes");
    let (_, base_a) = publisher(&mut ctx, "gw-a", &table_a);
    let (b, base_b) = publisher(&mut ctx, "gw-b", &table_b);
    wait_readyz(&ctx, &base_a, 200).await;
    wait_readyz(&ctx, &base_b, 200).await;

    // One workspace: both gateways route it and say so, with no lag.
    let (id1, port1, gen1) = create(&ctx, &alice, "one").await;
    for table in [&table_a, &table_b] {
        assert!(eventually(Duration::from_secs(5), || live_in(table, port1, &id1)).await, "{} lacks the route", table.display());
    }
    for name in ["gw-a", "gw-b", "gw-api"] {
        let row = gateway_when(&ctx, &admin, name, "caught up", caught_up(gen1)).await;
        assert!(row["heartbeat_age_s"].as_f64().is_some_and(|a| a < 1.0), "{row}");
    }
    ctx.metrics_with(
        &ctx.base,
        &[
            &format!("gpugate_gateway_applied_generation{{gateway=\"gw-b\"}} {gen1}"),
            "gpugate_gateway_lag_generations{gateway=\"gw-b\"} 0",
            "gpugate_gateway_heartbeat_age_seconds{gateway=\"gw-b\"}",
        ],
    )
    .await;

    // gw-b dies. The workspace goes and another comes: gw-a follows, gw-b's table still holds
    // what it had (its nginx keeps routing without a publisher), and the registry shows it
    // stale and behind.
    ctx.kill(b);
    let (s, v) = ctx.delete(&format!("/api/v1/environments/{id1}"), &alice).await;
    assert_eq!(s, 200, "{v}");
    let (id2, port2, gen2) = create(&ctx, &alice, "two").await;
    assert_ne!(port1, port2, "the old port is in quarantine");
    assert!(gen2 > gen1);
    assert!(eventually(Duration::from_secs(5), || live_in(&table_a, port2, &id2) && absent_in(&table_a, port1)).await);
    gateway_when(&ctx, &admin, "gw-a", "caught up", caught_up(gen2)).await;
    let row = gateway_when(&ctx, &admin, "gw-b", "stale", |g| g["stale"] == true).await;
    assert_eq!(row["applied_generation"], gen1, "{row}");
    assert!(row["lag_generations"].as_i64().is_some_and(|l| l >= gen2 - gen1), "{row}");
    assert!(row["heartbeat_age_s"].as_f64().is_some_and(|a| a >= 0.6), "{row}");
    assert!(live_in(&table_b, port1, &id1), "a dead publisher's table must keep routing");
    assert!(absent_in(&table_b, port2));
    // What a create will ask: gw-a and the API's gateway route generation 2, gw-b does not.
    assert_eq!(gateways::count_applied(ctx.db(), gen2).await.expect("count"), 2);
    assert_eq!(gateways::count_applied(ctx.db(), gen1).await.expect("count"), 2, "a stale gateway never counts");
    let (_, v) = ctx.get("/api/v1/admin/gateways", &admin).await;
    assert!(v["data"]["current_generation"].as_i64() >= Some(gen2), "{v}");

    // gw-b comes back on the same table: it re-syncs (the old route goes, the new one is
    // live) and its row catches up under a new writer.
    let old_pid = row["pid"].clone();
    let (_, base_b) = publisher(&mut ctx, "gw-b", &table_b);
    wait_readyz(&ctx, &base_b, 200).await;
    assert!(eventually(Duration::from_secs(5), || live_in(&table_b, port2, &id2) && absent_in(&table_b, port1)).await);
    let row = gateway_when(&ctx, &admin, "gw-b", "caught up", caught_up(gen2)).await;
    assert_ne!(row["pid"], old_pid, "{row}");
    assert_eq!(gateways::count_applied(ctx.db(), gen2).await.expect("count"), 3);
    assert_eq!(gateways::count_applied(ctx.db(), gen2 + 1).await.expect("count"), 0);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_list_is_for_admins_only() {
    let mut ctx = Ctx::new("gateways_admin").await;
    ctx.cfg.gateway_name = "gw-api".into();
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;
    let (s, v) = ctx.get("/api/v1/admin/gateways", &alice).await;
    assert_eq!((s, v["code"].as_u64()), (403, Some(1004)), "{v}");
    assert!(v["data"].is_null(), "{v}");
    let (s, v) = ctx.get("/api/v1/admin/gateways", "ggt_not-a-token").await;
    assert_eq!(s, 401, "{v}");
    gateway_when(&ctx, &admin, "gw-api", "registered", |g| g["stale"] == false).await;
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_gateway_name_stops_the_start_naming_the_setting() {
    let ctx = Ctx::new("gateways_badname").await;
    for bad in ["gw a", "gw/../a", &"g".repeat(64)] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gpugate-api"))
            .arg("publish")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &ctx.db_url)
            .env("GPUGATE_ROUTE_TABLE", ctx.dir.join("bad").join("routes"))
            .env("GPUGATE_LISTEN", format!("127.0.0.1:{}", common::free_port()))
            .env("GPUGATE_GATEWAY_NAME", bad)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gpugate-api");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gpugate-api publish started with GPUGATE_GATEWAY_NAME={bad:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read stderr");
        assert!(!status.success(), "{bad:?}: {stderr}");
        assert!(stderr.contains("GPUGATE_GATEWAY_NAME"), "{bad:?}: the refusal does not name the setting: {stderr}");
    }
    assert!(!ctx.dir.join("bad").exists(), "a refused start must not create its table");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publishers_readyz_tells_the_writer_from_a_standby_and_only_the_writer_registers() {
    let mut ctx = Ctx::new("gateways_ready").await;
    ctx.connect().await;
    let table = ctx.table.clone();
    let (x, base_x) = publisher(&mut ctx, "gw-x", &table);
    let v = wait_readyz(&ctx, &base_x, 200).await;
    assert_eq!(v["data"]["gateway"], "gw-x", "{v}");
    assert_eq!(v["data"]["active"], true, "{v}");
    // A second publisher on the same table stands by: not ready, saying why, and unregistered.
    let (_, base_y) = publisher(&mut ctx, "gw-y", &table);
    ctx.wait_healthy(&base_y).await;
    let (s, v) = readyz(&ctx, &base_y).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["code"], 1010, "{v}");
    assert_eq!(v["data"]["active"], false, "{v}");
    assert_eq!(v["data"]["reasons"]["publisher"], "not the writer", "{v}");
    assert!(v["message"].as_str().is_some_and(|m| m.contains("publisher not the writer")), "{v}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(registered(&ctx).await, ["gw-x"], "a standby must not register");
    let metrics = ctx.http.get(format!("{base_x}/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("gpugate_publisher_active 1"), "{metrics}");

    // The writer dies: the standby takes the table, becomes ready and registers.
    ctx.kill(x);
    let v = wait_readyz(&ctx, &base_y, 200).await;
    assert_eq!(v["data"]["gateway"], "gw-y", "{v}");
    assert!(v["data"]["heartbeat_age_s"].as_f64().is_some_and(|a| a < 3.0), "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while registered(&ctx).await != ["gw-x", "gw-y"] {
        assert!(Instant::now() < deadline, "the new writer did not register: {:?}", registered(&ctx).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrier_waits_for_every_transaction_holding_a_generation() {
    let mut ctx = Ctx::new("gateways_barrier").await;
    ctx.connect().await;
    let db = ctx.db().clone();
    let mut listener = sqlx::postgres::PgListener::connect_with(db.pool()).await.expect("listener");
    listener.listen(gateways::BARRIER_CHANNEL).await.expect("listen");

    // Nothing holds a generation: the barrier passes and notifies its watermark.
    let before = gateways::barrier(&db, "t/1").await.expect("barrier");
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.expect("notified").expect("recv");
    assert_eq!(n.payload(), format!("t/1:{before}"));

    // A transaction that took a generation (here for no environment: the lock comes before
    // the sequence) and has not ended: a barrier cannot tell what it will commit, so it must
    // wait for it rather than report a watermark.
    let mut tx = db.begin().await.expect("begin");
    assert!(envs::next_generation(&mut tx, "zzzzzzzzzzzzzzzz").await.is_err(), "no such environment");
    let t0 = Instant::now();
    assert!(gateways::barrier(&db, "t/2").await.is_err(), "a barrier passed an open generation");
    assert!(t0.elapsed() < Duration::from_secs(2), "a barrier waited {:?}", t0.elapsed());
    tx.rollback().await.expect("rollback");
    let after = gateways::barrier(&db, "t/3").await.expect("barrier");
    assert!(after >= before);
    let n = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.expect("notified").expect("recv");
    assert_eq!(n.payload(), format!("t/3:{after}"), "a barrier that failed must not notify");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_gone_for_good_is_removed_by_an_admin_and_the_idle_task_stops_waiting() {
    let mut ctx = Ctx::new("gateways_remove").await;
    ctx.cfg.gateway_name = "gw-api".into();
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.idle.check_interval_s = 1;
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;
    let root = gpugate_tests::temp_dir("gateways_remove-gone");
    let (gone, _) = publisher(&mut ctx, "gw-gone", &gpugate_tests::table_dir(&root).join("routes"));
    gateway_when(&ctx, &admin, "gw-gone", "registered", |g| g["stale"] == false).await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "nap", "image": common::IMAGE, "idle_stop_after_s": 2})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();

    // Alive: refused, and only admins may ask; an unknown name is a 404.
    let path = "/api/v1/admin/gateways/gw-gone";
    let (s, v) = ctx.delete(path, &admin).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1006)), "{v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("is alive"), "{v}");
    let (s, v) = ctx.delete(path, &alice).await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = ctx.delete("/api/v1/admin/gateways/gw-never", &admin).await;
    assert_eq!((s, v["code"].as_u64()), (404, Some(1005)), "{v}");

    // Its host is gone: the row goes stale and the idle task waits (nobody knows whether the
    // workspace is used there), well past the idle limit.
    ctx.kill(gone);
    gateway_when(&ctx, &admin, "gw-gone", "stale", |g| g["stale"] == true).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, v) = ctx.get(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(v["data"]["status"], "running", "stopped while a gateway's activity was unknown: {v}");

    // Removed: the registry no longer lists it, the event records it, and the idle workspace stops.
    let (s, v) = ctx.delete(path, &admin).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["name"], "gw-gone", "{v}");
    assert_eq!(registered(&ctx).await, vec!["gw-api".to_string()]);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'gateway_removed' AND detail->>'gateway' = 'gw-gone'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("events");
    assert_eq!(events, 1);
    let status = ctx.status_within_10s(&alice, &id, "stopped").await;
    assert_eq!(status, "stopped", "the idle task still waits for the removed gateway");
    ctx.finish().await;
    let _ = std::fs::remove_dir_all(&root);
}
