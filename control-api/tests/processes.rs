//! Several API processes on one database and one table: publisher election and take-over,
//! routes committed with no publisher, crash safety, and concurrent creates.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{eventually, Ctx, IMAGE};
use gpugate_api::db::ports;
use gpugate_routes::{Lookup, Service, Table};
use serde_json::{json, Value};

fn writer_pid(ctx: &Ctx) -> Option<u32> {
    let t = Table::open_read_only(&ctx.table).ok()?;
    let h = t.header_info();
    let fresh = gpugate_routes::now_ms().saturating_sub(h.heartbeat_ms) < 3000;
    fresh.then_some(h.writer_pid)
}

fn live(ctx: &Ctx, port: u16, env: &str) -> bool {
    let Ok(t) = Table::open_read_only(&ctx.table) else { return false };
    matches!(t.lookup(port, gpugate_routes::now_ms()), Lookup::Live(r) if r.env_id.as_str() == env)
}

async fn create(ctx: &Ctx, base: &str, token: &str, name: &str) -> (u16, Value) {
    ctx.call(base, reqwest::Method::POST, "/api/v1/environments", token, Some(json!({ "name": name }))).await
}

async fn scalar(ctx: &Ctx, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(ctx.db().pool()).await.expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_among_two_processes_and_take_over_within_a_second() {
    let mut ctx = Ctx::new("election").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    let alice = ctx.token("alice", false).await;
    let (a, base_a) = ctx.spawn(&["serve"], &[]);
    let (b, base_b) = ctx.spawn(&["serve"], &[]);
    ctx.wait_healthy(&base_a).await;
    ctx.wait_healthy(&base_b).await;
    let pids = [ctx.pid(a), ctx.pid(b)];
    assert!(eventually(Duration::from_secs(10), || writer_pid(&ctx).is_some_and(|p| pids.contains(&p))).await);
    let holder_pid = writer_pid(&ctx).expect("holder");
    let (holder, other, other_base) = if holder_pid == pids[0] { (a, b, base_b) } else { (b, a, base_a) };

    // Exactly one process says it publishes.
    let mut active = 0;
    for base in [&ctx.base_of(a), &ctx.base_of(b)] {
        let (_, v) = ctx.call(base, reqwest::Method::GET, "/readyz", &alice, None).await;
        if v["data"]["publisher_active_here"] == true {
            active += 1;
        }
    }
    assert_eq!(active, 1, "exactly one publisher");

    // A create through the standby goes live through the other process's publisher.
    let (s, v) = create(&ctx, &other_base, &alice, "one").await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["routes_live"], true);
    let port1 = v["data"]["ports"]["ssh"].as_u64().expect("port") as u16;
    let env1 = v["data"]["id"].as_str().expect("id").to_string();

    // Kill the publisher: the standby takes the table within a second and keeps the route.
    ctx.kill(holder);
    let t0 = Instant::now();
    let other_pid = ctx.pid(other);
    assert!(eventually(Duration::from_secs(5), || writer_pid(&ctx) == Some(other_pid)).await, "no take-over");
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "take-over took {took:?}");
    assert!(live(&ctx, port1, &env1));
    let (s, v) = create(&ctx, &other_base, &alice, "two").await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["routes_live"], true);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_committed_with_no_publisher_appears_after_the_resync() {
    let mut ctx = Ctx::new("nopublisher").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.route_wait_ms = 300;
    let alice = ctx.token("alice", false).await;
    let (_, base) = ctx.spawn(&["serve", "--no-publisher"], &[]);
    ctx.wait_healthy(&base).await;
    let (s, v) = create(&ctx, &base, &alice, "lonely").await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["routes_live"], false, "no publisher ran, so the route cannot be live");
    let port = v["data"]["ports"]["ssh"].as_u64().expect("port") as u16;
    let id = v["data"]["id"].as_str().expect("id").to_string();
    assert!(!ctx.table.exists());
    ctx.spawn(&["publish"], &[]);
    assert!(eventually(Duration::from_secs(5), || live(&ctx, port, &id)).await, "route never published");
    ctx.finish().await;
}

