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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_tokens_are_refused_at_once_and_admin_can_be_removed() {
    let mut ctx = Ctx::new("tokens").await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let status = |v: (u16, Value)| v.0;

    // An expiring token works until its time is up, then is a 401.
    let (ok, short, err) = ctx.cli(&["token", "create", "--user", "bob", "--expires-in", "2s"]);
    assert!(ok, "{err}");
    let short = short.trim().to_string();
    assert!(short.starts_with("ggt_") && err.contains("expires in 2 s"), "{short} {err}");
    assert_eq!(status(ctx.get("/api/v1/environments", &short).await), 200);
    tokio::time::sleep(std::time::Duration::from_millis(2300)).await;
    let (s, v) = ctx.get("/api/v1/environments", &short).await;
    assert_eq!((s, v["code"].as_u64()), (401, Some(1003)), "{v}");
    let (ok, _, err) = ctx.cli(&["token", "create", "--user", "bob", "--expires-in", "5w"]);
    assert!(!ok && err.contains("unit must be s, m, h or d"), "{err}");

    // The scheme is case-insensitive.
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let r = ctx.http.get(format!("{}/api/v1/environments", ctx.base)).header("authorization", format!("{scheme} {alice}")).send().await.expect("send");
        assert_eq!(r.status().as_u16(), 200, "scheme {scheme}");
    }
    let r = ctx.http.get(format!("{}/api/v1/environments", ctx.base)).header("authorization", format!("Basic {alice}")).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 401);

    // token list shows the tokens (not the secrets) with their last use; revoke is immediate.
    let (ok, list, err) = ctx.cli(&["token", "list", "--user", "alice"]);
    assert!(ok, "{err}");
    assert!(!list.contains(&alice), "token list printed a token");
    let line = list.lines().find(|l| l.contains("alice")).expect("alice's token listed").to_string();
    assert!(line.contains(&alice[..8]), "hint missing: {line}");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_ne!(fields[5], "-", "last used not recorded: {line}");
    assert_eq!(fields[6], "-", "not revoked yet: {line}");
    let id = fields[0];
    let (ok, _, err) = ctx.cli(&["token", "revoke", "--id", id]);
    assert!(ok, "{err}");
    let (s, v) = ctx.get("/api/v1/environments", &alice).await;
    assert_eq!((s, v["code"].as_u64()), (401, Some(1003)), "a revoked token still works: {v}");
    let (ok, _, err) = ctx.cli(&["token", "revoke", "--id", id]);
    assert!(!ok && err.contains("already revoked"), "{err}");
    let (_, list, _) = ctx.cli(&["token", "list", "--user", "alice"]);
    assert!(list.lines().any(|l| l.starts_with(&format!("{id:>6}")) && !l.trim_end().ends_with('-')), "{list}");

    // Admin rights can be granted and removed; a token create without --admin keeps them.
    let carol = ctx.token("carol", false).await;
    assert_eq!(status(ctx.get("/api/v1/debug/routes", &carol).await), 403);
    let (ok, _, err) = ctx.cli(&["user", "set-admin", "--user", "carol"]);
    assert!(ok, "{err}");
    assert_eq!(status(ctx.get("/api/v1/debug/routes", &carol).await), 200);
    let (ok, _, err) = ctx.cli(&["token", "create", "--user", "carol"]);
    assert!(ok && err.contains("(admin)"), "{err}");
    let (ok, _, err) = ctx.cli(&["user", "unset-admin", "--user", "carol"]);
    assert!(ok, "{err}");
    assert_eq!(status(ctx.get("/api/v1/debug/routes", &carol).await), 403);
    let (ok, _, err) = ctx.cli(&["user", "unset-admin", "--user", "nobody"]);
    assert!(!ok && err.contains("no user named nobody"), "{err}");
    ctx.finish().await;
}
