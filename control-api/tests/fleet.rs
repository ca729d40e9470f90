//! A fleet on one machine: the machine's Docker engine (host `local`) and a second `dockerd`
//! started by the test (host `h2`, publishing on 127.0.0.4), each with two stand-in GPUs.
//! Placement by policy, no GPU ever booked twice under concurrent creates from two API
//! processes, drain and remove, a host lost and back, and SSH through two gateways (our nginx
//! on 127.0.0.2 and 127.0.0.3, each with its own table and publisher) into a workspace on each
//! host.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::engine::Engine;
use common::{eventually, Ctx, IMAGE, ISO_IMAGE};
use gpugate_api::config::Placement;
use gpugate_routes::{Lookup, Table};
use serde_json::{json, Value};

/// Adds the second engine as host `h2` with GPUs 0 and 1 and waits until a probe saw it up.
async fn add_h2(ctx: &Ctx, admin: &str, engine: &Engine) {
    let body = json!({
        "name": "h2",
        "docker_endpoint": engine.endpoint(),
        "upstream_address": "127.0.0.4",
        "gpus": [0, 1],
        "gpu_model": "Stand-in B",
    });
    let (s, v) = ctx.post("/api/v1/admin/hosts", admin, body.clone()).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["gpus_total"], 2, "{v}");
    // The same name again is a conflict, and nothing changes.
    let (s, v) = ctx.post("/api/v1/admin/hosts", admin, body).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1006)), "{v}");
    assert!(wait_health(ctx, admin, "h2", "up").await, "h2 never probed up");
}

async fn host_view(ctx: &Ctx, admin: &str, name: &str) -> Value {
    let (s, v) = ctx.get("/api/v1/admin/hosts", admin).await;
    assert_eq!(s, 200, "{v}");
    v["data"]["hosts"].as_array().expect("hosts").iter().find(|h| h["name"] == name).cloned().unwrap_or(Value::Null)
}

