//! Bad input and failed steps: each is a clear error in the envelope, and nothing is left
//! behind (ports free, no container, no route).

mod common;

use common::Ctx;
use gpugate_routes::Lookup;
use serde_json::{json, Value};

/// Asserts the deployment holds nothing: no live environment, no allocated port or GPU, no
/// route row, no container, no live slot.
async fn assert_nothing_left(ctx: &Ctx) {
    for (p, _, status, env) in ctx.port_rows().await {
        assert!(status == "available" || status == "quarantined", "port {p} is {status} ({env:?})");
        assert_eq!(env, None, "port {p}");
    }
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM environments WHERE status <> 'deleted'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("count");
    assert_eq!(live, 0, "a live environment is left");
    let gpus: i64 = sqlx::query_scalar("SELECT count(*) FROM gpu_devices WHERE status = 'allocated'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("gpus");
    assert_eq!(gpus, 0, "a GPU is left allocated");
    assert_eq!(ctx.route_rows().await, 0, "a route row is left");
    assert!(ctx.containers().is_empty(), "a container is left");
    assert_eq!(ctx.volumes(), Vec::<String>::new(), "a home volume is left");
    if ctx.table.exists() {
        assert_eq!(ctx.table().routes().count(), 0, "a slot is left in the table");
    }
}

fn expect_err(s: u16, v: &Value, status: u16, code: u64, needle: &str) {
    assert!(!needle.is_empty(), "every expected error names what its message must say");
    assert_eq!(s, status, "{v}");
    assert_eq!(v["code"].as_u64(), Some(code), "{v}");
    assert_eq!(v["data"], Value::Null, "{v}");
    let msg = v["message"].as_str().unwrap_or("");
    assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
}

/// POSTs a 3 MiB create over a raw connection (the server answers before reading it all and
/// closes, which an HTTP client library reports as a failed send); returns (status, body).
async fn oversized_post(base: &str, token: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let body = format!("{{\"name\": \"{}\"}}", "x".repeat(3 * 1024 * 1024));
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /api/v1/environments HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.expect("write head");
    let _ = conn.write_all(body.as_bytes()).await; // may fail once the server has answered
    let mut raw = vec![];
    let _ = conn.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {text}"));
    let json = text.find("\r\n\r\n").map(|i| &text[i + 4..]).unwrap_or("");
    // The body may be chunked: take the JSON object inside.
    let start = json.find('{').unwrap_or(0);
    let end = json.rfind('}').map(|e| e + 1).unwrap_or(json.len());
    (status, serde_json::from_str(&json[start..end]).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_steps_are_undone() {
    let mut ctx = Ctx::new("failsteps").await;
    let alice = ctx.token("alice", false).await;

    // Image missing: a 422 naming the image, before anything changes.
    ctx.start().await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "x", "image": "gpugate-test/absent:9"})).await;
    expect_err(s, &v, 422, 1007, "gpugate-test/absent:9");
    assert_nothing_left(&ctx).await;
    ctx.stop().await;

    // Docker create fails, then the route write fails: every earlier step is undone.
    for point in ["docker_create", "route_write"] {
        ctx.cfg.fault = Some(format!("fail:{point}"));
        ctx.start().await;
        let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "x", "gpus": 1})).await;
        expect_err(s, &v, 500, 1500, "internal error");
        assert_nothing_left(&ctx).await;
        let reason: String = sqlx::query_scalar("SELECT status_reason FROM environments ORDER BY created_at DESC LIMIT 1")
            .fetch_one(ctx.db().pool())
            .await
            .expect("reason");
        assert!(reason.starts_with("create failed"), "{reason}");
        ctx.stop().await;
    }
    // The failed creates went into the audit trail (and the refused one, whose image was
    // checked outside the allocating transaction, as refused).
    let refused: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'create_undone' AND detail->>'reason' LIKE 'create refused%'")
            .fetch_one(ctx.db().pool())
            .await
            .expect("events");
    assert_eq!(refused, 1);
    let undone: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'create_undone' AND detail->>'reason' LIKE 'create failed%'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("events");
    assert_eq!(undone, 2);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let mut ctx = Ctx::new("badinput").await;
    ctx.cfg.pools.get_mut("rdp").expect("rdp").range = "23000-23000".parse().expect("range");
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;
    let url = format!("{}/api/v1/environments", ctx.base);

    // Malformed JSON, wrong content type.
    let r = ctx.http.post(&url).bearer_auth(&alice).header("content-type", "application/json").body("{\"name\": ").send().await.expect("send");
    let s = r.status().as_u16();
    let v: Value = r.json().await.expect("json");
    expect_err(s, &v, 400, 1001, "Failed to parse the request body as JSON");
    let r = ctx.http.post(&url).bearer_auth(&alice).body("name=x").send().await.expect("send");
    let s = r.status().as_u16();
    let v: Value = r.json().await.expect("json");
    expect_err(s, &v, 400, 1001, "Content-Type");

    let cases: Vec<(Value, u16, u64, &str)> = vec![
        (json!({"name": "x", "colour": "red"}), 422, 1002, "unknown field `colour`"),
        (json!({"image": "x"}), 422, 1002, "missing field `name`"),
        (json!({"name": "x", "services": ["ftp"]}), 422, 1002, "unknown service \"ftp\""),
        (json!({"name": "x", "services": ["ssh", "ssh"]}), 422, 1002, "twice"),
        (json!({"name": "x", "services": []}), 422, 1002, "at least one"),
        (json!({"name": "n".repeat(65)}), 422, 1002, "at most 64"),
        (json!({"name": "  "}), 422, 1002, "empty"),
        (json!({"name": "x", "gpus": 3}), 422, 1002, "3 GPUs requested, the largest host has 2"),
        (json!({"name": "x", "gpus": -1}), 422, 1002, "expected u32"),
        (json!({"name": "a\u{202E}gpj.exe"}), 422, 1002, "U+202E"),
        (json!({"name": "zero\u{200B}width"}), 422, 1002, "U+200B"),
        (json!({"name": "bell\u{7}"}), 422, 1002, "must be printable"),
        (json!({"name": "x", "memory_mb": 8}), 422, 1002, "memory_mb 8 is outside"),
        (json!({"name": "x", "image": "postgres:15"}), 422, 1002, "docker.allowed_images"),
        (json!({"name": "x", "ssh_public_keys": ["not a key"]}), 422, 1002, "OpenSSH"),
        (json!({"name": "x", "image": "bad image"}), 422, 1002, "not a valid image"),
    ];
    for (body, status, code, needle) in cases {
        let (s, v) = ctx.post("/api/v1/environments", &alice, body.clone()).await;
        expect_err(s, &v, status, code, needle);
    }
    assert_nothing_left(&ctx).await;

    // A body over the limit is a 413, a known path with another method a 405, both in the
    // envelope; every answer carries a request id (the client's, if it sent one).
    let (s, v) = oversized_post(&ctx.base, &alice).await;
    expect_err(s, &v, 413, 1013, "over the limit");
    let r = ctx.http.put(&url).bearer_auth(&alice).header("x-request-id", "trace-me-42").send().await.expect("send");
    assert_eq!(r.headers().get("x-request-id").and_then(|h| h.to_str().ok()), Some("trace-me-42"));
    let s = r.status().as_u16();
    let v: Value = r.json().await.expect("json");
    expect_err(s, &v, 405, 1014, "does not accept that method");
    let r = ctx.http.get(format!("{}/healthz", ctx.base)).send().await.expect("send");
    let id = r.headers().get("x-request-id").and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
    assert_eq!(id.len(), 16, "a generated request id: {id:?}");

    // Auth: no token, unknown token, admin endpoint with a user token.
    let r = ctx.http.get(&url).send().await.expect("send");
    let s = r.status().as_u16();
    let v: Value = r.json().await.expect("json");
    expect_err(s, &v, 401, 1003, "bearer token");
    let (s, v) = ctx.get("/api/v1/environments", "ggt_nope").await;
    expect_err(s, &v, 401, 1003, "bearer token");
    let (s, v) = ctx.get("/api/v1/debug/routes", &alice).await;
    expect_err(s, &v, 403, 1004, "admin");
    let (s, v) = ctx.get("/api/v1/environments/aaaaaaaaaaaaaaaa", &alice).await;
    expect_err(s, &v, 404, 1005, "aaaaaaaaaaaaaaaa");
    let (s, v) = ctx.get("/api/v1/environments/..%2Fetc", &alice).await;
    expect_err(s, &v, 404, 1005, "not found");
    let (s, v) = ctx.get("/api/v1/nothing", &alice).await;
    expect_err(s, &v, 404, 1005, "no such endpoint");

    // More GPUs than are free: 409, nothing changed.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "both", "gpus": 2, "services": ["ssh"]})).await;
    assert_eq!(s, 201, "{v}");
    let both = v["data"]["id"].as_str().expect("id").to_string();
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "one", "gpus": 1, "services": ["ssh"]})).await;
    // The one error whose `data` is not null: the counts, for a client to show or retry on.
    assert_eq!((s, v["code"].as_u64()), (409, Some(1008)), "{v}");
    assert_eq!(v["message"], "1 GPUs requested, 0 free on any one host", "{v}");
    assert_eq!(v["data"], json!({"gpus_free": 0, "gpus_needed": 1}), "{v}");
    // Pool exhaustion: 503 naming the service; the other pools are untouched.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "r1", "services": ["rdp"]})).await;
    assert_eq!(s, 201, "{v}");
    let rdp = v["data"]["id"].as_str().expect("id").to_string();
    assert_eq!(v["data"]["access_info"]["rdp"]["port"], 23000);
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "r2", "services": ["ssh", "rdp"]})).await;
    expect_err(s, &v, 503, 1009, "no free rdp port");
    let allocated: i64 = sqlx::query_scalar("SELECT count(*) FROM port_pool WHERE status = 'allocated'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("count");
    assert_eq!(allocated, 2, "the refused create must not keep its ssh port");
    assert_eq!(ctx.containers().len(), 2);

    // The admin's view: the table equals the database.
    let (s, v) = ctx.get("/api/v1/debug/routes", &admin).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["mismatches"], json!([]));
    assert_eq!(v["data"]["table"].as_array().expect("slots").len(), 2);
    // Each slot carries its counters as fields, and the header its generation and writer.
    for field in ["connections_total", "connections_active", "refused_total", "bytes_in", "bytes_out", "last_activity_ms"] {
        assert!(v["data"]["table"][0][field].is_u64(), "slot field {field}: {}", v["data"]["table"][0]);
    }
    assert!(v["data"]["header"]["generation"].is_u64() && v["data"]["header"]["writer_pid"].is_u64(), "{}", v["data"]["header"]);
    assert_eq!(v["data"]["database"].as_array().expect("rows").len(), 2);
    let (s, v) = ctx.get("/readyz", &alice).await;
    assert_eq!(s, 200, "{v}");
    // Gauges come from the last background refresh: wait for it rather than read at once.
    // Per-environment series are off by default; the per-service totals are there.
    let metrics = ctx
        .metrics_with(
            &ctx.base,
            &[
                "gpugate_ports{service=\"rdp\",state=\"allocated\"} 1",
                "gpugate_port_allocation_failures_total{service=\"rdp\"} 1",
                "gpugate_environment_creates_total{result=\"ok\"} 2",
                "gpugate_create_step_duration_seconds_count{step=\"docker_start\"} 2",
                "gpugate_publisher_active 1",
                "gpugate_gateway_connections_total{outcome=\"completed\",service=\"rdp\"} 0",
            ],
        )
        .await;
    assert!(!metrics.contains(&rdp), "an environment id in /metrics by default:\n{metrics}");

    for id in [both, rdp] {
        let (s, _) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
        assert_eq!(s, 200);
    }
    assert_nothing_left(&ctx).await;
    let t = ctx.table();
    assert_eq!(t.lookup(23000, gpugate_routes::now_ms()), Lookup::Absent);
    ctx.finish().await;
}
