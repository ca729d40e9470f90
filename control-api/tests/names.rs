//! Routes by name through the API, real containers and the real route table: a service reached
//! by name holds no pool port, its name route follows create, sessions/close, stop, start,
//! delete and the reconciler exactly as port routes do, the access information shows the name
//! URL and the SSH-over-TLS client side, and more web-only workspaces run than the pool has
//! ports. (The same names through a real nginx and real TLS clients: tests/tests/names.rs and
//! the end-to-end test.)

mod common;

use std::net::SocketAddr;

use common::{Ctx, ISO_IMAGE};
use gpugate_routes::{HostKey, Lookup, Service};
use serde_json::{json, Value};

const TLS_PORT: u16 = 8443;

fn key(id: &str, svc: Service) -> HostKey {
    HostKey::new(id.parse().unwrap(), svc)
}

/// What the table holds for `id`'s name route of `svc`: the upstream and generation if live.
fn name_route(ctx: &Ctx, id: &str, svc: Service) -> Option<(SocketAddr, u64)> {
    match ctx.table().lookup_host(key(id, svc), gpugate_routes::now_ms()).0 {
        Lookup::Live(r) => Some((r.upstream, r.generation)),
        _ => None,
    }
}

async fn name_rows(ctx: &Ctx, id: &str) -> Vec<(String, bool)> {
    sqlx::query_as("SELECT service, active FROM name_routes WHERE env_id = $1 ORDER BY service")
        .bind(id)
        .fetch_all(ctx.db().pool())
        .await
        .expect("name_routes")
}

