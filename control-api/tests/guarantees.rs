//! The failure guarantees, each on the defect it guards: a create whose claim was taken over
//! changes nothing more (fencing); a failed workspace starts again over its home; placement
//! under contention answers no 500; another tenant's id is a 404 even while its owner's
//! operation runs; failed authentications are limited per address while a valid token from
//! that address is not; a process whose engine is not the one its host name records refuses
//! to start; old events are purged; a host whose engine hangs costs one time-out, not the API;
//! a reconcile pass re-checks a container by id and goes on past one workspace's error; a
//! delete whose home volume is still held answers 503 and is finished by the reconciler; a
//! status write the transition table does not allow changes nothing.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, Ctx};
use gpugate_api::db::envs::{self, Status};
use serde_json::{json, Value};

async fn scalar(ctx: &Ctx, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(ctx.db().pool()).await.expect(sql)
}

async fn status_of(ctx: &Ctx, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM environments WHERE id = $1")
        .bind(id)
        .fetch_one(ctx.db().pool())
        .await
        .expect("status")
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill {sig} {pid}");
}

/// D1: process A pauses a create just before it commits its routes; its liveness connection
/// is terminated while it is frozen, process B's reconciler takes the row over and undoes the
/// create; A then resumes. Fenced, A changes nothing more: the create fails, the environment
/// stays deleted, no route and no port is left to it, no container of it runs. Without the
/// fence, A's commit turned the deleted row back into `running` and routed ports that were
/// free again (for another tenant's next create).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_claim_was_taken_over_changes_nothing_more() {
    let mut ctx = Ctx::new("fence_create").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    let (a, base_a) = ctx.spawn(&["serve"], &[("GPUGATE_FAULT", "sleep:before_routes_commit:4000")]);
    let (_, base_b) = ctx.spawn(&["serve", "--no-publisher"], &[]);
    ctx.wait_healthy(&base_a).await;
    ctx.wait_healthy(&base_b).await;

    let http = ctx.http.clone();
    let url = format!("{base_a}/api/v1/environments");
    let token = alice.clone();
    let create = tokio::spawn(async move {
        let r = http.post(url).bearer_auth(token).json(&json!({"name": "fenced"})).send().await.expect("create");
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.expect("json"))
    });
    // A is inside the pause (before its routes commit) once its container runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (id, instance) = loop {
        let row: Option<(String, Option<i64>, String)> = sqlx::query_as(
            "SELECT id, op_instance, container_id FROM environments WHERE status = 'creating' AND container_id IS NOT NULL",
        )
        .fetch_optional(ctx.db().pool())
        .await
        .expect("row");
        if let Some((id, Some(op), c)) = row {
            if ctx.inspect(&c)["State"]["Running"] == true {
                break (id, op);
            }
        }
        assert!(Instant::now() < deadline, "the create never reached its pause");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(ctx.pid(a), "-STOP");
    // A's liveness lock goes with its connection; frozen, A cannot take it again.
    let terminated = scalar(
        &ctx,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 2 AND objid::bigint = {}",
            instance as u32
        ),
    )
    .await;
    if terminated != 1 {
        let locks: Vec<(Option<i64>, Option<i64>, i16, Option<i32>)> = sqlx::query_as(
            "SELECT classid::bigint, objid::bigint, objsubid, pid FROM pg_locks WHERE locktype = 'advisory' AND granted",
        )
        .fetch_all(ctx.db().pool())
        .await
        .expect("locks");
        panic!("A's liveness session (instance {instance}, pid {}): {terminated} terminated; advisory locks held: {locks:?}", ctx.pid(a));
    }
    let (s, v) = ctx.call(&base_b, reqwest::Method::POST, "/api/v1/admin/reconcile", &admin, None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["creates_undone"], 1, "B undid A's create: {v}");
    assert_eq!(status_of(&ctx, &id).await, "deleted");
    signal(ctx.pid(a), "-CONT");

    let (s, v) = tokio::time::timeout(Duration::from_secs(60), create).await.expect("answered").expect("task");
    assert_ne!(s, 201, "a fenced create must not succeed: {v}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status_of(&ctx, &id).await, "deleted", "A turned the undone environment back");
    let routes = scalar(&ctx, &format!("SELECT count(*) FROM routes WHERE env_id = '{id}'")).await;
    assert_eq!(routes, 0, "A routed ports after losing its claim");
    let ports = scalar(&ctx, &format!("SELECT count(*) FROM port_pool WHERE env_id = '{id}'")).await;
    assert_eq!(ports, 0, "ports still held by the undone create");
    assert!(
        eventually(Duration::from_secs(10), || !ctx.containers().iter().any(|c| c.contains(&id))).await,
        "a container of the undone create is left: {:?}",
        ctx.containers()
    );
    ctx.finish().await;
}

