//! `/metrics` and `/readyz` leak nothing and cost nothing: a scrape runs no query (it answers
//! while the tables it would read are locked, and while the database refuses connections, with
//! the last values); per-environment series only when enabled; the metrics token and address;
//! `/readyz` names the dependency that is down without the driver's error text.

mod common;

use std::time::{Duration, Instant};

use common::{admin_url, Ctx};
use serde_json::{json, Value};
use sqlx::Connection;

/// `GET base/path` with an optional bearer token and a short time-out: (status, body), or
/// status 0 if no answer came in time.
async fn get(ctx: &Ctx, url: &str, token: Option<&str>, timeout: Duration) -> (u16, String) {
    let mut req = ctx.http.get(url).timeout(timeout);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Polls `/readyz` until it answers `want`; returns the last (status, envelope).
async fn readyz_until(ctx: &Ctx, want: u16, within: Duration) -> (u16, Value) {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = get(ctx, &format!("{}/readyz", ctx.base), None, Duration::from_secs(10)).await;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        if status == want || Instant::now() >= deadline {
            return (status, v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const AVAILABLE_SSH: &str = "gpugate_ports{service=\"ssh\",state=\"available\"} 10";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_run_no_query_and_readyz_names_the_database_without_its_error() {
    let mut ctx = Ctx::new("probes").await;
    ctx.start().await;
    let base = ctx.base.clone();
    ctx.metrics_with(&base, &[AVAILABLE_SSH, "gpugate_gateway_connections_active{service=\"ssh\"} 0"])
        .await;

    // 1. Every table a scrape used to read is locked: a scrape that queried would wait for the
    //    lock (and time out here); one that renders the last refresh answers at once.
    let mut locker = sqlx::PgConnection::connect(&ctx.db_url).await.expect("connect");
    sqlx::query("BEGIN").execute(&mut locker).await.expect("begin");
    sqlx::query("LOCK TABLE port_pool, environments IN ACCESS EXCLUSIVE MODE").execute(&mut locker).await.expect("lock");
    for i in 0..20 {
        let (status, text) = get(&ctx, &format!("{base}/metrics"), None, Duration::from_secs(1)).await;
        assert_eq!(status, 200, "scrape {i} while the tables are locked: status {status} (0: no answer in 1 s)");
        assert!(text.contains(AVAILABLE_SSH), "scrape {i} lost the last values:\n{text}");
    }
    sqlx::query("ROLLBACK").execute(&mut locker).await.expect("rollback");
    drop(locker);

    // 2. The database refuses this test's connections and the open ones are cut.
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.expect("connect admin");
    let db = ctx.db_name.clone();
    sqlx::query(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false")).execute(&mut admin).await.expect("alter");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&db)
        .execute(&mut admin)
        .await
        .expect("terminate");

    let t = Instant::now();
    let (status, text) = get(&ctx, &format!("{base}/metrics"), None, Duration::from_secs(1)).await;
    assert_eq!(status, 200, "/metrics with the database down");
    assert!(text.contains(AVAILABLE_SSH), "/metrics with the database down lost the last values:\n{text}");
    assert!(t.elapsed() < Duration::from_secs(1), "/metrics waited for the database: {:?}", t.elapsed());

    let (status, v) = readyz_until(&ctx, 503, Duration::from_secs(10)).await;
    assert_eq!(status, 503, "/readyz with the database down: {v}");
    assert_eq!(v["code"], 1010, "{v}");
    assert_eq!(v["data"]["database"], false, "{v}");
    let reason = v["data"]["reasons"]["database"].as_str().unwrap_or_else(|| panic!("no reasons.database: {v}"));
    let fixed = [
        "unreachable",
        "timeout",
        "starting up",
        "shutting down",
        "no connection slots",
        "login refused",
        "no such database",
        "not accepting connections",
        "error",
    ];
    assert!(fixed.contains(&reason), "reason {reason:?} is not one of the documented words: {v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(message.contains("database"), "the message does not name the database: {v}");
    // Nothing of the driver's text: no database name, address, os error or server message.
    let body = v.to_string();
    for raw in [db.as_str(), "os error", "onnection refused", "FATAL", "currently accepting", "127.0.0.1", "error returned", "pool"] {
        assert!(!body.contains(raw), "/readyz leaks {raw:?}: {body}");
    }
    assert!(v["data"].get("errors").is_none(), "raw error list still there: {v}");

    // 3. Back: ready again, and the gauges refresh again.
    sqlx::query(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true")).execute(&mut admin).await.expect("alter back");
    let (status, v) = readyz_until(&ctx, 200, Duration::from_secs(30)).await;
    assert_eq!(status, 200, "/readyz after the database is back: {v}");
    assert!(v["data"]["reasons"].as_object().is_some_and(|r| r.is_empty()), "{v}");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_environment_series_are_off_by_default_and_on_when_enabled() {
    let mut ctx = Ctx::new("perenv").await;
    ctx.start().await;
    let alice = ctx.token("alice", false).await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "m", "services": ["ssh"]})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let base = ctx.base.clone();
    let text = ctx
        .metrics_with(
            &base,
            &[
                "gpugate_ports{service=\"ssh\",state=\"allocated\"} 1",
                "gpugate_environments{status=\"running\"} 1",
                "gpugate_gateway_connections_total{outcome=\"completed\",service=\"ssh\"} 0",
                "gpugate_gateway_connections_active{service=\"ssh\"} 0",
            ],
        )
        .await;
    assert!(!text.contains(&id), "the environment id is in /metrics by default:\n{text}");
    assert!(!text.contains("gpugate_environment_connections_total"), "{text}");
    assert!(!text.contains("env_id="), "{text}");

    ctx.stop().await;
    ctx.cfg.metrics.per_environment = true;
    ctx.start().await;
    let base = ctx.base.clone();
    let with_env = |series: &str, rest: &str| format!("{series}{{env_id=\"{id}\",{rest}");
    ctx.metrics_with(
        &base,
        &[
            &with_env("gpugate_environment_connections_total", "outcome=\"completed\",service=\"ssh\"} 0"),
            &with_env("gpugate_environment_connections_active", "service=\"ssh\"} 0"),
            &with_env("gpugate_environment_bytes_total", "service=\"ssh\"} 0").replace("{env_id", "{direction=\"in\",env_id"),
        ],
    )
    .await;

    let (s, _) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 200);
    ctx.finish().await;
}

const TOKEN: &str = "scrape-secret-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_token_and_the_metrics_address() {
    let mut ctx = Ctx::new("mtoken").await;
    // A token on the API's own address.
    ctx.cfg.metrics.token = gpugate_api::config::Secret::new(TOKEN);
    ctx.start().await;
    let url = format!("{}/metrics", ctx.base);
    let short = Duration::from_secs(10);
    let (status, body) = get(&ctx, &url, None, short).await;
    assert_eq!(status, 401, "/metrics without the token: {body}");
    let v: Value = serde_json::from_str(&body).expect("401 in the envelope");
    assert_eq!(v["code"], 1003, "{v}");
    assert!(!body.contains("gpugate_"), "metrics leaked with the 401: {body}");
    let (status, _) = get(&ctx, &url, Some("scrape-secret-012345678"), short).await;
    assert_eq!(status, 401, "/metrics with a wrong token");
    let (status, body) = get(&ctx, &url, Some(TOKEN), short).await;
    assert_eq!(status, 200, "/metrics with the token: {body}");
    assert!(body.contains("gpugate_publisher_active"), "{body}");
    // The probes stay open.
    let (status, _) = get(&ctx, &format!("{}/readyz", ctx.base), None, short).await;
    assert_eq!(status, 200, "/readyz needs no token");
    ctx.stop().await;

    // An address of its own: /metrics and /healthz there, no /metrics on the API's address.
    ctx.cfg.metrics.listen = Some("127.0.0.1:0".parse().expect("addr"));
    ctx.start().await;
    let at = ctx.running.as_ref().and_then(|r| r.metrics_addr).expect("metrics address bound");
    let (status, _) = get(&ctx, &format!("{}/metrics", ctx.base), Some(TOKEN), short).await;
    assert_eq!(status, 404, "/metrics is still on the API's address");
    let (status, _) = get(&ctx, &format!("http://{at}/metrics"), None, short).await;
    assert_eq!(status, 401, "the metrics address without the token");
    let (status, body) = get(&ctx, &format!("http://{at}/metrics"), Some(TOKEN), short).await;
    assert_eq!(status, 200, "the metrics address with the token: {body}");
    assert!(body.contains("gpugate_publisher_active"), "{body}");
    let (status, _) = get(&ctx, &format!("http://{at}/healthz"), None, short).await;
    assert_eq!(status, 200, "/healthz on the metrics address");
    for path in ["/readyz", "/api/v1/environments"] {
        let (status, _) = get(&ctx, &format!("http://{at}{path}"), Some(TOKEN), short).await;
        assert_eq!(status, 404, "{path} is served on the metrics address");
    }
    ctx.finish().await;
}
