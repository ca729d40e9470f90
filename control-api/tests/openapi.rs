//! The OpenAPI document and the router agree: every documented operation is served, and
//! every route the router serves is documented. The served document is also the one
//! `gpugate-api openapi` prints, and needs no token.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::Ctx;
use serde_json::Value;

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// Path-looking string literals in the HTTP module's sources ("/api/...", "/healthz"): every
/// route is written as one (or as a constant holding one), so a route added without its
/// annotation shows up here even though the document does not name it.
fn route_literals() -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("src/http") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("source");
        for (i, _) in text.match_indices("\"/") {
            let rest = &text[i + 1..];
            let Some(end) = rest.find('"') else { continue };
            let lit = &rest[..end];
            let route_like = lit.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-.{}".contains(&b));
            if route_like && (lit.starts_with("/api/") || (lit.len() > 1 && lit[1..].bytes().all(|b| b.is_ascii_lowercase()))) {
                out.insert(lit.to_string());
            }
        }
    }
    out
}

/// Whether the router serves `method` on `path`: its fallbacks answer an unknown path with
/// 404 "no such endpoint" and a known path's other methods with 405 (code 1014).
async fn served(ctx: &Ctx, token: &str, method: &str, path: &str) -> bool {
    let concrete = path.replace("{id}", "zzzzzzzzzzzzzzzz");
    let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let resp = ctx
        .http
        .request(m, format!("{}{concrete}", ctx.base))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let fallback = (status == 405 && v["code"] == 1014) || (status == 404 && v["message"] == "no such endpoint");
    !fallback
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_and_the_router_agree() {
    let mut ctx = Ctx::new("openapi").await;
    let user = ctx.token("alice", false).await;
    ctx.start().await;

    // Served without a token, and equal to what the CLI prints.
    let resp = ctx.http.get(format!("{}/api/v1/openapi.json", ctx.base)).send().await.expect("get");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    assert!(ct.starts_with("application/json"), "{ct}");
    let doc: Value = resp.json().await.expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let (ok, stdout, stderr) = ctx.cli(&["openapi"]);
    assert!(ok, "gpugate-api openapi failed: {stderr}");
    let printed: Value = serde_json::from_str(&stdout).expect("the CLI prints JSON");
    assert_eq!(printed, doc, "the CLI and the API disagree");

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let mut paths: BTreeSet<String> = documented.iter().map(|(_, p)| p.clone()).collect();
    let literals = route_literals();
    assert!(literals.contains("/api/v1/environments/{id}/access"), "the source scan finds routes: {literals:?}");
    paths.extend(literals);

    let mut router = BTreeSet::new();
    for path in &paths {
        for method in METHODS {
            if served(&ctx, &user, method, path).await {
                router.insert((method.to_string(), path.clone()));
            }
        }
    }
    let undocumented: Vec<_> = router.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&router).collect();
    assert!(undocumented.is_empty(), "served but not in the document: {undocumented:?}");
    assert!(unserved.is_empty(), "in the document but not served: {unserved:?}");
    // The probe can tell: a path nobody routes is not served.
    assert!(!served(&ctx, &user, "GET", "/api/v1/no-such-thing").await);
    assert!(!served(&ctx, &user, "PUT", "/api/v1/environments").await);
    ctx.finish().await;
}