/// D2: a workspace whose container vanished is `failed`; a start recovers it over the same
/// home volume (before: 409 "it is failed", and only a delete, which removes the home).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_workspace_starts_again_over_its_home() {
    let mut ctx = Ctx::new("recover_failed").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "precious"})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let container: String = sqlx::query_scalar("SELECT container_id FROM environments WHERE id = $1")
        .bind(&id)
        .fetch_one(ctx.db().pool())
        .await
        .expect("container");
    ctx.exec(&container, &["sh", "-c", "echo kept > /home/remotegpu/notes.txt"]);
    let gone = std::process::Command::new("docker").args(["rm", "-f", &container]).status().expect("docker rm");
    assert!(gone.success());
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(status_of(&ctx, &id).await, "failed");

    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/start"), &alice, json!({})).await;
    assert_eq!(s, 200, "a failed workspace must start again: {v}");
    assert_eq!(v["data"]["status"], "running", "{v}");
    let container: String = sqlx::query_scalar("SELECT container_id FROM environments WHERE id = $1")
        .bind(&id)
        .fetch_one(ctx.db().pool())
        .await
        .expect("container");
    let notes = ctx.exec(&container, &["cat", "/home/remotegpu/notes.txt"]);
    assert_eq!(notes.trim(), "kept", "the home's files survive the recovery");
    ctx.finish().await;
}

/// D5: ten users create at once on a host with an environment limit of two. Placement took a
/// key-share lock and upgraded it, so two creates deadlocked and one got a 500. Now every
/// answer is 201 or a clean refusal, and the limit holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_on_a_limited_host_get_no_500() {
    let mut ctx = Ctx::new("placement_contention").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.start().await;
    sqlx::query("UPDATE hosts SET max_environments = 2").execute(ctx.db().pool()).await.expect("limit");
    let mut tokens = vec![];
    for i in 0..10 {
        tokens.push(ctx.token(&format!("user{i}"), false).await);
    }
    let mut tasks = vec![];
    for (i, t) in tokens.into_iter().enumerate() {
        let http = ctx.http.clone();
        let url = format!("{}/api/v1/environments", ctx.base);
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).bearer_auth(t).json(&json!({"name": format!("c{i}")})).send().await.expect("create");
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }));
    }
    let mut created = 0;
    for t in tasks {
        let (s, body) = t.await.expect("task");
        assert!(matches!(s, 201 | 409 | 503), "create answered {s}: {body}");
        created += usize::from(s == 201);
    }
    assert!(created >= 1 && created <= 2, "{created} created on a host limited to 2");
    let live = scalar(&ctx, "SELECT count(*) FROM environments WHERE status IN ('creating', 'running')").await;
    assert_eq!(live, created as i64);
    ctx.finish().await;
}

