//! Environment lifecycle over real PostgreSQL and Docker: create, access, stop/start, delete,
//! quarantine, ownership.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{published, Ctx};
use gpugate_routes::Lookup;
use serde_json::{json, Value};

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_runs_the_workspace_and_delete_leaves_nothing() {
    let mut ctx = Ctx::new("create").await;
    ctx.cfg.quarantine_s = 2;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;

    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBn test@example";
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "train", "gpus": 1, "ssh_public_keys": [key]})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["code"], 0);
    assert_eq!(v["message"], "success");
    let env = &v["data"];
    let id = env["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 16);
    assert!(id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "{id}");
    assert_eq!(env["status"], "running");
    assert_eq!(env["routes_live"], true);
    assert_eq!(env["gpus"], json!([0]));
    let port = |svc: &str| env["ports"][svc].as_u64().expect("port") as u16;
    let (ssh, jupyter, code) = (port("ssh"), port("jupyter"), port("code"));
    assert!((20000..=20009).contains(&ssh) && (21000..=21009).contains(&jupyter) && (22000..=22009).contains(&code));

    // The access document has exactly the seed's shape.
    let (s, a) = ctx.get(&format!("/api/v1/environments/{id}/access"), &alice).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(keys(&a), set(&["code", "message", "data"]));
    assert_eq!(keys(&a["data"]), set(&["environment_id", "access_info"]));
    let info = &a["data"]["access_info"];
    assert_eq!(keys(info), set(&["ssh", "jupyter", "code_server"]));
    assert_eq!(keys(&info["ssh"]), set(&["host", "port", "username", "password", "command"]));
    assert_eq!(keys(&info["jupyter"]), set(&["url", "token"]));
    assert_eq!(keys(&info["code_server"]), set(&["url", "password"]));
    let host = format!("{id}.ssh.x-gpu.com");
    assert_eq!(info["ssh"]["host"], host.as_str());
    assert_eq!(info["ssh"]["port"], ssh);
    assert_eq!(info["ssh"]["command"], format!("ssh -p {ssh} remotegpu@{host}").as_str());
    assert_eq!(info["jupyter"]["url"], format!("https://{id}.jupyter.x-gpu.com:{jupyter}").as_str());
    assert_eq!(info["code_server"]["url"], format!("https://{id}.code.x-gpu.com:{code}").as_str());
    let password = info["ssh"]["password"].as_str().expect("password").to_string();
    let token = info["jupyter"]["token"].as_str().expect("token").to_string();
    assert!(password.len() >= 16 && token.len() >= 16);

    // The container: labels, hostname, environment, stand-in GPU.
    let cs = ctx.containers();
    assert_eq!(cs.len(), 1);
    let c = ctx.inspect(&cs[0]);
    assert_eq!(c["State"]["Running"], true);
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["gpugate.managed"], "true");
    assert_eq!(labels["gpugate.env_id"], id.as_str());
    assert_eq!(labels["gpugate.deployment"], ctx.deployment.as_str());
    assert_eq!(c["Config"]["Hostname"], id.as_str());
    let envs: Vec<String> = serde_json::from_value(c["Config"]["Env"].clone()).expect("env list");
    for want in [
        format!("GPUGATE_ENV_ID={id}"),
        format!("GPUGATE_SSH_PORT={ssh}"),
        format!("GPUGATE_JUPYTER_PORT={jupyter}"),
        format!("GPUGATE_CODE_PORT={code}"),
        "GPUGATE_USER=remotegpu".to_string(),
        format!("GPUGATE_PASSWORD={password}"),
        format!("JUPYTER_TOKEN={token}"),
        "GPUGATE_GPUS=0".to_string(),
        "NVIDIA_VISIBLE_DEVICES=0".to_string(),
        format!("GPUGATE_SSH_PUBLIC_KEYS={key}"),
    ] {
        assert!(envs.contains(&want), "container env lacks {want}: {envs:?}");
    }
    // Inside the container: the GPU's device node and the variables code can print.
    let inside = ctx.exec(&cs[0], &["env"]);
    assert!(inside.contains("GPUGATE_GPUS=0") && inside.contains(&format!("GPUGATE_SSH_PORT={ssh}")), "{inside}");
    ctx.exec(&cs[0], &["ls", "/dev/nvidia0"]);
    let devs = ctx.exec(&cs[0], &["ls", "/dev"]);
    assert!(!devs.contains("nvidia1"), "only the allocated GPU is mapped: {devs}");

    // Route slots point at the published addresses on loopback.
    let table = ctx.table();
    let now = gpugate_routes::now_ms();
    for (p, cport, svc) in [(ssh, 22, "ssh"), (jupyter, 8888, "jupyter"), (code, 8080, "code")] {
        let up = published(&c, cport);
        assert!(up.ip().is_loopback(), "{up}");
        match table.lookup(p, now) {
            Lookup::Live(r) => {
                assert_eq!(r.upstream, up, "port {p}");
                assert_eq!(r.env_id.as_str(), id);
                assert_eq!(r.service.as_str(), svc);
                assert!(r.generation > 0);
            }
            other => panic!("port {p}: {other:?}"),
        }
    }
    let (s, st) = ctx.get("/api/v1/ports/stats", &alice).await;
    assert_eq!(s, 200);
    let ssh_stats = st["data"].as_array().expect("list").iter().find(|x| x["service"] == "ssh").expect("ssh").clone();
    assert_eq!(ssh_stats["total"], 10);
    assert_eq!(ssh_stats["allocated"], 1);
    assert_eq!(ssh_stats["available"], 9);

    // Delete: container, routes and the allocation go; ports wait in quarantine.
    let (s, d) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["data"]["status"], "deleted");
    assert!(ctx.containers().is_empty(), "container left behind");
    let now = gpugate_routes::now_ms();
    for p in [ssh, jupyter, code] {
        assert_eq!(table.lookup(p, now), Lookup::Absent, "port {p} still routed");
    }
    assert_eq!(ctx.route_rows().await, 0);
    for (p, _, status, env) in ctx.port_rows().await {
        let p = p as u16;
        if [ssh, jupyter, code].contains(&p) {
            assert_eq!((status.as_str(), env.as_deref()), ("quarantined", None), "port {p}");
        } else {
            assert_eq!(status, "available", "port {p}");
        }
    }
    let gpus: i64 = sqlx::query_scalar("SELECT count(*) FROM gpu_devices WHERE status = 'available'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("gpus");
    assert_eq!(gpus, 2);
    let (s, g) = ctx.get(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!((s, g["code"].as_u64()), (404, Some(1005)));

    // After the quarantine the ports are available again.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (_, st) = ctx.get("/api/v1/ports/stats", &alice).await;
    for s in st["data"].as_array().expect("list") {
        assert_eq!(s["quarantined"], 0, "{s}");
        assert_eq!(s["available"], s["total"], "{s}");
    }
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_port_is_not_handed_out_during_quarantine() {
    let mut ctx = Ctx::new("quarantine").await;
    ctx.cfg.quarantine_s = 2;
    ctx.cfg.pools.retain(|k, _| k == "ssh");
    ctx.cfg.pools.get_mut("ssh").expect("ssh").range = "20500-20500".parse().expect("range");
    ctx.cfg.default_services = vec!["ssh".into()];
    let alice = ctx.token("alice", false).await;
    ctx.start().await;

    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "a"})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let (s, _) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 200);
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "b"})).await;
    assert_eq!((s, v["code"].as_u64()), (503, Some(1009)), "{v}");
    assert_eq!(v["message"], "no free ssh port");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "c"})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["ports"]["ssh"], 20500);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_keeps_ports_and_other_users_get_404() {
    let mut ctx = Ctx::new("stopstart").await;
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    ctx.start().await;

    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "nb", "services": ["ssh", "jupyter"]})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let ports = v["data"]["ports"].clone();
    assert_eq!(keys(&ports), set(&["ssh", "jupyter"]));
    let ssh = ports["ssh"].as_u64().expect("ssh") as u16;

    // Another user's token: 404 everywhere, and an empty list.
    for (m, path) in [
        (reqwest::Method::GET, format!("/api/v1/environments/{id}")),
        (reqwest::Method::GET, format!("/api/v1/environments/{id}/access")),
        (reqwest::Method::POST, format!("/api/v1/environments/{id}/stop")),
        (reqwest::Method::POST, format!("/api/v1/environments/{id}/start")),
        (reqwest::Method::DELETE, format!("/api/v1/environments/{id}")),
    ] {
        let (s, v) = ctx.call(&ctx.base, m.clone(), &path, &bob, None).await;
        assert_eq!((s, v["code"].as_u64()), (404, Some(1005)), "{m} {path}: {v}");
    }
    let (_, list) = ctx.get("/api/v1/environments", &bob).await;
    assert_eq!(list["data"], json!([]));
    let (_, list) = ctx.get("/api/v1/environments", &alice).await;
    assert_eq!(list["data"].as_array().expect("list").len(), 1);

    // Stop: routes disabled (connections refused), container stopped, ports kept.
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/stop"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["status"], "stopped");
    assert_eq!(v["data"]["ports"], ports);
    let table = ctx.table();
    assert_eq!(table.lookup(ssh, gpugate_routes::now_ms()), Lookup::Absent);
    let revoked = table.revoke_epoch(ssh);
    assert!(revoked >= 1, "stopping revokes the sessions open on the port (epoch {revoked})");
    let cs = ctx.containers();
    assert_eq!(cs.len(), 1);
    assert_eq!(ctx.inspect(&cs[0])["State"]["Running"], false);
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/stop"), &alice, json!({})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1006)), "{v}");

    // Start: same ports, routes back at the (new) published address.
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/start"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["status"], "running");
    assert_eq!(v["data"]["ports"], ports);
    assert_eq!(v["data"]["routes_live"], true);
    let c = ctx.inspect(&cs[0]);
    assert_eq!(c["State"]["Running"], true);
    match table.lookup(ssh, gpugate_routes::now_ms()) {
        Lookup::Live(r) => assert_eq!(r.upstream, published(&c, 22)),
        other => panic!("{other:?}"),
    }
    let (_, a) = ctx.get(&format!("/api/v1/environments/{id}/access"), &alice).await;
    assert_eq!(a["data"]["access_info"]["ssh"]["port"], ssh);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_grow_within_their_bound_and_reserved_ports_are_never_handed_out() {
    let mut ctx = Ctx::new("reload").await;
    ctx.cfg.pools.retain(|k, _| k == "ssh");
    ctx.cfg.default_services = vec!["ssh".into()];
    let file = ctx.dir.join("api.toml");
    let write = |range: &str| {
        let text = format!("default_services = [\"ssh\"]\n[pools.ssh]\nrange = \"{range}\"\nbound = \"20000-20009\"\nreserved = [20000]\n");
        std::fs::write(&file, text).expect("write config");
    };
    write("20000-20001");
    let from_file = gpugate_api::config::Config::load_with(Some(&file), &|_| None).expect("config");
    ctx.cfg.pools = from_file.pools;
    ctx.cfg.source = Some(file.clone());
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;

    // 20000 is reserved, so the pool of two hands out one port.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "a"})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["ports"]["ssh"], 20001);
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "b"})).await;
    assert_eq!(s, 503, "{v}");

    // Grow within the bound: the next create succeeds, with no restart.
    write("20000-20003");
    let (s, v) = ctx.post("/api/v1/admin/pools/reload", &alice, json!({})).await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = ctx.post("/api/v1/admin/pools/reload", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["added"], 2);
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "c"})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["ports"]["ssh"], 20002);

    // Leaving the bound, or shrinking under allocated ports, is refused and changes nothing.
    write("20000-20010");
    let (s, v) = ctx.post("/api/v1/admin/pools/reload", &admin, json!({})).await;
    assert_eq!((s, v["code"].as_u64()), (422, Some(1002)), "{v}");
    write("20000-20000");
    let (s, v) = ctx.post("/api/v1/admin/pools/reload", &admin, json!({})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1006)), "{v}");
    let msg = v["message"].as_str().expect("message");
    assert!(msg.contains("20001") && msg.contains("20002"), "{msg}");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM port_pool").fetch_one(ctx.db().pool()).await.expect("count");
    assert_eq!(total, 4);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_reserved_and_a_gpu_retired_while_held_never_come_back() {
    let mut ctx = Ctx::new("reserved").await;
    ctx.cfg.quarantine_s = 1;
    ctx.cfg.pools.retain(|k, _| k == "ssh");
    ctx.cfg.default_services = vec!["ssh".into()];
    let file = ctx.dir.join("api.toml");
    let write = |reserved: &str| {
        let text = format!("default_services = [\"ssh\"]\n[pools.ssh]\nrange = \"20000-20001\"\nreserved = [{reserved}]\n");
        std::fs::write(&file, text).expect("write config");
    };
    write("");
    let from_file = gpugate_api::config::Config::load_with(Some(&file), &|_| None).expect("config");
    ctx.cfg.pools = from_file.pools;
    ctx.cfg.source = Some(file.clone());
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;

    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "a", "gpus": 2})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["ports"]["ssh"], 20000);
    let id = v["data"]["id"].as_str().expect("id").to_string();

    // While the environment holds it, port 20000 is listed as reserved; GPU 1 leaves the host.
    write("20000");
    let (s, v) = ctx.post("/api/v1/admin/pools/reload", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    ctx.stop().await;
    ctx.cfg.pools = gpugate_api::config::Config::load_with(Some(&file), &|_| None).expect("config").pools;
    ctx.cfg.gpu.devices = vec![0];
    ctx.start().await;

    let (s, _) = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let rows = ctx.port_rows().await;
    assert_eq!(rows.iter().find(|r| r.0 == 20000).map(|r| r.2.as_str()), Some("reserved"), "{rows:?}");
    let gpu1: String = sqlx::query_scalar("SELECT status FROM gpu_devices WHERE idx = 1").fetch_one(ctx.db().pool()).await.expect("gpu");
    assert_eq!(gpu1, "retired");

    // The pool hands out 20001 and then nothing: 20000 never again.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "b", "gpus": 1})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["data"]["ports"]["ssh"], 20001);
    assert_eq!(v["data"]["gpus"], json!([0]));
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "c"})).await;
    assert_eq!((s, v["message"].as_str()), (503, Some("no free ssh port")), "{v}");
    let (_, st) = ctx.get("/api/v1/ports/stats", &alice).await;
    assert_eq!((st["data"][0]["reserved"].as_i64(), st["data"][0]["available"].as_i64()), (Some(1), Some(0)), "{st}");
    ctx.finish().await;
}

#[test]
fn dns_prints_one_wildcard_record_per_service() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpugate-api"))
        .args(["dns", "--address", "203.0.113.10"])
        .env_remove("GPUGATE_CONFIG")
        .output()
        .expect("run gpugate-api dns");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        vec![
            "*.code.x-gpu.com. 300 IN A 203.0.113.10",
            "*.jupyter.x-gpu.com. 300 IN A 203.0.113.10",
            "*.rdp.x-gpu.com. 300 IN A 203.0.113.10",
            "*.ssh.x-gpu.com. 300 IN A 203.0.113.10",
        ]
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_gpugate-api"))
        .args(["check-config"])
        .env("GPUGATE_POOL_SSH", "60000-70000")
        .output()
        .expect("run gpugate-api");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("GPUGATE_POOL_SSH") && err.contains("not a TCP port"), "{err}");
}