async fn held_ports(ctx: &Ctx, id: &str) -> Vec<String> {
    ctx.port_rows().await.into_iter().filter(|r| r.3.as_deref() == Some(id)).map(|r| r.1).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_routes_follow_every_lifecycle_step_and_need_no_pool_port() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("names_life").await;
    ctx.cfg.names.tls_port = Some(TLS_PORT);
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;

    // Deployment defaults with TLS: ssh both, jupyter and code by name only.
    let (s, v) = ctx
        .post("/api/v1/environments", &alice, json!({"name": "n", "image": ISO_IMAGE, "services": ["ssh", "jupyter", "code"]}))
        .await;
    assert_eq!(s, 201, "{v}");
    let env = v["data"].clone();
    let id = env["id"].as_str().unwrap().to_string();
    assert_eq!(env["access"], json!({"ssh": "both", "jupyter": "hostname", "code": "hostname"}));
    let ssh_port = env["ports"]["ssh"].as_u64().expect("ssh keeps its pool port");
    assert!(env["ports"].get("jupyter").is_none() && env["ports"].get("code").is_none(), "{env}");
    assert_eq!(held_ports(&ctx, &id).await, vec!["ssh".to_string()], "only ssh holds a pool port");

    // Access information: names without a port, the scheme the route is served with.
    let info = &env["access_info"];
    assert_eq!(info["jupyter"]["url"], format!("https://{id}.jupyter.x-gpu.com:{TLS_PORT}/"));
    assert!(info["jupyter"].get("port_url").is_none(), "{info}");
    assert_eq!(info["code_server"]["url"], format!("https://{id}.code.x-gpu.com:{TLS_PORT}/"));
    assert_eq!(info["ssh"]["command"], format!("ssh -p {ssh_port} remotegpu@{id}.ssh.x-gpu.com"));
    let tls = &info["ssh"]["tls"];
    assert_eq!(tls["port"], TLS_PORT);
    assert!(
        tls["command"].as_str().unwrap().contains(&format!("-servername %h -connect %h:{TLS_PORT}' remotegpu@{id}.ssh.x-gpu.com")),
        "{tls}"
    );
    assert!(tls["ssh_config"].as_str().unwrap().starts_with("Host *.ssh.x-gpu.com\n"), "{tls}");
    // The access endpoint tells the same, name-only services included.
    let (s, a) = ctx.get(&format!("/api/v1/environments/{id}/access"), &alice).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(a["data"]["access_info"], *info, "the access endpoint and the environment agree");

    // The table routes each name to the container's published address of that service.
    let inspect = ctx.inspect(&ctx.containers()[0]);
    let (jup, g1) = name_route(&ctx, &id, Service::Jupyter).expect("jupyter by name");
    assert_eq!(jup, common::published(&inspect, 8888));
    assert_eq!(name_route(&ctx, &id, Service::Code).unwrap().0, common::published(&inspect, 8080));
    assert_eq!(name_route(&ctx, &id, Service::Ssh).unwrap().0, common::published(&inspect, 22));
    assert_eq!(name_route(&ctx, &id, Service::Rdp), None);
    let v: Value = ctx.get(&format!("/api/v1/environments/{id}"), &alice).await.1;
    assert_eq!(v["data"]["activity"]["jupyter"]["port"], 0, "{v}");

    // sessions/close reaches the name routes too.
    let slot = ctx.table().host_slot(key(&id, Service::Jupyter)).unwrap();
    let epoch = ctx.table().revoke_epoch(slot);
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/sessions/close"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["applied"], true, "{v}");
    let mut names: Vec<&str> = v["data"]["names"].as_array().unwrap().iter().filter_map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, vec!["code", "jupyter", "ssh"], "every name route of the environment: {v}");
    assert!(ctx.table().revoke_epoch(slot) > epoch);

    // Stop: gone from the table, rows kept inactive; start: back with a new generation.
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/stop"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(name_route(&ctx, &id, Service::Jupyter), None);
    assert_eq!(name_rows(&ctx, &id).await.iter().filter(|(_, a)| *a).count(), 0);
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/start"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (_, g2) = name_route(&ctx, &id, Service::Jupyter).expect("jupyter by name after start");
    assert!(g2 > g1, "a start publishes a new generation");
    assert_eq!(held_ports(&ctx, &id).await, vec!["ssh".to_string()]);

    // The reconciler restores a name route the database lost.
    sqlx::query("DELETE FROM name_routes WHERE env_id = $1 AND service = 'code'").bind(&id).execute(ctx.db().pool()).await.unwrap();
    assert!(common::eventually(std::time::Duration::from_secs(3), || name_route(&ctx, &id, Service::Code).is_none()).await);
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert!(common::eventually(std::time::Duration::from_secs(3), || name_route(&ctx, &id, Service::Code).is_some()).await);

    // The debug view lists name routes.
    let (s, v) = ctx.get("/api/v1/debug/routes", &admin).await;
    assert_eq!(s, 200, "{v}");
    let text = v.to_string();
    assert!(text.contains("name_routes") && text.contains(&id), "{text}");

    // Delete: names gone from the table and the database.
    let (s, v) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 200, "{v}");
    for svc in [Service::Ssh, Service::Jupyter, Service::Code] {
        assert_eq!(name_route(&ctx, &id, svc), None, "{svc} after delete");
    }
    assert!(name_rows(&ctx, &id).await.is_empty());
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_is_chosen_per_service_and_bad_choices_are_refused() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("names_access").await;
    ctx.cfg.names.tls_port = Some(443);
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let body = json!({"name": "a", "image": ISO_IMAGE, "services": ["ssh", "jupyter"], "access": {"ssh": "ports", "jupyter": "both"}});
    let (s, v) = ctx.post("/api/v1/environments", &alice, body).await;
    assert_eq!(s, 201, "{v}");
    let env = &v["data"];
    let id = env["id"].as_str().unwrap();
    assert_eq!(env["access"], json!({"ssh": "ports", "jupyter": "both"}));
    let jport = env["ports"]["jupyter"].as_u64().unwrap();
    // Port 443: no port in the name URL; the port URL is plain HTTP.
    assert_eq!(env["access_info"]["jupyter"]["url"], format!("https://{id}.jupyter.x-gpu.com/"));
    assert_eq!(env["access_info"]["jupyter"]["port_url"], format!("http://{id}.jupyter.x-gpu.com:{jport}/"));
    assert!(env["access_info"]["ssh"].get("tls").is_none(), "ssh by port only");
    assert!(name_route(&ctx, id, Service::Ssh).is_none() && name_route(&ctx, id, Service::Jupyter).is_some());

    for (access, why) in [
        (json!({"rdp": "hostname"}), "not one of this request's services"),
        (json!({"ssh": "sometimes"}), "sometimes"),
    ] {
        let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "b", "image": ISO_IMAGE, "services": ["ssh"], "access": access})).await;
        assert_eq!(s, 422, "{v}");
        assert!(v["message"].as_str().unwrap_or_default().contains(why) || v.to_string().contains(why), "{v}");
    }
    let (s, v) = ctx
        .post("/api/v1/environments", &alice, json!({"name": "c", "image": ISO_IMAGE, "services": ["rdp"], "access": {"rdp": "both"}}))
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v.to_string().contains("RDP"), "{v}");
    ctx.finish().await;

    // Without a TLS port the gateway serves no names: asking for one is refused, the default
    // is today's ports.
    let mut ctx = Ctx::new("names_off").await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let (s, v) = ctx
        .post("/api/v1/environments", &alice, json!({"name": "d", "image": ISO_IMAGE, "services": ["jupyter"], "access": {"jupyter": "hostname"}}))
        .await;
    assert_eq!(s, 422, "{v}");
    assert!(v.to_string().contains("names.tls_port"), "{v}");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_web_only_workspaces_run_than_the_jupyter_pool_has_ports() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("names_scale").await;
    ctx.cfg.names.tls_port = Some(TLS_PORT);
    // Two Jupyter ports; six workspaces reach Jupyter by name.
    ctx.cfg.pools.insert("jupyter".into(), gpugate_api::config::PoolConfig {
        range: "21000-21001".parse().unwrap(),
        bound: None,
        reserved: vec![],
    });
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let mut ids = vec![];
    for i in 0..6 {
        let (s, v) = ctx
            .post("/api/v1/environments", &alice, json!({"name": format!("w{i}"), "image": ISO_IMAGE, "services": ["jupyter"]}))
            .await;
        assert_eq!(s, 201, "workspace {i}: {v}");
        ids.push(v["data"]["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        assert!(name_route(&ctx, id, Service::Jupyter).is_some(), "{id} by name");
        assert!(held_ports(&ctx, id).await.is_empty(), "{id} holds no port");
    }
    // The pool is untouched: a workspace by port still gets one.
    let (s, v) = ctx
        .post("/api/v1/environments", &alice, json!({"name": "p", "image": ISO_IMAGE, "services": ["jupyter"], "access": {"jupyter": "ports"}}))
        .await;
    assert_eq!(s, 201, "{v}");
    ctx.finish().await;
}

/// The idle task counts sessions of services reached by name only (they hold no pool port).
/// The session is opened in the table's counters as an nginx worker opens one (the real
/// module through TLS: tests/tests/names.rs); the in-process publisher reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_by_name_only_keeps_its_workspace_from_the_idle_stop() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("names_idle").await;
    ctx.cfg.names.tls_port = Some(TLS_PORT);
    ctx.cfg.idle.check_interval_s = 1;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    let (s, v) = ctx
        .post("/api/v1/environments", &alice, json!({"name": "lab", "image": ISO_IMAGE, "services": ["jupyter"], "idle_stop_after_s": 2}))
        .await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["data"]["access"], json!({"jupyter": "hostname"}), "{v}");

    let table = ctx.table();
    let (lookup, owner, slot) = table.lookup_host(key(&id, Service::Jupyter), gpugate_routes::now_ms());
    assert!(matches!(lookup, Lookup::Live(_)), "{lookup:?}");
    let slot = slot.expect("a slot");
    // A worker's writable view of the counters (the test runs as the table's owner).
    let counters = gpugate_routes::CounterFile::open(&gpugate_routes::counters_path(&ctx.table), true).expect("the counters file");
    let row = counters.claim_worker().expect("a worker row");
    counters.session_open(Some(row), slot, owner, gpugate_routes::now_ms());

    // Three times the limit with the session open: still running, and the API sees it.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let (_, v) = ctx.get(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(v["data"]["status"], "running", "an open session by name is not idle: {v}");
    assert_eq!(v["data"]["activity"]["jupyter"]["connections_active"], 1, "{v}");

    // The session ends: the idle stop follows.
    counters.session_close(Some(row), slot, owner, gpugate_routes::Outcome::Proxied, 0, 0, gpugate_routes::now_ms());
    let status = ctx.status_within_10s(&alice, &id, "stopped").await;
    assert_eq!(status, "stopped", "idle once the session ended");
    counters.release_worker(row);
    ctx.finish().await;
}