/// D17: while the owner's operation runs, another tenant's stop of that id is a 404 (before:
/// 409 "busy", which told the id exists and made the owner's next call fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_id_is_unknown_even_while_its_owner_operates() {
    let mut ctx = Ctx::new("busy_oracle").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.fault = Some("sleep:before_routes_commit:3000".into());
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let mallory = ctx.token("mallory", false).await;
    let http = ctx.http.clone();
    let url = format!("{}/api/v1/environments", ctx.base);
    let token = alice.clone();
    let create = tokio::spawn(async move {
        http.post(url).bearer_auth(token).json(&json!({"name": "busy"})).send().await.expect("create").status().as_u16()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let id = loop {
        let id: Option<String> = sqlx::query_scalar("SELECT id FROM environments WHERE status = 'creating'")
            .fetch_optional(ctx.db().pool())
            .await
            .expect("row");
        if let Some(id) = id {
            break id;
        }
        assert!(Instant::now() < deadline, "no create in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for verb in ["stop", "start"] {
        let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/{verb}"), &mallory, json!({})).await;
        assert_eq!(s, 404, "{verb} of another tenant's busy id: {v}");
    }
    let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &mallory).await;
    assert_eq!(s, 404, "delete of another tenant's busy id: {v}");
    assert_eq!(create.await.expect("task"), 201, "the owner's create was disturbed");
    ctx.finish().await;
}

/// D12: made-up tokens from one address are answered 429 once the address has used its
/// allowance (before: each got a fresh bucket, so a flood was never limited), and a valid
/// token from the same address still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_per_address_but_valid_tokens_pass() {
    let mut ctx = Ctx::new("auth_flood").await;
    ctx.cfg.rate_limit.failed_auth_per_minute = 60;
    ctx.cfg.rate_limit.failed_auth_burst = 10;
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let mut limited = 0;
    for i in 0..40 {
        let r = ctx
            .http
            .get(format!("{}/api/v1/environments", ctx.base))
            .bearer_auth(format!("made-up-{i}"))
            .send()
            .await
            .expect("request");
        match r.status().as_u16() {
            401 => {}
            429 => {
                limited += 1;
                assert!(r.headers().contains_key("retry-after"));
            }
            other => panic!("made-up token answered {other}"),
        }
    }
    assert!(limited >= 25, "only {limited} of 40 made-up tokens were limited");
    let (s, v) = ctx.get("/api/v1/environments", &alice).await;
    assert_eq!(s, 200, "a valid token from the flooding address: {v}");
    ctx.finish().await;
}

/// D11: a host row records its engine's ID; a process whose engine answers with another ID
/// refuses to start for that host name, naming both (before: two engines under one name
/// failed each other's workspaces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_engine_is_not_its_hosts_refuses_to_start() {
    let mut ctx = Ctx::new("engine_identity").await;
    ctx.start().await;
    let recorded: Option<String> = sqlx::query_scalar("SELECT engine_id FROM hosts WHERE name = $1")
        .bind(&ctx.cfg.fleet.host_name)
        .fetch_one(ctx.db().pool())
        .await
        .expect("row");
    assert!(recorded.as_deref().is_some_and(|e| !e.is_empty()), "the engine ID is recorded: {recorded:?}");
    ctx.stop().await;
    sqlx::query("UPDATE hosts SET engine_id = 'ANOTHER:ENGINE' WHERE name = $1")
        .bind(&ctx.cfg.fleet.host_name)
        .execute(ctx.db().pool())
        .await
        .expect("update");
    let err = gpugate_api::app::start(ctx.cfg.clone(), gpugate_api::app::Mode::Api { publisher: false })
        .await
        .err()
        .map(|e| format!("{e:#}"))
        .expect("refused");
    assert!(err.contains("ANOTHER:ENGINE") && err.contains(recorded.as_deref().unwrap_or("?")), "{err}");
    // Forgotten by the operator (a rebuilt host): the next start records the engine again.
    let (ok, _, stderr) = ctx.cli(&["host", "forget-engine", &ctx.cfg.fleet.host_name.clone()]);
    assert!(ok, "{stderr}");
    ctx.start().await;
    ctx.finish().await;
}

/// D13: events and deleted environments older than the retention go at the next reconcile
/// pass; recent ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_and_deleted_rows_are_purged_and_recent_ones_kept() {
    let mut ctx = Ctx::new("retention").await;
    ctx.cfg.retention_days = 30;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.start().await;
    let admin = ctx.token("root", true).await;
    let alice = ctx.token("alice", false).await;
    // Two deleted environments: one deleted past the retention, one lately.
    let mut gone = vec![];
    for name in ["gone-long-ago", "gone-lately"] {
        let (s, v) = ctx.post("/api/v1/environments", &alice, json!({ "name": name })).await;
        assert_eq!(s, 201, "{v}");
        let id = v["data"]["id"].as_str().expect("id").to_string();
        let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
        assert_eq!(s, 200, "{v}");
        gone.push(id);
    }
    sqlx::query("UPDATE environments SET deleted_at = now() - interval '31 days' WHERE id = $1")
        .bind(&gone[0])
        .execute(ctx.db().pool())
        .await
        .expect("age");
    for i in 0..5 {
        ctx.db().event(None, "old", json!({ "i": i })).await.expect("event");
    }
    sqlx::query("UPDATE events SET at = now() - interval '31 days' WHERE kind = 'old'")
        .execute(ctx.db().pool())
        .await
        .expect("age");
    ctx.db().event(None, "recent", json!({})).await.expect("event");
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM events WHERE kind = 'old'").await, 0);
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM events WHERE kind = 'recent'").await, 1);
    let rows = |id: &str| format!("SELECT count(*) FROM environments WHERE id = '{id}'");
    assert_eq!(scalar(&ctx, &rows(&gone[0])).await, 0, "a deleted environment past the retention is kept");
    assert_eq!(scalar(&ctx, &rows(&gone[1])).await, 1, "a lately deleted environment is purged");
    ctx.finish().await;
}

