//! Many tenants on one host: quotas (deployment defaults and per-user overrides) and the
//! per-token request rate limit.

mod common;

use common::Ctx;
use serde_json::{json, Value};

fn expect_quota(s: u16, v: &Value, limit: &str) {
    assert_eq!((s, v["code"].as_u64()), (409, Some(1011)), "{v}");
    let msg = v["message"].as_str().expect("message");
    assert!(msg.contains("quota exceeded") && msg.contains(limit), "message {msg:?} does not name {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_what_a_user_may_not_take_and_overrides_lift_them() {
    let mut ctx = Ctx::new("quotas").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.quotas.environments = Some(2);
    ctx.cfg.quotas.gpus = Some(1);
    ctx.cfg.quotas.running = Some(1);
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    ctx.start().await;

    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "one", "gpus": 1})).await;
    assert_eq!(s, 201, "{v}");
    let one = v["data"]["id"].as_str().expect("id").to_string();
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "two"})).await;
    expect_quota(s, &v, "running environments 1 in use + 1 requested > 1 allowed");
    let (s, v) = ctx.post(&format!("/api/v1/environments/{one}/stop"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "two", "gpus": 1})).await;
    expect_quota(s, &v, "GPUs 1 in use + 1 requested > 1 allowed");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "two"})).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = ctx.post(&format!("/api/v1/environments/{one}/start"), &alice, json!({})).await;
    expect_quota(s, &v, "running environments");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "three"})).await;
    expect_quota(s, &v, "environments 2 in use + 1 requested > 2 allowed");
    // Refusals changed nothing; another user has their own quota.
    assert_eq!(ctx.containers().len(), 2);
    let (s, v) = ctx.post("/api/v1/environments", &bob, json!({"name": "b", "gpus": 0})).await;
    assert_eq!(s, 201, "{v}");

    // A per-user override lifts the limits at once (no restart).
    let (ok, _, err) = ctx.cli(&["user", "set-quota", "--user", "alice", "--environments", "5", "--running", "3"]);
    assert!(ok, "{err}");
    let (ok, _, err) = ctx.cli(&["user", "set-quota", "--user", "nobody", "--environments", "5"]);
    assert!(!ok && err.contains("no user named nobody"), "{err}");
    let (s, v) = ctx.post(&format!("/api/v1/environments/{one}/start"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "three"})).await;
    assert_eq!(s, 201, "{v}");
    // The GPU limit is still the default: the override left it unset.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "four", "gpus": 1})).await;
    expect_quota(s, &v, "GPUs");
    // Removing the overrides brings the defaults back.
    let (ok, _, err) = ctx.cli(&["user", "set-quota", "--user", "alice"]);
    assert!(ok, "{err}");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "four"})).await;
    expect_quota(s, &v, "environments 3 in use");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_over_its_rate_gets_429_with_retry_after_and_others_do_not() {
    let mut ctx = Ctx::new("ratelimit").await;
    ctx.cfg.rate_limit.per_second = 0.5;
    ctx.cfg.rate_limit.burst = 5;
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    ctx.start().await;
    let url = format!("{}/api/v1/environments", ctx.base);

    let mut statuses = vec![];
    let mut limited = None;
    for _ in 0..8 {
        let r = ctx.http.get(&url).bearer_auth(&alice).send().await.expect("send");
        statuses.push(r.status().as_u16());
        if r.status().as_u16() == 429 {
            let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
            limited = Some((retry, r.json::<Value>().await.expect("json")));
        }
    }
    assert_eq!(&statuses[..5], &[200; 5], "the burst is allowed: {statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "over the rate: {statuses:?}");
    let (retry, v) = limited.expect("a 429");
    let retry: u64 = retry.expect("Retry-After").parse().expect("seconds");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(v["code"], 1012, "{v}");
    assert_eq!(v["data"], Value::Null);
    assert!(v["message"].as_str().expect("message").contains("too many requests"), "{v}");
    // The scheme's spelling does not give a token a second bucket.
    let r = ctx.http.get(&url).header("authorization", format!("BEARER {alice}")).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 429);
    // Another token, and the probes, are not limited by alice's bucket.
    let (s, _) = ctx.get("/api/v1/environments", &bob).await;
    assert_eq!(s, 200);
    for _ in 0..10 {
        let r = ctx.http.get(format!("{}/healthz", ctx.base)).send().await.expect("send");
        assert_eq!(r.status().as_u16(), 200);
    }
    ctx.finish().await;
}
