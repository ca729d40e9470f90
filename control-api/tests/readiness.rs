//! Per-service readiness through real containers and real clients: `wait: ready` answers when
//! a login works (the first OpenSSH login succeeds, no retry), a service that never answers is
//! reported at its deadline while the others are ready, probing stops for stopped and deleted
//! workspaces and starts again with a start, and the probes of a dead instance are taken over.
//!
//! The image is the isolation image: dropbear (a real SSH server) on 22 and busybox httpd on
//! 8888 (the Jupyter port); nothing listens on 8080 (the code port), where Docker's port proxy
//! accepts and closes — what a workspace whose editor has not started looks like.

mod common;

use std::time::{Duration, Instant};

use common::{ssh_login, Ctx, ISO_IMAGE};
use serde_json::{json, Value};

/// The published host port of `container_port` of the test's one container.
fn published_port(ctx: &Ctx, container_port: u16) -> u16 {
    let cs = ctx.containers();
    assert_eq!(cs.len(), 1, "{cs:?}");
    common::published(&ctx.inspect(&cs[0]), container_port).port()
}

/// The value of the counter line `name{labels}` in a metrics text (0 when absent).
fn counter(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn metrics(ctx: &Ctx) -> String {
    ctx.http.get(format!("{}/metrics", ctx.base)).send().await.expect("metrics").text().await.expect("text")
}

async fn events(ctx: &Ctx, id: &str, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE env_id = $1 AND kind = $2")
        .bind(id)
        .bind(kind)
        .fetch_one(ctx.db().pool())
        .await
        .expect("events")
}

const CODE_PROBES: &str = "gpugate_readiness_probes_total{result=\"not_ready\",service=\"code\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_ready_answers_when_a_login_works_and_reports_the_service_that_never_answers() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("ready_wait").await;
    ctx.cfg.readiness.code_deadline_s = 3;
    ctx.cfg.readiness.max_backoff_ms = 300;
    let (key, public) = common::keypair(&ctx);
    let alice = ctx.token("alice", false).await;
    ctx.start().await;

    let body = json!({"name": "r", "image": ISO_IMAGE, "services": ["ssh", "jupyter", "code"], "ssh_public_keys": [public], "wait": "ready"});
    let t = Instant::now();
    let (s, v) = ctx.post("/api/v1/environments", &alice, body).await;
    let took = t.elapsed();
    assert_eq!(s, 201, "{v}");
    let env = &v["data"];
    let id = env["id"].as_str().expect("id").to_string();
    assert_eq!(env["status"], "running");
    // The answer came after the code editor's deadline (it waited), not long after it.
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(12), "create with wait: ready took {took:?}");

    // The first login works: no retry.
    assert!(ssh_login(published_port(&ctx, 22), &key), "the first SSH login after wait: ready failed");
    // The first HTTP request to the Jupyter port answers.
    let jupyter = published_port(&ctx, 8888);
    let r = reqwest::get(format!("http://127.0.0.1:{jupyter}/")).await.expect("first HTTP request");
    assert_eq!(r.status(), 200);

    let rd = &env["readiness"];
    assert_eq!(rd["ssh"]["ready"], true, "{rd}");
    assert!(rd["ssh"]["ready_at"].is_string(), "{rd}");
    assert!(rd["ssh"].get("not_ready_reason").is_none(), "{rd}");
    assert_eq!(rd["jupyter"]["ready"], true, "{rd}");
    assert_eq!(rd["code"]["ready"], false, "{rd}");
    assert!(rd["code"]["ready_at"].is_null(), "{rd}");
    let why = rd["code"]["not_ready_reason"].as_str().expect("reason");
    assert!(why.contains("no HTTP answer within 3 s") && why.contains("closed without an answer"), "{why}");
    assert_eq!(env["ready"], false, "one service is not ready: {env}");

    // Reported once (event and metric), and not probed any more.
    assert_eq!(events(&ctx, &id, "service_not_ready").await, 1);
    assert_eq!(events(&ctx, &id, "service_ready").await, 2);
    let m = metrics(&ctx).await;
    assert_eq!(counter(&m, "gpugate_services_not_ready_total{service=\"code\"}"), 1.0, "{m}");
    assert_eq!(counter(&m, "gpugate_service_ready_seconds_count{service=\"ssh\"}"), 1.0, "{m}");
    assert_eq!(counter(&m, "gpugate_service_ready_seconds_count{service=\"jupyter\"}"), 1.0, "{m}");
    let probes = counter(&m, CODE_PROBES);
    assert!(probes >= 2.0, "{m}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(counter(&metrics(&ctx).await, CODE_PROBES), probes, "a service given up on is probed again");

    // The workspace keeps running, and GET shows the same.
    let (s, g) = ctx.get(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 200);
    assert_eq!(g["data"]["status"], "running");
    assert_eq!(g["data"]["readiness"], *rd);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_wait_the_create_answers_at_once_and_readiness_follows() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("ready_poll").await;
    ctx.cfg.readiness.code_deadline_s = 30;
    let (_, public) = common::keypair(&ctx);
    let alice = ctx.token("alice", false).await;
    ctx.start().await;

    let body = json!({"name": "r", "image": ISO_IMAGE, "services": ["ssh", "code"], "ssh_public_keys": [public]});
    let t = Instant::now();
    let (s, v) = ctx.post("/api/v1/environments", &alice, body).await;
    assert_eq!(s, 201, "{v}");
    assert!(t.elapsed() < Duration::from_secs(10), "a create without wait waited {:?}", t.elapsed());
    let id = v["data"]["id"].as_str().expect("id").to_string();
    assert_eq!(v["data"]["ready"], false, "{v}");
    let why = v["data"]["readiness"]["code"]["not_ready_reason"].as_str().expect("reason");
    assert!(why.starts_with("waiting for an HTTP answer"), "{why}");

    // SSH becomes ready on its own; the code editor keeps waiting, with the last probe's error.
    let deadline = Instant::now() + Duration::from_secs(20);
    let env: Value = loop {
        let (_, g) = ctx.get(&format!("/api/v1/environments/{id}"), &alice).await;
        if g["data"]["readiness"]["ssh"]["ready"] == true {
            break g["data"].clone();
        }
        assert!(Instant::now() < deadline, "ssh never became ready: {g}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(env["ready"], false);
    let why = env["readiness"]["code"]["not_ready_reason"].as_str().expect("reason");
    assert!(why.contains("last probe: connection closed without an answer"), "{why}");

    // A bad wait is a 422 naming the choices; nothing is created.
    let (s, e) = ctx.post("/api/v1/environments", &alice, json!({"name": "x", "wait": "forever"})).await;
    assert_eq!(s, 422, "{e}");
    assert!(e["message"].as_str().expect("message").contains("ready"), "{e}");
    let (s, e) = ctx.post("/api/v1/environments?wait=soon", &alice, json!({"name": "x"})).await;
    assert_eq!(s, 422, "{e}");
    let (s, e) = ctx.post("/api/v1/environments", &alice, json!({"name": "x", "wait": -58800})).await;
    assert_eq!(s, 422, "a well-formed body with a bad value: {e}");
    let (s, e) = ctx.post(&format!("/api/v1/environments/{id}/start"), &alice, json!({"wait": {"a": 1}})).await;
    assert_eq!(s, 422, "{e}");
    let (s, e) = ctx.post("/api/v1/environments?wait=routes", &alice, json!({"name": "x", "wait": "ready"})).await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(ctx.containers().len(), 1);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_delete_end_probing_and_start_probes_again() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("ready_stop").await;
    ctx.cfg.readiness.code_deadline_s = 4;
    ctx.cfg.readiness.max_backoff_ms = 200;
    let (key, public) = common::keypair(&ctx);
    let alice = ctx.token("alice", false).await;
    ctx.start().await;

    let body = json!({"name": "r", "image": ISO_IMAGE, "services": ["ssh", "code"], "ssh_public_keys": [public]});
    let (s, v) = ctx.post("/api/v1/environments", &alice, body.clone()).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();

    // Stopped while the code editor is still being probed: the probing ends.
    let (s, st) = ctx.post(&format!("/api/v1/environments/{id}/stop"), &alice, json!({})).await;
    assert_eq!(s, 200, "{st}");
    assert_eq!(st["data"]["ready"], false);
    assert_eq!(st["data"]["readiness"]["ssh"]["not_ready_reason"], "the environment is stopped");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = counter(&metrics(&ctx).await, CODE_PROBES);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(counter(&metrics(&ctx).await, CODE_PROBES), before, "a stopped workspace is still probed");
    assert_eq!(events(&ctx, &id, "service_not_ready").await, 0, "a stopped workspace was reported not ready");
    // (SSH may or may not have answered before the stop.)
    let ssh_ready = events(&ctx, &id, "service_ready").await;

    // Start with ?wait=ready: readiness from scratch for the new container.
    let (s, st) = ctx.post(&format!("/api/v1/environments/{id}/start?wait=ready"), &alice, json!({})).await;
    assert_eq!(s, 200, "{st}");
    assert_eq!(st["data"]["readiness"]["ssh"]["ready"], true, "{st}");
    assert!(ssh_login(published_port(&ctx, 22), &key), "the first SSH login after start?wait=ready failed");
    let why = st["data"]["readiness"]["code"]["not_ready_reason"].as_str().expect("reason");
    assert!(why.contains("no HTTP answer within 4 s"), "{why}");
    assert!(counter(&metrics(&ctx).await, CODE_PROBES) > before, "the start did not probe again");
    assert_eq!(events(&ctx, &id, "service_ready").await, ssh_ready + 1, "ssh ready once more after the start");

    // A second environment, deleted while its code editor is probed: no probe afterwards.
    let (s, v) = ctx.post("/api/v1/environments", &alice, body).await;
    assert_eq!(s, 201, "{v}");
    let id2 = v["data"]["id"].as_str().expect("id").to_string();
    let (s, d) = ctx.delete(&format!("/api/v1/environments/{id2}"), &alice).await;
    assert_eq!(s, 200, "{d}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = counter(&metrics(&ctx).await, CODE_PROBES);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(counter(&metrics(&ctx).await, CODE_PROBES), before, "a deleted workspace is still probed");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM service_readiness WHERE env_id = $1")
        .bind(&id2)
        .fetch_one(ctx.db().pool())
        .await
        .expect("rows");
    assert_eq!(rows, 0);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_of_a_dead_instance_are_taken_over() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("ready_takeover").await;
    let (_, public) = common::keypair(&ctx);
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let body = json!({"name": "r", "image": ISO_IMAGE, "services": ["ssh"], "ssh_public_keys": [public], "wait": "ready"});
    let (s, v) = ctx.post("/api/v1/environments", &alice, body).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["ready"], true, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let state = ctx.running.as_ref().and_then(|r| r.state.clone()).expect("in-process state");

    // As if the instance that started it had died before the answer: undecided, probed by an
    // instance whose liveness lock nobody holds. (Then as after the migration: by nobody.)
    for prober in [Some(2_000_000_001_i64), None] {
        sqlx::query("UPDATE service_readiness SET ready_at = NULL, prober = $2 WHERE env_id = $1")
            .bind(&id)
            .bind(prober)
            .execute(ctx.db().pool())
            .await
            .expect("update");
        assert_eq!(state.readiness.resume().await.expect("resume"), 1, "prober {prober:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (ready, by): (bool, Option<i64>) =
                sqlx::query_as("SELECT ready_at IS NOT NULL, prober FROM service_readiness WHERE env_id = $1")
                    .bind(&id)
                    .fetch_one(ctx.db().pool())
                    .await
                    .expect("row");
            if ready {
                assert_eq!(by, Some(state.instance), "taken over by this instance");
                break;
            }
            assert!(Instant::now() < deadline, "the taken-over probe never decided");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(state.readiness.resume().await.expect("resume"), 0, "nothing left to take");
    }
    ctx.finish().await;
}