/// D7: a start on a host that is not up is refused, naming the host, and changes nothing (a
/// host that is down may still run the old container with the old GPUs); once the host is up
/// again the same start succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_host_that_is_not_up_is_refused() {
    let mut ctx = Ctx::new("start_host_down").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    // One probe at start, then none during the test: the health written below stays.
    ctx.cfg.fleet.probe_interval_s = 600;
    ctx.cfg.fleet.fail_after_s = 1200;
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "parked"})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/stop"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let host = ctx.cfg.fleet.host_name.clone();
    sqlx::query("UPDATE hosts SET health = 'down', down_since = now() WHERE name = $1")
        .bind(&host)
        .execute(ctx.db().pool())
        .await
        .expect("down");
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/start"), &alice, json!({})).await;
    assert_eq!(s, 409, "a start on a down host: {v}");
    assert!(v["message"].as_str().unwrap_or("").contains(&format!("host {host} is down")), "{v}");
    assert_eq!(status_of(&ctx, &id).await, "stopped", "a refused start changes nothing");
    let held = scalar(&ctx, &format!("SELECT count(*) FROM gpu_devices WHERE env_id = '{id}'")).await;
    assert_eq!(held, 0);
    sqlx::query("UPDATE hosts SET health = 'up', down_since = NULL WHERE name = $1")
        .bind(&host)
        .execute(ctx.db().pool())
        .await
        .expect("up");
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/start"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    ctx.finish().await;
}

/// D18: a schema with a migration newer than this binary (a replica already upgraded) does not
/// stop an API or a gateway's publisher from starting (before: sqlx refused with "migration
/// ... was previously applied but is missing in the resolved migrations").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_schema_does_not_stop_older_processes() {
    let mut ctx = Ctx::new("rolling_upgrade").await;
    ctx.start().await;
    ctx.stop().await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101000000, 'from a newer release', true, '\\x00'::bytea, 1)",
    )
    .execute(ctx.db().pool())
    .await
    .expect("a newer migration");
    ctx.start().await;
    let (_, base) = ctx.spawn(&["publish"], &[]);
    ctx.wait_healthy(&base).await;
    ctx.finish().await;
}

/// A Docker engine that accepts connections and never answers (a frozen daemon behind a live
/// socket): every accepted connection is held open, unread, until the test ends.
fn hung_engine() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut held = vec![];
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    addr
}