/// Waits until no port is allocated, `quarantined` ports are quarantined and no live
/// environment is left mid-operation.
async fn converged(ctx: &Ctx, quarantined: i64) -> bool {
    for _ in 0..150 {
        let allocated = scalar(ctx, "SELECT count(*) FROM port_pool WHERE status = 'allocated'").await;
        let q = scalar(ctx, "SELECT count(*) FROM port_pool WHERE status = 'quarantined'").await;
        let busy = scalar(ctx, "SELECT count(*) FROM environments WHERE status IN ('creating', 'deleting')").await;
        if allocated == 0 && q == quarantined && busy == 0 && ctx.containers().is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_steps_the_reconciler_converges() {
    let mut ctx = Ctx::new("crash").await;
    ctx.cfg.default_services = vec!["ssh".into(), "jupyter".into()];
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.connect().await;

    // 1. Crash after the container started, before the routes: the create is undone.
    let (p0, base0) = ctx.spawn(&["serve"], &[("GPUGATE_FAULT", "crash:after_docker_start")]);
    ctx.wait_healthy(&base0).await;
    let r = ctx.http.post(format!("{base0}/api/v1/environments")).bearer_auth(&alice).json(&json!({"name": "x"})).send().await;
    assert!(r.is_err(), "the process should have died mid-request: {r:?}");
    let status = ctx.children[p0].wait().expect("wait");
    assert!(!status.success());
    assert_eq!(ctx.containers().len(), 1, "the crash left a container");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM port_pool WHERE status = 'allocated'").await, 2);
    // Restarted with a short interval: the reconciler converges within a pass or two.
    let fast = [("GPUGATE_RECONCILE_INTERVAL_S", "1")];
    let (_, base1) = ctx.spawn(&["serve"], &fast);
    ctx.wait_healthy(&base1).await;
    assert!(converged(&ctx, 0).await, "the interrupted create was not undone");
    assert!(ctx.containers().is_empty(), "container not removed");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM environments WHERE status <> 'deleted'").await, 0);
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM routes").await, 0);
    // Counted when the pass ends, a little after the undo it can already see.
    ctx.metrics_with(&base1, &["gpugate_reconcile_repairs_total{kind=\"create_undone\"} 1"]).await;

    // 2. Crash after the container was removed, before the ports were released.
    let (s, v) = create(&ctx, &base1, &alice, "y").await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let ports: Vec<u16> = ["ssh", "jupyter"].iter().map(|k| v["data"]["ports"][*k].as_u64().expect("port") as u16).collect();
    ctx.kill(1);
    let (_, base2) = ctx.spawn(&["serve"], &[("GPUGATE_FAULT", "crash:after_container_removed")]);
    ctx.wait_healthy(&base2).await;
    let r = ctx.http.delete(format!("{base2}/api/v1/environments/{id}")).bearer_auth(&alice).send().await;
    assert!(r.is_err(), "the process should have died mid-request");
    let _ = ctx.children[2].wait();
    assert!(ctx.containers().is_empty());
    for p in &ports {
        assert!(!live(&ctx, *p, &id), "route of port {p} outlived the container");
    }
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM port_pool WHERE status = 'allocated'").await, 2, "ports still held");
    let (p3, base3) = ctx.spawn(&["serve"], &fast);
    ctx.wait_healthy(&base3).await;
    assert!(converged(&ctx, 2).await, "delete not finished by the reconciler");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM environments WHERE status <> 'deleted'").await, 0);
    ctx.kill(p3);

    // A process whose only pass runs at start, so the admin pass below sees the damage.
    let (_, base3) = ctx.spawn(&["serve"], &[]);
    ctx.wait_healthy(&base3).await;

    // 3. A container that vanished, and a labelled container with no environment.
    let (s, v) = create(&ctx, &base3, &alice, "z").await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let port = v["data"]["ports"]["ssh"].as_u64().expect("port") as u16;
    let cs = ctx.containers();
    assert_eq!(cs.len(), 1);
    let rm = std::process::Command::new("docker").args(["rm", "-f"]).arg(&cs[0]).output().expect("rm");
    assert!(rm.status.success());
    let stray = std::process::Command::new("docker")
        .args(["run", "-d", "--label", "gpugate.managed=true", "--label"])
        .arg(format!("gpugate.deployment={}", ctx.deployment))
        .args(["--label", "gpugate.env_id=zzzzzzzzzzzzzzzz", IMAGE])
        .output()
        .expect("docker run");
    assert!(stray.status.success(), "{}", String::from_utf8_lossy(&stray.stderr));
    let (s, v) = ctx.call(&base3, reqwest::Method::POST, "/api/v1/admin/reconcile", &admin, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["environments_failed"], 1, "{v}");
    assert_eq!(v["data"]["containers_removed"], 1, "{v}");
    assert!(ctx.containers().is_empty());
    assert!(eventually(Duration::from_secs(2), || !live(&ctx, port, &id)).await, "route of a failed environment kept");
    let (_, g) = ctx.call(&base3, reqwest::Method::GET, &format!("/api/v1/environments/{id}"), &alice, None).await;
    assert_eq!(g["data"]["status"], "failed");
    assert_eq!(g["data"]["status_reason"], "container vanished");
    let (s, _) = ctx.call(&base3, reqwest::Method::DELETE, &format!("/api/v1/environments/{id}"), &alice, None).await;
    assert_eq!(s, 200);
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM port_pool WHERE status = 'allocated'").await, 0);
    let repairs = scalar(&ctx, "SELECT count(*) FROM events WHERE kind LIKE 'repair_%'").await;
    assert!(repairs >= 2, "repairs recorded in the audit trail: {repairs}");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_is_unique_under_32_concurrent_transactions() {
    let mut ctx = Ctx::new("alloc").await;
    ctx.cfg.pools.retain(|k, _| k == "ssh");
    ctx.cfg.pools.get_mut("ssh").expect("ssh").range = "40000-40599".parse().expect("range");
    ctx.cfg.database_max_connections = 40;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.connect().await;
    ports::sync_pools(ctx.db(), &ctx.cfg).await.expect("sync");
    // Idempotent: a second sync changes nothing.
    assert_eq!(ports::sync_pools(ctx.db(), &ctx.cfg).await.expect("sync"), Default::default());
    let owner: i64 = sqlx::query_scalar("INSERT INTO users (name) VALUES ('bench') RETURNING id")
        .fetch_one(ctx.db().pool())
        .await
        .expect("user");
    let mut tasks = vec![];
    for _ in 0..32 {
        let db = ctx.db().clone();
        tasks.push(tokio::spawn(async move {
            let mut got = vec![];
            for _ in 0..20 {
                let id = gpugate_api::ids::env_id();
                let mut tx = db.begin().await.expect("tx");
                sqlx::query("INSERT INTO environments (id, owner_id, name, image, status, services, username, password, jupyter_token, host) VALUES ($1, $2, 'b', 'i', 'creating', '{ssh}', 'u', 'p', 't', 'local')")
                    .bind(&id).bind(owner).execute(&mut *tx).await.expect("env");
                let port = ports::allocate(&mut tx, Service::Ssh, &id).await.expect("allocate");
                tx.commit().await.expect("commit");
                got.push(port);
            }
            got
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let given: Vec<u16> = all.iter().flatten().copied().collect();
    let refused = all.iter().filter(|p| p.is_none()).count();
    let unique: HashSet<u16> = given.iter().copied().collect();
    assert_eq!(unique.len(), given.len(), "a port was handed out twice");
    assert_eq!((given.len(), refused), (600, 40), "600 ports, 640 requests");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM port_pool WHERE status = 'allocated'").await, 600);

    // Shrinking the pool under allocated ports is refused, naming them.
    let mut smaller = ctx.cfg.clone();
    smaller.pools.get_mut("ssh").expect("ssh").range = "40000-40009".parse().expect("range");
    let err = ports::sync_pools(ctx.db(), &smaller).await.expect_err("shrink refused").to_string();
    assert!(err.contains("40010") && err.contains("allocated"), "{err}");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM port_pool").await, 600, "a refused sync changes nothing");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_creates_on_two_processes() {
    let mut ctx = Ctx::new("hundred").await;
    ctx.cfg.pools.retain(|k, _| k == "ssh");
    ctx.cfg.pools.get_mut("ssh").expect("ssh").range = "24000-24099".parse().expect("range");
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.gpu.devices.clear();
    ctx.cfg.database_max_connections = 20;
    ctx.cfg.route_wait_ms = 10_000;
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    let (_, a) = ctx.spawn(&["serve"], &[]);
    let (_, b) = ctx.spawn(&["serve"], &[]);
    ctx.wait_healthy(&a).await;
    ctx.wait_healthy(&b).await;

    let calls = (0..100).map(|i| {
        let base = if i % 2 == 0 { a.clone() } else { b.clone() };
        let ctx = &ctx;
        let alice = alice.clone();
        async move { create(ctx, &base, &alice, &format!("w{i}")).await }
    });
    let results = futures_util::future::join_all(calls).await;
    let mut seen = HashSet::new();
    for (s, v) in &results {
        assert_eq!(*s, 201, "{v}");
        let port = v["data"]["ports"]["ssh"].as_u64().expect("port");
        assert!(seen.insert(port), "port {port} handed out twice");
    }
    let (s, v) = create(&ctx, &a, &alice, "one-too-many").await;
    assert_eq!((s, v["message"].as_str()), (503, Some("no free ssh port")), "{v}");
    let (_, stats) = ctx.call(&b, reqwest::Method::GET, "/api/v1/ports/stats", &alice, None).await;
    let ssh = &stats["data"][0];
    assert_eq!((ssh["total"].as_i64(), ssh["allocated"].as_i64(), ssh["available"].as_i64()), (Some(100), Some(100), Some(0)), "{stats}");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM environments WHERE status = 'running'").await, 100);
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM routes WHERE active").await, 100);
    assert_eq!(ctx.containers().len(), 100);
    let full = eventually(Duration::from_secs(5), || ctx.table().routes().count() == 100).await;
    assert!(full, "table does not hold 100 routes");
    let (_, dbg) = ctx.call(&a, reqwest::Method::GET, "/api/v1/debug/routes", &admin, None).await;
    assert_eq!(dbg["data"]["mismatches"], json!([]));
    ctx.finish().await;
}