async fn wait_health(ctx: &Ctx, admin: &str, name: &str, want: &str) -> bool {
    for _ in 0..150 {
        if host_view(ctx, admin, name).await["health"] == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn create(ctx: &Ctx, token: &str, name: &str, gpus: u32) -> (u16, Value) {
    ctx.post("/api/v1/environments", token, json!({ "name": name, "gpus": gpus })).await
}

/// (host, GPU id) → environment, for every allocated GPU.
async fn holders(ctx: &Ctx) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT host, id, env_id FROM gpu_devices WHERE status = 'allocated' ORDER BY host, id")
        .fetch_all(ctx.db().pool())
        .await
        .expect("gpu rows")
}

async fn env_status(ctx: &Ctx, token: &str, id: &str) -> String {
    let (_, v) = ctx.get(&format!("/api/v1/environments/{id}"), token).await;
    v["data"]["status"].as_str().unwrap_or("").to_string()
}

fn local_containers(deployment: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=gpugate.deployment={deployment}")])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_the_policy_and_never_books_a_gpu_twice() {
    let mut ctx = Ctx::new("fleet_place").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    // Room for every create below, released ports staying in quarantine: the 40 concurrent
    // creates must fail for want of GPUs, not of ports.
    ctx.cfg.pools.get_mut("ssh").expect("ssh pool").range = "20000-20099".parse().expect("range");
    ctx.cfg.fleet.placement = Placement::Spread;
    ctx.cfg.fleet.probe_interval_s = 1;
    ctx.cfg.fleet.fail_after_s = 60;
    let engine = Engine::start(false);
    engine.load_image(IMAGE);
    let admin = ctx.token("root", true).await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    // Hosts are for admins only.
    let (s, _) = ctx.get("/api/v1/admin/hosts", &alice).await;
    assert_eq!(s, 403);
    // A bad host is refused with the field named, and nothing is added.
    let bad = json!({"name": "h3", "docker_endpoint": "tcp://127.0.0.9:2376", "upstream_address": "127.0.0.9"});
    let (s, v) = ctx.post("/api/v1/admin/hosts", &admin, bad).await;
    assert_eq!((s, v["code"].as_u64()), (422, Some(1002)), "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("tls_dir"), "{v}");
    assert!(host_view(&ctx, &admin, "h3").await.is_null());
    add_h2(&ctx, &admin, &engine).await;

    // Spread: one GPU each, the hosts take turns; a fifth finds no GPU anywhere.
    let mut on: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut ids = vec![];
    for i in 0..4 {
        let (s, v) = create(&ctx, &alice, &format!("s{i}"), 1).await;
        assert_eq!(s, 201, "{v}");
        let host = v["data"]["host"].as_str().expect("host").to_string();
        let id = v["data"]["id"].as_str().expect("id").to_string();
        on.entry(host).or_default().push(id.clone());
        ids.push(id);
    }
    assert_eq!(on.get("local").map(Vec::len), Some(2), "{on:?}");
    assert_eq!(on.get("h2").map(Vec::len), Some(2), "{on:?}");
    let (s, v) = create(&ctx, &alice, "s4", 1).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1008)), "{v}");
    // Each container is on its host's engine, published on its host's address, and the
    // routes point there.
    assert_eq!(engine.containers(&ctx.deployment).len(), 2);
    assert_eq!(local_containers(&ctx.deployment).len(), 2);
    let table = ctx.table();
    for id in &on["h2"] {
        let (_, v) = ctx.get(&format!("/api/v1/environments/{id}"), &alice).await;
        let port = v["data"]["ports"]["ssh"].as_u64().expect("ssh port") as u16;
        match table.lookup(port, gpugate_routes::now_ms()) {
            Lookup::Live(r) => assert_eq!(r.upstream.ip().to_string(), "127.0.0.4", "{id}"),
            other => panic!("{id}: port {port} not live: {other:?}"),
        }
    }
    // No GPU held twice, and each on the host of its environment.
    let rows = holders(&ctx).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    for (host, _, env) in &rows {
        assert!(on[host].contains(env), "{env} holds a GPU of {host}: {on:?}");
    }
    // A host with environments cannot be removed.
    let (s, v) = ctx.delete("/api/v1/admin/hosts/h2", &admin).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1006)), "{v}");
    for id in &ids {
        let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
        assert_eq!(s, 200, "{v}");
    }
    assert!(engine.containers(&ctx.deployment).is_empty(), "h2's containers go with their environments");

    // Pack: fill one host (the fewest free GPUs that fit, then by name) before the next.
    ctx.stop().await;
    ctx.cfg.fleet.placement = Placement::Pack;
    ctx.start().await;
    let mut order = vec![];
    let mut ids = vec![];
    for i in 0..3 {
        let (s, v) = create(&ctx, &alice, &format!("p{i}"), 1).await;
        assert_eq!(s, 201, "{v}");
        order.push(v["data"]["host"].as_str().expect("host").to_string());
        ids.push(v["data"]["id"].as_str().expect("id").to_string());
    }
    assert_eq!(order, ["h2", "h2", "local"], "pack fills h2 first");
    // Drain: new creates go elsewhere; undrain: back.
    let (s, v) = ctx.post("/api/v1/admin/hosts/local/drain", &admin, json!({})).await;
    assert_eq!((s, v["data"]["state"].as_str()), (200, Some("draining")), "{v}");
    let (s, v) = create(&ctx, &alice, "p3", 1).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1008)), "local is draining and h2 is full: {v}");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "cpu", "gpus": 0})).await;
    assert_eq!((s, v["data"]["host"].as_str()), (201, Some("h2")), "{v}");
    ids.push(v["data"]["id"].as_str().expect("id").to_string());
    let (s, _) = ctx.post("/api/v1/admin/hosts/local/undrain", &admin, json!({})).await;
    assert_eq!(s, 200);
    let (s, _) = ctx.post("/api/v1/admin/hosts/nope/drain", &admin, json!({})).await;
    assert_eq!(s, 404);
    for id in &ids {
        let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
        assert_eq!(s, 200, "{v}");
    }

    // A host's environment limit, and one engine registered under two names by mistake: h3
    // is h2's engine again, CPU only, at most one environment.
    let h3 = json!({
        "name": "h3", "docker_endpoint": engine.endpoint(), "upstream_address": "127.0.0.5", "max_environments": 1,
    });
    let (s, v) = ctx.post("/api/v1/admin/hosts", &admin, h3).await;
    assert_eq!(s, 201, "{v}");
    for h in ["local", "h2"] {
        let (s, _) = ctx.post(&format!("/api/v1/admin/hosts/{h}/drain"), &admin, json!({})).await;
        assert_eq!(s, 200);
    }
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "cpu1"})).await;
    assert_eq!((s, v["data"]["host"].as_str()), (201, Some("h3")), "{v}");
    let on_h3 = v["data"]["id"].as_str().expect("id").to_string();
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "cpu2"})).await;
    assert_eq!((s, v["code"].as_u64()), (503, Some(1010)), "h3 is full, the others drain: {v}");
    // A reconcile pass over both names leaves h3's workspace alone: h2's reconciler does not
    // take it for one of its own strays (the gpugate.host label).
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["containers_removed"], 0, "{v}");
    assert_eq!(env_status(&ctx, &alice, &on_h3).await, "running");
    assert_eq!(engine.containers(&ctx.deployment).len(), 1);
    // A refusal for want of GPUs counts only GPUs a create could be placed on: the four free
    // ones are on draining hosts, then on a host at its environment limit.
    let (s, v) = create(&ctx, &alice, "g1", 1).await;
    assert_eq!((s, v["data"].clone()), (409, json!({"gpus_free": 0, "gpus_needed": 1})), "GPUs of draining hosts counted: {v}");
    sqlx::query("UPDATE hosts SET max_environments = 1 WHERE name = 'h2'").execute(ctx.db().pool()).await.expect("limit h2");
    let (s, _) = ctx.post("/api/v1/admin/hosts/h2/undrain", &admin, json!({})).await;
    assert_eq!(s, 200);
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "cpu3"})).await;
    assert_eq!((s, v["data"]["host"].as_str()), (201, Some("h2")), "{v}");
    let on_h2 = v["data"]["id"].as_str().expect("id").to_string();
    let (s, v) = create(&ctx, &alice, "g2", 1).await;
    assert_eq!((s, v["data"].clone()), (409, json!({"gpus_free": 0, "gpus_needed": 1})), "GPUs of a full host counted: {v}");
    let (s, v) = ctx.delete(&format!("/api/v1/environments/{on_h2}"), &alice).await;
    assert_eq!(s, 200, "{v}");
    sqlx::query("UPDATE hosts SET max_environments = NULL WHERE name = 'h2'").execute(ctx.db().pool()).await.expect("unlimit h2");
    let (s, v) = ctx.delete(&format!("/api/v1/environments/{on_h3}"), &alice).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = ctx.delete("/api/v1/admin/hosts/h3", &admin).await;
    assert_eq!(s, 200, "{v}");
    for h in ["local", "h2"] {
        let (s, _) = ctx.post(&format!("/api/v1/admin/hosts/{h}/undrain"), &admin, json!({})).await;
        assert_eq!(s, 200);
    }

    // 40 concurrent creates over two API processes, by eight users (one user's creates queue
    // on their quota row): exactly the four GPUs are taken, each by one environment on its
    // own host; every other create is a clean 409.
    ctx.stop().await;
    ctx.cfg.database_max_connections = 30;
    let mut users = vec![];
    for u in 0..8 {
        users.push(ctx.token(&format!("user{u}"), false).await);
    }
    let extra = [("GPUGATE_PLACEMENT", "spread"), ("GPUGATE_HOST_PROBE_INTERVAL_S", "1")];
    let (a, base_a) = ctx.spawn(&["serve"], &extra);
    let (b, base_b) = ctx.spawn(&["serve"], &extra);
    ctx.wait_healthy(&base_a).await;
    ctx.wait_healthy(&base_b).await;
    let mut calls = vec![];
    for i in 0..40 {
        let base = if i % 2 == 0 { base_a.clone() } else { base_b.clone() };
        let (http, token) = (ctx.http.clone(), users[i % 8].clone());
        calls.push(tokio::spawn(async move {
            let r = http
                .post(format!("{base}/api/v1/environments"))
                .bearer_auth(&token)
                .json(&json!({ "name": format!("c{i}"), "gpus": 1 }))
                .send()
                .await
                .expect("create");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.expect("JSON"))
        }));
    }
    let mut made = vec![];
    for c in calls {
        let (s, v) = c.await.expect("task");
        match s {
            201 => made.push((v["data"]["id"].as_str().expect("id").to_string(), v["data"]["host"].as_str().expect("host").to_string())),
            409 => assert_eq!(v["code"], 1008, "{v}"),
            _ => panic!("unexpected {s}: {v}"),
        }
    }
    assert_eq!(made.len(), 4, "exactly the four GPUs: {made:?}");
    let rows = holders(&ctx).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    let envs: HashSet<&String> = rows.iter().map(|(_, _, e)| e).collect();
    assert_eq!(envs.len(), 4, "no environment holds two GPUs and no GPU two environments: {rows:?}");
    for (host, _, env) in &rows {
        assert!(made.iter().any(|(id, h)| id == env && h == host), "{env} on {host}: {made:?}");
    }
    for (id, _) in &made {
        let owner: String = sqlx::query_scalar("SELECT u.name FROM environments e JOIN users u ON u.id = e.owner_id WHERE e.id = $1")
            .bind(id)
            .fetch_one(ctx.db().pool())
            .await
            .expect("owner");
        let token = &users[owner.trim_start_matches("user").parse::<usize>().expect("user number")];
        let (s, v) = ctx.call(&base_a, reqwest::Method::DELETE, &format!("/api/v1/environments/{id}"), token, None).await;
        assert_eq!(s, 200, "{v}");
    }
    ctx.kill(a);
    ctx.kill(b);
    drop(engine);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_host_turns_unreachable_then_failed_and_is_cleaned_when_back() {
    let mut ctx = Ctx::new("fleet_lost").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.fleet.probe_interval_s = 1;
    ctx.cfg.fleet.fail_after_s = 6;
    ctx.cfg.docker.call_timeout_s = 2;
    let mut engine = Engine::start(false);
    engine.load_image(IMAGE);
    let admin = ctx.token("root", true).await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    add_h2(&ctx, &admin, &engine).await;
    let (s, _) = ctx.post("/api/v1/admin/hosts/local/drain", &admin, json!({})).await;
    assert_eq!(s, 200);
    let (s, v) = create(&ctx, &alice, "far", 1).await;
    assert_eq!((s, v["data"]["host"].as_str()), (201, Some("h2")), "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let port = v["data"]["ports"]["ssh"].as_u64().expect("port") as u16;
    let (s, _) = ctx.post("/api/v1/admin/hosts/local/undrain", &admin, json!({})).await;
    assert_eq!(s, 200);
    let live = |ctx: &Ctx| matches!(ctx.table().lookup(port, gpugate_routes::now_ms()), Lookup::Live(r) if r.env_id.as_str() == id);
    assert!(live(&ctx));

    // The host stops answering (its engine frozen; its containers keep running): unreachable,
    // routes kept; then failed, routes gone, GPU released.
    engine.freeze();
    assert!(wait_health(&ctx, &admin, "h2", "down").await, "h2 never seen down");
    let mut seen = false;
    for _ in 0..100 {
        if env_status(&ctx, &alice, &id).await == "unreachable" {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "never unreachable");
    assert!(live(&ctx), "an unreachable workspace keeps its route for the grace period");
    // New creates land on the host that answers.
    let (s, v) = create(&ctx, &alice, "near", 1).await;
    assert_eq!((s, v["data"]["host"].as_str()), (201, Some("local")), "{v}");
    let near = v["data"]["id"].as_str().expect("id").to_string();
    let mut failed = false;
    for _ in 0..200 {
        if env_status(&ctx, &alice, &id).await == "failed" {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failed, "never failed after fleet.fail_after_s");
    assert!(eventually(Duration::from_secs(5), || !live(&ctx)).await, "the failed workspace's route stays");
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM gpu_devices WHERE host = 'h2' AND status = 'allocated'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("count");
    assert_eq!(held, 1, "a lost workspace keeps its GPU while its container may still run there");

    // Back: the lost workspace's container, still running with its GPU, is removed, and only
    // then does the GPU go back, before h2 takes placements again.
    engine.thaw();
    assert!(wait_health(&ctx, &admin, "h2", "up").await, "h2 never back up");
    assert!(engine.containers(&ctx.deployment).is_empty(), "the lost workspace's container was not removed");
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM gpu_devices WHERE host = 'h2' AND status = 'allocated'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("count");
    assert_eq!(held, 0, "the GPU goes back once the lost container is gone");
    let (s, v) = ctx.post("/api/v1/admin/hosts/local/drain", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = create(&ctx, &alice, "again", 1).await;
    assert_eq!((s, v["data"]["host"].as_str()), (201, Some("h2")), "{v}");
    let again = v["data"]["id"].as_str().expect("id").to_string();
    for id in [&id, &near, &again] {
        let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = ctx.delete("/api/v1/admin/hosts/h2", &admin).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = ctx.delete("/api/v1/admin/hosts/local", &admin).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1006)), "this API's own host stays: {v}");
    drop(engine);
    ctx.finish().await;
}

/// An OpenSSH login as root to `addr:port`; returns the remote `hostname` (empty on failure).
fn ssh_hostname(addr: &str, port: u16, key: &Path) -> String {
    let out = Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args([
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "-p", &port.to_string(), &format!("root@{addr}"), "hostname",
        ])
        .output()
        .expect("ssh client");
    if !out.status.success() {
        eprintln!("ssh {addr}:{port}: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_through_each_gateway_into_a_workspace_on_each_host() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("fleet_ssh").await;
    ctx.cfg.docker.default_image = ISO_IMAGE.into();
    ctx.cfg.docker.allowed_images = vec![ISO_IMAGE.into()];
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.fleet.probe_interval_s = 1;
    ctx.cfg.gateway_name = "gw-a".into();
    // A pool of its own: the gateways bind it on 127.0.0.2 and 127.0.0.3.
    let (lo, hi) = (24100u16, 24109u16);
    ctx.cfg.pools.get_mut("ssh").expect("ssh pool").range = format!("{lo}-{hi}").parse().expect("range");
    // Gateway A reads the table this API publishes; gateway B its own, kept by a
    // `gpugate-api publish` beside it. Both in the operator recipe's directories.
    let root_a = gpugate_tests::temp_dir("fleet-gw-a");
    let root_b = gpugate_tests::temp_dir("fleet-gw-b");
    ctx.table = gpugate_tests::table_dir(&root_a).join("routes");
    ctx.cfg.route_table = ctx.table.clone();
    let table_b = gpugate_tests::table_dir(&root_b).join("routes");
    let (key, public) = common::keypair(&ctx);
    let engine = Engine::start(false);
    engine.load_image(ISO_IMAGE);
    let admin = ctx.token("root", true).await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let table_b_s = table_b.display().to_string();
    let (publisher_b, _) =
        ctx.spawn(&["publish"], &[("GPUGATE_ROUTE_TABLE", &table_b_s), ("GPUGATE_GATEWAY_NAME", "gw-b")]);
    add_h2(&ctx, &admin, &engine).await;
    // Both publishers registered as gateways.
    let mut both = false;
    for _ in 0..100 {
        let (_, v) = ctx.get("/api/v1/admin/gateways", &admin).await;
        let fresh: Vec<&str> = v["data"]["gateways"]
            .as_array()
            .map(|a| a.iter().filter(|g| g["stale"] == false).filter_map(|g| g["name"].as_str()).collect())
            .unwrap_or_default();
        if fresh.contains(&"gw-a") && fresh.contains(&"gw-b") {
            both = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(both, "gw-a and gw-b never both registered");

    let mut made = vec![];
    for (host, other) in [("h2", "local"), ("local", "h2")] {
        let (s, _) = ctx.post(&format!("/api/v1/admin/hosts/{other}/drain"), &admin, json!({})).await;
        assert_eq!(s, 200);
        let body = json!({"name": format!("on-{host}"), "ssh_public_keys": [public.clone()]});
        let (s, v) = ctx.post("/api/v1/environments", &alice, body).await;
        assert_eq!((s, v["data"]["host"].as_str()), (201, Some(host)), "{v}");
        // Live here, and the answer says both registered gateways had applied it.
        assert_eq!(v["data"]["routes_live"], true, "{v}");
        assert_eq!(v["data"]["gateways"], json!({"applied": 2, "registered": 2}), "{v}");
        let (s, _) = ctx.post(&format!("/api/v1/admin/hosts/{other}/undrain"), &admin, json!({})).await;
        assert_eq!(s, 200);
        let id = v["data"]["id"].as_str().expect("id").to_string();
        let port = v["data"]["ports"]["ssh"].as_u64().expect("port") as u16;
        made.push((host, id, port));
    }
    // Both tables hold both routes (gateway B's publisher is fed by LISTEN/NOTIFY too).
    for t in [&ctx.table, &table_b] {
        let ok = eventually(Duration::from_secs(5), || {
            let Ok(table) = Table::open_read_only(t) else { return false };
            made.iter().all(|(_, id, port)| {
                matches!(table.lookup(*port, gpugate_routes::now_ms()), Lookup::Live(r) if r.env_id.as_str() == id)
            })
        })
        .await;
        assert!(ok, "routes not live in {}", t.display());
    }
    let mut gw_a = common::gateway(&root_a, "127.0.0.2", &ctx.table, lo, hi);
    let mut gw_b = common::gateway(&root_b, "127.0.0.3", &table_b, lo, hi);
    // A workspace's hostname is its environment id: the login landed in the right one.
    for (host, id, port) in &made {
        for addr in ["127.0.0.2", "127.0.0.3"] {
            let mut got = String::new();
            for _ in 0..30 {
                got = ssh_hostname(addr, *port, &key);
                if !got.is_empty() {
                    break;
                }
                // sshd in a fresh container takes a moment to listen.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            assert_eq!(&got, id, "ssh via {addr}:{port} into the workspace on {host}");
        }
    }
    gw_a.assert_no_crash();
    gw_b.assert_no_crash();
    gw_a.stop();
    gw_b.stop();
    for (_, id, _) in &made {
        let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
        assert_eq!(s, 200, "{v}");
    }
    ctx.kill(publisher_b);
    drop(engine);
    ctx.finish().await;
    let _ = std::fs::remove_dir_all(&root_a);
    let _ = std::fs::remove_dir_all(&root_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_commands_add_list_drain_disable_and_remove() {
    let mut ctx = Ctx::new("fleet_cli").await;
    ctx.connect().await;
    let add = |ctx: &Ctx, extra: &[&str]| {
        let mut args = vec!["host", "add", "--name", "gpu-9", "--upstream", "10.9.0.9", "--gpus", "0,1,2", "--gpu-model", "Stand-in C"];
        args.extend_from_slice(extra);
        ctx.cli(&args)
    };
    // Refused with the reason, and nothing added.
    let (ok, _, err) = add(&ctx, &["--docker", "tcp://10.9.0.9:2376"]);
    assert!(!ok && err.contains("tls_dir"), "{err}");
    let (ok, _, err) = add(&ctx, &["--docker", "unix:///run/gpu9.sock", "--max-environments", "0"]);
    assert!(!ok && err.contains("max_environments"), "{err}");
    let (_, out, _) = ctx.cli(&["host", "list"]);
    assert!(!out.contains("gpu-9"), "{out}");

    let (ok, _, err) = add(&ctx, &["--docker", "unix:///run/gpu9.sock"]);
    assert!(ok, "{err}");
    let (ok, _, err) = add(&ctx, &["--docker", "unix:///run/gpu9.sock"]);
    assert!(!ok && err.contains("exists"), "a second add of the name: {err}");
    let row = |ctx: &Ctx| {
        let (ok, out, err) = ctx.cli(&["host", "list"]);
        assert!(ok, "{err}");
        out.lines().find(|l| l.starts_with("gpu-9 ")).map(str::to_string).unwrap_or_default()
    };
    let line = row(&ctx);
    assert!(line.contains("active") && line.contains("3/3") && line.contains("10.9.0.9"), "{line}");
    for (cmd, state) in [("drain", "draining"), ("disable", "disabled"), ("undrain", "active")] {
        let (ok, _, err) = ctx.cli(&["host", cmd, "gpu-9"]);
        assert!(ok, "{cmd}: {err}");
        assert!(row(&ctx).contains(state), "after {cmd}: {}", row(&ctx));
    }
    let (ok, _, err) = ctx.cli(&["host", "drain", "nope"]);
    assert!(!ok && err.contains("no host named nope"), "{err}");
    let (ok, _, err) = ctx.cli(&["host", "remove", "local"]);
    assert!(!ok && err.contains("own engine"), "{err}");
    let (ok, _, err) = ctx.cli(&["host", "remove", "gpu-9"]);
    assert!(ok, "{err}");
    assert!(row(&ctx).is_empty());
    let gpus: i64 = sqlx::query_scalar("SELECT count(*) FROM gpu_devices WHERE host = 'gpu-9'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("count");
    assert_eq!(gpus, 0, "its GPU rows go with it");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_the_api_s_own_host_keeps_its_workspaces() {
    let mut ctx = Ctx::new("fleet_rename").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    let admin = ctx.token("root", true).await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let (s, v) = create(&ctx, &alice, "kept", 1).await;
    assert_eq!((s, v["data"]["host"].as_str()), (201, Some("local")), "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    // The operator names the engine: the row, its GPUs and its environments follow, and the
    // container made under the old name is still the workspace's (not a stray, not vanished).
    ctx.stop().await;
    ctx.cfg.fleet.host_name = "gpu-main".into();
    ctx.start().await;
    let (_, v) = ctx.get("/api/v1/admin/hosts", &admin).await;
    let names: Vec<&str> = v["data"]["hosts"].as_array().expect("hosts").iter().filter_map(|h| h["name"].as_str()).collect();
    assert_eq!(names, ["gpu-main"], "{v}");
    assert_eq!(v["data"]["hosts"][0]["gpus_total"], 2, "{v}");
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["data"]["containers_removed"].as_u64(), v["data"]["environments_failed"].as_u64()), (Some(0), Some(0)), "{v}");
    let (_, v) = ctx.get(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!((v["data"]["status"].as_str(), v["data"]["host"].as_str()), (Some("running"), Some("gpu-main")), "{v}");
    assert_eq!(local_containers(&ctx.deployment).len(), 1);
    let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 200, "{v}");
    ctx.finish().await;
}