/// D6: a host whose engine hangs cannot take the API down. 25 creates placed on such a host
/// (it was just added, so nothing has probed it yet) each answer a 503 within about one Docker
/// time-out, not one time-out per create queued behind the others; meanwhile the API answers
/// other requests at once, and the failed creates leave no port, GPU or row behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_engine_hangs_cannot_take_the_api_down() {
    let mut ctx = Ctx::new("hung_engine").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.docker.call_timeout_s = 3;
    ctx.cfg.database_max_connections = 6;
    ctx.start().await;
    let admin = ctx.token("root", true).await;
    let engine = hung_engine();
    let host = json!({"name": "frozen", "docker_endpoint": format!("http://{engine}"), "upstream_address": "127.0.0.6"});
    let (s, v) = ctx.post("/api/v1/admin/hosts", &admin, host).await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = ctx.post("/api/v1/admin/hosts/local/drain", &admin, json!({})).await;
    assert_eq!(s, 200);
    let mut tokens = vec![];
    for i in 0..5 {
        tokens.push(ctx.token(&format!("user{i}"), false).await);
    }
    let begun = Instant::now();
    let mut tasks = vec![];
    for i in 0..25 {
        let http = ctx.http.clone();
        let url = format!("{}/api/v1/environments", ctx.base);
        let token = tokens[i % tokens.len()].clone();
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).bearer_auth(token).json(&json!({"name": format!("h{i}")})).send().await.expect("create");
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default(), begun.elapsed())
        }));
    }
    // While they hang on the engine, the API answers: a list, a health check, an admin view.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        let t = Instant::now();
        let (s, v) = ctx.get("/api/v1/environments", &tokens[0]).await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = ctx.get("/api/v1/admin/hosts", &admin).await;
        assert_eq!(s, 200, "{v}");
        let r = ctx.http.get(format!("{}/healthz", ctx.base)).send().await.expect("healthz");
        assert!(r.status().is_success(), "healthz {}", r.status());
        assert!(t.elapsed() < Duration::from_secs(1), "the API took {:?} to answer while creates hung", t.elapsed());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (s, body, took) = t.await.expect("task");
        assert_eq!(s, 503, "a create on a hung host answered {s}: {body}");
        slowest = slowest.max(took);
    }
    // One time-out for the connect that failed, the rest failed with it, plus each user's
    // queue of five: far below 25 time-outs in a row.
    println!("the last of 25 creates on a hung engine answered after {slowest:?}");
    assert!(slowest < Duration::from_secs(20), "the last create answered after {slowest:?}");
    assert_eq!(scalar(&ctx, "SELECT count(*) FROM port_pool WHERE status = 'allocated'").await, 0, "ports left to failed creates");
    assert_eq!(
        scalar(&ctx, "SELECT count(*) FROM environments WHERE status NOT IN ('deleted', 'failed')").await,
        0,
        "a failed create left a live row"
    );
    ctx.finish().await;
}

/// D10: a reconcile pass lists the engine's containers, then reads the environments. A create
/// that makes its container between the two is `running` with a container the listing did
/// not have. The pass asks the engine for that container by id before it fails anything, so
/// the new workspace stays running (before: failed, "container vanished", right after its
/// create answered 201).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_pass_does_not_fail_a_workspace_created_while_it_ran() {
    let mut ctx = Ctx::new("reconcile_recheck").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.reconcile_interval_s = 3600;
    ctx.cfg.fault = Some("sleep:reconcile_listed:6000".into());
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    // The start-up pass is over once nothing pauses any more (its pause has passed).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let http = ctx.http.clone();
    let url = format!("{}/api/v1/admin/reconcile", ctx.base);
    let pass = tokio::spawn(async move {
        let r = http.post(url).bearer_auth(admin).json(&json!({})).send().await.expect("reconcile");
        (r.status().as_u16(), r.json::<Value>().await.expect("json"))
    });
    // Inside the pause: the containers are listed, the environments not yet read.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let begun = Instant::now();
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "late"})).await;
    assert_eq!(s, 201, "{v}");
    assert!(begun.elapsed() < Duration::from_secs(5), "the create ended after the pause: the test proves nothing");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let (s, v) = pass.await.expect("task");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["environments_failed"], 0, "the pass failed the new workspace: {v}");
    assert_eq!(status_of(&ctx, &id).await, "running");
    ctx.finish().await;
}

/// D21: an error while reconciling one environment is counted and logged, and the pass goes
/// on to the others: here the repair of "broken" fails (injected), and "fine", whose container
/// vanished like broken's, is still marked failed in the same pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconcile_error_on_one_workspace_does_not_stop_the_pass() {
    let mut ctx = Ctx::new("reconcile_errors").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.reconcile_interval_s = 3600;
    ctx.cfg.fault = Some("fail:reconcile_env:broken".into());
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    let mut ids = vec![];
    for name in ["broken", "fine"] {
        let (s, v) = ctx.post("/api/v1/environments", &alice, json!({ "name": name })).await;
        assert_eq!(s, 201, "{v}");
        let id = v["data"]["id"].as_str().expect("id").to_string();
        let container: Option<String> = sqlx::query_scalar("SELECT container_id FROM environments WHERE id = $1")
            .bind(&id)
            .fetch_one(ctx.db().pool())
            .await
            .expect("container");
        let container = container.unwrap_or_else(|| panic!("{name} has no container"));
        let out = std::process::Command::new("docker").args(["rm", "-f", &container]).output().expect("docker rm");
        assert!(out.status.success(), "docker rm: {}", String::from_utf8_lossy(&out.stderr));
        ids.push(id);
    }
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["errors"], 1, "{v}");
    assert_eq!(v["data"]["environments_failed"], 1, "the pass stopped at the error: {v}");
    assert_eq!(status_of(&ctx, &ids[0]).await, "running", "the environment whose repair failed is left for the next pass");
    assert_eq!(status_of(&ctx, &ids[1]).await, "failed");
    ctx.metrics_with(&ctx.base, &["gpugate_reconcile_errors_total 1"]).await;
    ctx.finish().await;
}

