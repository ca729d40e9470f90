//! Operations finish whatever the client does: a client that hangs up mid-create, a retried
//! create with an Idempotency-Key, a graceful shutdown with a create in flight, and a lost
//! liveness connection.

mod common;

use std::time::Duration;

use common::{eventually, Ctx};
use serde_json::{json, Value};

async fn scalar(ctx: &Ctx, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(ctx.db().pool()).await.expect(sql)
}

/// Waits until no environment is mid-operation (status creating or deleting, or claimed).
async fn settled(ctx: &Ctx) -> bool {
    for _ in 0..300 {
        let busy = scalar(
            ctx,
            "SELECT count(*) FROM environments WHERE status IN ('creating', 'deleting') OR op_instance IS NOT NULL",
        )
        .await;
        if busy == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A create with an Idempotency-Key, optionally abandoned after `timeout`.
async fn post_create(ctx: &Ctx, token: &str, key: Option<&str>, body: Value, timeout: Option<Duration>) -> Result<(u16, Value, bool), reqwest::Error> {
    let mut req = ctx.http.post(format!("{}/api/v1/environments", ctx.base)).bearer_auth(token).json(&body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    if let Some(t) = timeout {
        req = req.timeout(t);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let replayed = resp.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let v: Value = resp.json().await?;
    Ok((status, v, replayed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_create_leaves_a_running_environment_it_can_delete() {
    let mut ctx = Ctx::new("hangup").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    let alice = ctx.token("alice", false).await;
    ctx.start().await;

    for (i, after_ms) in [100u64, 100, 250].into_iter().enumerate() {
        let r = post_create(&ctx, &alice, None, json!({"name": format!("cut{i}"), "gpus": 1}), Some(Duration::from_millis(after_ms))).await;
        assert!(r.is_err(), "the create answered within {after_ms} ms; the test needs it cut mid-way: {r:?}");
        assert!(settled(&ctx).await, "an environment stayed mid-operation after the client hung up");
        // Either a running environment the user can list and delete, or nothing at all.
        let (s, list) = ctx.get("/api/v1/environments", &alice).await;
        assert_eq!(s, 200, "{list}");
        let envs = list["data"].as_array().expect("list").clone();
        assert!(envs.len() <= 1, "{list}");
        if let Some(env) = envs.first() {
            assert_eq!(env["status"], "running", "{env}");
            let id = env["id"].as_str().expect("id");
            assert_eq!(ctx.containers().len(), 1);
            let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
            assert_eq!(s, 200, "delete after a hung-up create: {v}");
        }
        assert!(ctx.containers().is_empty(), "a container is left");
        assert_eq!(scalar(&ctx, "SELECT count(*) FROM port_pool WHERE status = 'allocated'").await, 0);
        assert_eq!(scalar(&ctx, "SELECT count(*) FROM gpu_devices WHERE status = 'allocated'").await, 0);
    }
    // The creates were not undone: they ran to completion after the client left.
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM events WHERE kind = 'container_started'").await, 3);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_with_the_same_idempotency_key_returns_the_same_environment() {
    let mut ctx = Ctx::new("idem").await;
    ctx.cfg.default_services = vec!["ssh".into(), "jupyter".into()];
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    ctx.start().await;
    let body = json!({"name": "train"});

    let (s, first, replayed) = post_create(&ctx, &alice, Some("k-1"), body.clone(), None).await.expect("create");
    assert_eq!((s, replayed), (201, false), "{first}");
    let (s, again, replayed) = post_create(&ctx, &alice, Some("k-1"), body.clone(), None).await.expect("retry");
    assert_eq!((s, replayed), (201, true), "{again}");
    assert_eq!(again["data"]["id"], first["data"]["id"]);
    assert_eq!(again["data"]["ports"], first["data"]["ports"]);
    assert_eq!(again["data"]["status"], "running");
    assert_eq!(ctx.containers().len(), 1, "the retry made a second container");

    // The same key for another request is refused; another user's key is their own.
    let (s, v, _) = post_create(&ctx, &alice, Some("k-1"), json!({"name": "other"}), None).await.expect("reuse");
    assert_eq!((s, v["code"].as_u64()), (422, Some(1002)), "{v}");
    assert!(v["message"].as_str().expect("message").contains("different request"), "{v}");
    let (s, v, replayed) = post_create(&ctx, &bob, Some("k-1"), body.clone(), None).await.expect("bob");
    assert_eq!((s, replayed), (201, false), "{v}");
    assert_ne!(v["data"]["id"], first["data"]["id"]);
    let (s, v, _) = post_create(&ctx, &alice, Some("bad key with spaces"), body.clone(), None).await.expect("bad key");
    assert_eq!((s, v["code"].as_u64()), (422, Some(1002)), "{v}");

    // A client that times out and retries: one environment, the retry answers with it.
    let cut = post_create(&ctx, &alice, Some("k-2"), json!({"name": "cut"}), Some(Duration::from_millis(100))).await;
    assert!(cut.is_err(), "the create answered within 100 ms: {cut:?}");
    let (s, retry, _) = post_create(&ctx, &alice, Some("k-2"), json!({"name": "cut"}), None).await.expect("retry");
    assert_eq!(s, 201, "{retry}");
    assert_eq!(retry["data"]["status"], "running", "{retry}");

    // Two attempts at once with one key: one environment, both answers name it.
    let a = post_create(&ctx, &alice, Some("k-3"), json!({"name": "twin"}), None);
    let b = post_create(&ctx, &alice, Some("k-3"), json!({"name": "twin"}), None);
    let (ra, rb) = tokio::join!(a, b);
    let (ra, rb) = (ra.expect("a"), rb.expect("b"));
    assert_eq!((ra.0, rb.0), (201, 201), "{} {}", ra.1, rb.1);
    assert_eq!(ra.1["data"]["id"], rb.1["data"]["id"]);
    assert_eq!(ra.1["data"]["ports"], rb.1["data"]["ports"]);
    assert!(ra.2 != rb.2, "exactly one of the two is a replay");

    let (_, list) = ctx.get("/api/v1/environments", &alice).await;
    assert_eq!(list["data"].as_array().expect("list").len(), 3, "{list}");
    assert_eq!(ctx.containers().len(), 4);

    // After the environment is deleted the key says so instead of making another.
    let id = first["data"]["id"].as_str().expect("id");
    let (s, _) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 200);
    let (s, v, _) = post_create(&ctx, &alice, Some("k-1"), body.clone(), None).await.expect("after delete");
    assert_eq!((s, v["code"].as_u64()), (409, Some(1006)), "{v}");
    assert!(v["message"].as_str().expect("message").contains("deleted"), "{v}");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_a_create_in_flight_with_its_routes_live() {
    let mut ctx = Ctx::new("drain").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let url = format!("{}/api/v1/environments", ctx.base);
    let http = ctx.http.clone();
    let token = alice.clone();
    let call = tokio::spawn(async move {
        let r = http.post(url).bearer_auth(token).json(&json!({"name": "late"})).send().await.expect("send");
        (r.status().as_u16(), r.json::<Value>().await.expect("json"))
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    ctx.stop().await;
    let (s, v) = call.await.expect("task");
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["status"], "running");
    assert_eq!(v["data"]["routes_live"], true, "the publisher stopped before the create finished");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM environments WHERE status = 'running' AND op_instance IS NULL").await, 1);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_liveness_lock_is_taken_again_after_its_connection_drops() {
    let mut ctx = Ctx::new("liveness").await;
    ctx.start().await;
    let st = ctx.running.as_ref().and_then(|r| r.state.clone()).expect("state");
    assert!(st.liveness.holding());
    assert!(gpugate_api::db::instance_alive(ctx.db(), st.instance).await.expect("alive"));
    // Kill the server session that holds the lock.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
         WHERE locktype = 'advisory' AND granted AND classid::bigint = 1735423335 AND objid::bigint = $1",
    )
    .bind(st.instance)
    .fetch_one(ctx.db().pool())
    .await
    .expect("terminate");
    assert_eq!(killed, 1);
    let db = ctx.db().clone();
    let instance = st.instance;
    let mut back = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if st.liveness.holding() && gpugate_api::db::instance_alive(&db, instance).await.unwrap_or(false) {
            back = true;
            break;
        }
    }
    assert!(back, "the liveness lock was not taken again within 10 s");
    assert!(eventually(Duration::from_secs(1), || st.liveness.holding()).await);
    ctx.finish().await;
}
