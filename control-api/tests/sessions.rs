//! Live sessions over real PostgreSQL and Docker: sessions/close reaches the route table once,
//! the idle limit is validated, and an idle workspace stops by itself. (The sessions themselves,
//! through our nginx, are in the end-to-end stack test.)

mod common;

use std::time::Duration;

use common::Ctx;
use gpugate_routes::Lookup;
use reqwest::Method;
use serde_json::{json, Value};

fn ports_of(env: &Value) -> Vec<u16> {
    env["ports"].as_object().expect("ports").values().map(|p| p.as_u64().expect("port") as u16).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_close_revokes_each_port_once_and_keeps_the_routes() {
    let mut ctx = Ctx::new("sessclose").await;
    ctx.cfg.default_services = vec!["ssh".into(), "jupyter".into()];
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;

    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "s"})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let ports = ports_of(&v["data"]);
    assert_eq!(ports.len(), 2);
    // Fresh routes: every service shows zero traffic, and the workspace is not idle-limited.
    for svc in ["ssh", "jupyter"] {
        let a = &v["data"]["activity"][svc];
        assert_eq!(a["connections_active"], 0, "{v}");
        assert_eq!(a["bytes_in"], 0, "{v}");
    }
    assert_eq!(v["data"]["idle_stop_after_s"], 0);
    let t = ctx.table();
    let before: Vec<u64> = ports.iter().map(|p| t.revoke_epoch(*p)).collect();
    let generations: Vec<u64> = ports
        .iter()
        .map(|p| match t.lookup(*p, gpugate_routes::now_ms()) {
            Lookup::Live(r) => r.generation,
            other => panic!("port {p}: {other:?}"),
        })
        .collect();

    let path = format!("/api/v1/environments/{id}/sessions/close");
    let (s, v) = ctx.post(&path, &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["applied"], true, "{v}");
    let mut closed: Vec<u16> = v["data"]["ports"].as_array().expect("ports").iter().map(|p| p.as_u64().expect("p") as u16).collect();
    closed.sort_unstable();
    let mut want = ports.clone();
    want.sort_unstable();
    assert_eq!(closed, want);
    let after: Vec<u64> = ports.iter().map(|p| t.revoke_epoch(*p)).collect();
    assert_eq!(after, before.iter().map(|e| e + 1).collect::<Vec<_>>(), "each port revoked exactly once");
    // The routes stay as they were: new connections keep working.
    for (p, g) in ports.iter().zip(&generations) {
        assert!(matches!(t.lookup(*p, gpugate_routes::now_ms()), Lookup::Live(r) if r.generation == *g), "port {p}");
    }
    // A whole re-sync (what a restarted publisher does) applies nothing again.
    let (s, _) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ports.iter().map(|p| t.revoke_epoch(*p)).collect::<Vec<_>>(), after, "a re-sync revoked again");

    // Another user cannot; an admin can; the request is in the audit trail.
    let (s, v) = ctx.post(&path, &bob, json!({})).await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = ctx.post(&path, &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(ports.iter().map(|p| t.revoke_epoch(*p)).collect::<Vec<_>>(), after.iter().map(|e| e + 1).collect::<Vec<_>>());
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'sessions_closed' AND env_id = $1")
        .bind(&id)
        .fetch_one(ctx.db().pool())
        .await
        .expect("events");
    assert_eq!(events, 2);

    // A stopped environment has no sessions: 409, not a silent success.
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/stop"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = ctx.post(&path, &alice, json!({})).await;
    assert_eq!(s, 409, "{v}");
    assert!(v["message"].as_str().unwrap_or_default().contains("stopped"), "{v}");
    let (s, v) = ctx.post("/api/v1/environments/zzzzzzzzzzzzzzzz/sessions/close", &alice, json!({})).await;
    assert_eq!(s, 404, "{v}");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_limits_are_validated_and_an_idle_workspace_stops_by_itself() {
    let mut ctx = Ctx::new("idle").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.idle.check_interval_s = 1;
    ctx.cfg.idle.default_stop_after_s = 3600;
    ctx.cfg.idle.max_stop_after_s = 7200;
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    ctx.start().await;

    // Limits: the deployment's maximum holds on create and on PATCH, and "never" is refused
    // where a maximum is set.
    for bad in [json!({"name": "x", "idle_stop_after_s": 0}), json!({"name": "x", "idle_stop_after_s": 7201})] {
        let (s, v) = ctx.post("/api/v1/environments", &alice, bad.clone()).await;
        assert_eq!(s, 422, "{bad}: {v}");
        assert!(v["message"].as_str().unwrap_or_default().contains("idle_stop_after_s"), "{v}");
    }
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "keep"})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["idle_stop_after_s"], 3600, "the deployment's default");
    let keep = v["data"]["id"].as_str().expect("id").to_string();
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "nap", "gpus": 1})).await;
    assert_eq!(s, 201, "{v}");
    let nap = v["data"]["id"].as_str().expect("id").to_string();
    let nap_port = ports_of(&v["data"])[0];
    let patch = |id: &str, token: &str, body: Value| {
        let (path, token) = (format!("/api/v1/environments/{id}"), token.to_string());
        let ctx = &ctx;
        async move { ctx.call(&ctx.base, Method::PATCH, &path, &token, Some(body)).await }
    };
    let (s, v) = patch(&nap, &alice, json!({"idle_stop_after_s": 9000})).await;
    assert_eq!(s, 422, "{v}");
    let (s, v) = patch(&nap, &alice, json!({"idle_stop_after_s": 2, "name": "renamed"})).await;
    assert_eq!(s, 422, "unknown fields are refused: {v}");
    let (s, v) = patch(&nap, &bob, json!({"idle_stop_after_s": 2})).await;
    assert_eq!(s, 404, "{v}");

    // Two seconds without a connection: the idle task (every second) stops it, revoking and
    // removing its route, with the reason and an audit event; the other one keeps running.
    let (s, v) = patch(&nap, &alice, json!({"idle_stop_after_s": 2})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["idle_stop_after_s"], 2);
    assert!(v["data"]["idle_seconds"].as_u64().is_some(), "{v}");
    let mut stopped = false;
    for _ in 0..150 {
        let (_, v) = ctx.get(&format!("/api/v1/environments/{nap}"), &alice).await;
        // The claim shows "stopped" at once; the reason comes when the stop has finished.
        if v["data"]["status"] == "stopped" && v["data"]["status_reason"].is_string() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stopped, "the idle workspace is still running");
    let (_, v) = ctx.get(&format!("/api/v1/environments/{nap}"), &alice).await;
    let reason = v["data"]["status_reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("idle for ") && reason.contains("no_connections"), "{v}");
    assert!(v["data"].get("idle_seconds").is_none(), "a stopped workspace has no idle clock: {v}");
    assert_eq!(ctx.table().lookup(nap_port, gpugate_routes::now_ms()), Lookup::Absent);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'idle_stopped' AND env_id = $1")
        .bind(&nap)
        .fetch_one(ctx.db().pool())
        .await
        .expect("events");
    assert_eq!(events, 1);
    // Its GPU went back to the inventory with the stop.
    assert_eq!(v["data"]["gpus"], json!([]), "{v}");
    let free: i64 = sqlx::query_scalar("SELECT count(*) FROM gpu_devices WHERE status = 'available'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("gpus");
    assert_eq!(free, 2, "the idle workspace's GPU is free again");
    let metrics = ctx.http.get(format!("{}/metrics", ctx.base)).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("gpugate_idle_stops_total 1"), "{metrics}");
    let (_, v) = ctx.get(&format!("/api/v1/environments/{keep}"), &alice).await;
    assert_eq!(v["data"]["status"], "running", "{v}");

    // Started again, the idle clock starts over: it is not stopped at once.
    let (s, v) = patch(&nap, &alice, json!({"idle_stop_after_s": 60})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = ctx.post(&format!("/api/v1/environments/{nap}/start"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_, v) = ctx.get(&format!("/api/v1/environments/{nap}"), &alice).await;
    assert_eq!(v["data"]["status"], "running", "{v}");
    assert!(v["data"]["idle_seconds"].as_u64().expect("idle_seconds") < 10, "{v}");
    ctx.finish().await;
}