/// Found by the fault test (seed 936751541): a delete answered 500 when its home volume was
/// still held by a container the engine had not finished with (one whose removal it carried
/// on after a timed-out call, or one a queued create made after the listing). Here a container
/// outside the deployment's listing holds the home volume: the delete answers 503 naming the
/// volume, the workspace stays `deleting` with no route, and once the volume is free the
/// reconciler finishes the delete and the volume is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_whose_home_is_still_held_answers_503_and_finishes_later() {
    let mut ctx = Ctx::new("delete_volume_busy").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.reconcile_interval_s = 3600;
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "held"})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let volume = format!("gpugate-{}-{id}-home", ctx.deployment);
    // Labelled with the deployment (so the test's clean-up removes it) but not as managed:
    // the API's listing does not see it.
    let holder = format!("{}-holder", ctx.deployment);
    let label = format!("gpugate.deployment={}", ctx.deployment);
    let out = std::process::Command::new("docker")
        .args(["run", "-d", "--name", &holder, "--label", &label, "-v", &format!("{volume}:/held"), common::IMAGE])
        .output()
        .expect("docker run");
    assert!(out.status.success(), "docker run: {}", String::from_utf8_lossy(&out.stderr));

    let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 503, "a volume still in use is the engine being busy, not a bug: {v}");
    assert!(v["message"].as_str().unwrap_or("").contains("still in use"), "{v}");
    assert_eq!(status_of(&ctx, &id).await, "deleting");
    let routed = scalar(&ctx, &format!("SELECT count(*) FROM routes WHERE env_id = '{id}'")).await;
    assert_eq!(routed, 0, "the routes left before the container");

    let gone = std::process::Command::new("docker").args(["rm", "-f", &holder]).output().expect("docker rm");
    assert!(gone.status.success());
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(status_of(&ctx, &id).await, "deleted");
    let left = std::process::Command::new("docker").args(["volume", "inspect", &volume]).output().expect("docker volume");
    assert!(!left.status.success(), "the home volume is removed once free");
    ctx.finish().await;
}

/// The lifecycle's statuses move only along the table in `db/env_status.rs`, and the database
/// enforces it: an operation that settles its environment into a status it may not reach from
/// the one it is in (a stale or mistaken caller: `stopping` straight back to `running`)
/// changes nothing and keeps its claim; a claim asking for a move the table lacks is an error
/// before any SQL runs; the allowed settle then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_write_the_transition_table_does_not_allow_changes_nothing() {
    let mut ctx = Ctx::new("status_moves").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "moves"})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let db = ctx.db().clone();
    let me = 987_654;

    let held = envs::claim(&db, &id, None, &[Status::Running], Status::Stopping, me)
        .await
        .expect("claim")
        .expect("a running environment is claimed for a stop");
    let epoch = held.op_epoch.expect("the claim's epoch");
    assert_eq!(held.status, Status::Stopping);

    let moved = envs::settle(db.pool(), &id, epoch, Status::Running, None, None).await.expect("settle");
    assert!(!moved, "stopping -> running is not in the table, yet the settle wrote it");
    assert_eq!(status_of(&ctx, &id).await, "stopping");
    let still: Option<i64> = sqlx::query_scalar("SELECT op_epoch FROM environments WHERE id = $1")
        .bind(&id)
        .fetch_one(db.pool())
        .await
        .expect("epoch");
    assert_eq!(still, Some(epoch), "the refused settle must leave the claim in place");

    let refused = envs::claim(&db, &id, None, &[Status::Stopped], Status::Running, me).await;
    let err = refused.err().expect("a claim for stopped -> running must be an error");
    assert!(err.to_string().contains("from stopped to running"), "{err}");

    assert!(envs::settle(db.pool(), &id, epoch, Status::Stopped, None, None).await.expect("settle"));
    assert_eq!(status_of(&ctx, &id).await, "stopped");
}
