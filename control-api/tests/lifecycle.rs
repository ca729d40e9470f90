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

    // The access document has the seed's shape, plus the workspace's SSH host identity.
    let (s, a) = ctx.get(&format!("/api/v1/environments/{id}/access"), &alice).await;
    assert_eq!(s, 200, "{a}");
    assert_eq!(keys(&a), set(&["code", "message", "data"]));
    assert_eq!(keys(&a["data"]), set(&["environment_id", "access_info"]));
    let info = &a["data"]["access_info"];
    assert_eq!(keys(info), set(&["ssh", "jupyter", "code_server"]));
    assert_eq!(
        keys(&info["ssh"]),
        set(&["host", "port", "username", "password", "command", "cert_authority", "host_key", "known_hosts"])
    );
    assert_eq!(keys(&info["jupyter"]), set(&["url", "token"]));
    assert_eq!(keys(&info["code_server"]), set(&["url", "password"]));
    let host = format!("{id}.ssh.x-gpu.com");
    assert_eq!(info["ssh"]["host"], host.as_str());
    assert_eq!(info["ssh"]["port"], ssh);
    assert_eq!(info["ssh"]["command"], format!("ssh -p {ssh} remotegpu@{host}").as_str());
    let ca = info["ssh"]["cert_authority"].as_str().expect("the CA line");
    assert!(ca.starts_with("@cert-authority *.ssh.x-gpu.com,[*.ssh.x-gpu.com]:* ssh-ed25519 "), "{ca}");
    let host_key = info["ssh"]["host_key"].as_str().expect("the host key");
    assert!(host_key.starts_with("ssh-ed25519 "), "{host_key}");
    assert_eq!(info["ssh"]["known_hosts"], format!("{host} {host_key}\n[{host}]:{ssh} {host_key}\n").as_str());
    // Pool ports are plain TCP through the gateway: the URL says http, never https.
    assert_eq!(info["jupyter"]["url"], format!("http://{id}.jupyter.x-gpu.com:{jupyter}/").as_str());
    assert_eq!(info["code_server"]["url"], format!("http://{id}.code.x-gpu.com:{code}/").as_str());
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
    let env_of = |c: &serde_json::Value, name: &str| -> String {
        let prefix = format!("{name}=");
        c["Config"]["Env"].as_array().expect("env").iter().filter_map(|e| e.as_str()?.strip_prefix(&prefix)).collect()
    };
    let key_before = env_of(&ctx.inspect(&cs[0]), "GPUGATE_SSH_HOST_KEY");
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/stop"), &alice, json!({})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1006)), "{v}");

    // Start: same ports, routes back at the (new) published address of a new container.
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/start"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["status"], "running");
    assert_eq!(v["data"]["ports"], ports);
    assert_eq!(v["data"]["routes_live"], true);
    let fresh = ctx.containers();
    assert_eq!(fresh.len(), 1, "the stopped container is replaced, not kept beside the new one");
    assert_ne!(fresh[0], cs[0], "a start re-creates the container");
    let c = ctx.inspect(&fresh[0]);
    assert_eq!(c["State"]["Running"], true);
    assert_eq!(c["Config"]["Hostname"], id.as_str());
    assert_eq!(c["Config"]["Labels"]["gpugate.env_id"], id.as_str());
    match table.lookup(ssh, gpugate_routes::now_ms()) {
        Lookup::Live(r) => assert_eq!(r.upstream, published(&c, 22)),
        other => panic!("{other:?}"),
    }
    let (_, a) = ctx.get(&format!("/api/v1/environments/{id}/access"), &alice).await;
    assert_eq!(a["data"]["access_info"]["ssh"]["port"], ssh);
    // The new container has the workspace's host key of before, with a certificate.
    assert_eq!(env_of(&c, "GPUGATE_SSH_HOST_KEY"), key_before, "a start changed the host key");
    assert!(key_before.contains("BEGIN OPENSSH PRIVATE KEY"), "{key_before}");
    assert!(env_of(&c, "GPUGATE_SSH_HOST_CERT").starts_with("ssh-ed25519-cert-v01@openssh.com "));
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

/// The GPU indexes a container has device nodes for (`/dev/nvidia<N>`).
fn gpu_nodes(ctx: &Ctx, container: &str) -> Vec<u32> {
    common::nvidia_indexes(&ctx.exec(container, &["ls", "/dev"]))
}

/// GPU rows: (index, status, environment).
async fn gpu_rows(ctx: &Ctx) -> Vec<(i32, String, Option<String>)> {
    sqlx::query_as("SELECT idx, status, env_id FROM gpu_devices ORDER BY idx")
        .fetch_all(ctx.db().pool())
        .await
        .expect("gpu rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_gives_the_gpus_back_and_start_takes_them_again_keeping_the_home() {
    let mut ctx = Ctx::new("gpurelease").await;
    // A third stand-in GPU, so that a start can find some GPUs free but not enough.
    let node = ctx.dir.join("nvidia2");
    let ok = std::process::Command::new("mknod").arg(&node).args(["c", "1", "3"]).status().expect("mknod").success();
    assert!(ok, "mknod {}", node.display());
    ctx.cfg.gpu.devices = vec![0, 1, 2];
    ctx.cfg.default_services = vec!["ssh".into()];
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    ctx.start().await;

    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "a", "gpus": 2})).await;
    assert_eq!(s, 201, "{v}");
    let a = v["data"]["id"].as_str().expect("id").to_string();
    let ssh = v["data"]["ports"]["ssh"].as_u64().expect("port") as u16;
    assert_eq!((v["data"]["gpus"].clone(), v["data"]["gpu_count"].clone()), (json!([0, 1]), json!(2)));
    let old = ctx.containers();
    assert_eq!(old.len(), 1);
    assert_eq!(gpu_nodes(&ctx, &old[0]), vec![0, 1]);
    // A file in the home directory, which lives in the environment's volume.
    ctx.exec(&old[0], &["sh", "-c", "echo 'kept across stop and start' > /home/remotegpu/notes.txt"]);

    // Stop: the GPUs go back to the inventory at once, and another workspace can take them.
    let (s, v) = ctx.post(&format!("/api/v1/environments/{a}/stop"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["data"]["status"].clone(), v["data"]["gpus"].clone(), v["data"]["gpu_count"].clone()), (json!("stopped"), json!([]), json!(2)));
    let rows = gpu_rows(&ctx).await;
    assert!(rows.iter().all(|r| r.1 == "available" && r.2.is_none()), "{rows:?}");
    let (s, v) = ctx.post("/api/v1/environments", &bob, json!({"name": "b", "gpus": 3})).await;
    assert_eq!(s, 201, "a stopped environment's GPUs are free for others: {v}");
    let b = v["data"]["id"].as_str().expect("id").to_string();
    assert_eq!(v["data"]["gpus"], json!([0, 1, 2]));

    // Start with none free: 409 naming the counts; the environment stays stopped, holds
    // nothing, and its container is left alone.
    let (s, v) = ctx.post(&format!("/api/v1/environments/{a}/start"), &alice, json!({})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1008)), "{v}");
    assert_eq!(v["message"], format!("not enough free GPUs on host local (where its home volume is) to start environment {a}: 0 free, 2 needed"));
    assert_eq!(v["data"], json!({"gpus_free": 0, "gpus_needed": 2}));
    let (_, g) = ctx.get(&format!("/api/v1/environments/{a}"), &alice).await;
    assert_eq!((g["data"]["status"].clone(), g["data"]["gpus"].clone()), (json!("stopped"), json!([])), "{g}");
    assert!(gpu_rows(&ctx).await.iter().all(|r| r.2.as_deref() == Some(b.as_str())));
    assert_eq!(ctx.containers().len(), 2, "a refused start makes no container and removes none");
    assert!(ctx.containers().contains(&old[0]));

    // Some free but not enough: the message says how many.
    let (s, _) = ctx.delete(&format!("/api/v1/environments/{b}"), &bob).await;
    assert_eq!(s, 200);
    let (s, v) = ctx.post("/api/v1/environments", &bob, json!({"name": "c", "gpus": 2})).await;
    assert_eq!(s, 201, "{v}");
    let c = v["data"]["id"].as_str().expect("id").to_string();
    let (s, v) = ctx.post(&format!("/api/v1/environments/{a}/start"), &alice, json!({})).await;
    assert_eq!((s, v["data"].clone()), (409, json!({"gpus_free": 1, "gpus_needed": 2})), "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("1 free, 2 needed"), "{v}");
    let rows = gpu_rows(&ctx).await;
    assert_eq!(rows[2], (2, "available".to_string(), None), "the refused start kept no GPU: {rows:?}");

    // The quota still counts a stopped environment's GPUs (its share, not the devices): with
    // a GPU quota of 2, alice cannot take another while her 2 are given back.
    let two = gpugate_api::db::quotas::Overrides { gpus: Some(2), ..Default::default() };
    assert!(gpugate_api::db::quotas::set(ctx.db(), "alice", two).await.expect("quota"));
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "e", "gpus": 1})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1011)), "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("GPUs 2 in use + 1 requested > 2 allowed"), "{v}");
    let (s, _) = ctx.delete(&format!("/api/v1/environments/{c}"), &bob).await;
    assert_eq!(s, 200);
    let (s, v) = ctx.post("/api/v1/environments", &bob, json!({"name": "d", "gpus": 1})).await;
    assert_eq!((s, v["data"]["gpus"].clone()), (201, json!([0])), "{v}");

    // Start: the GPUs that are free now (1 and 2, not the 0 and 1 it had), in a new container
    // on the same ports, with the same home.
    let (s, v) = ctx.post(&format!("/api/v1/environments/{a}/start"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["data"]["status"].clone(), v["data"]["gpus"].clone()), (json!("running"), json!([1, 2])));
    assert_eq!(v["data"]["ports"]["ssh"], ssh);
    assert_eq!(v["data"]["routes_live"], true);
    let mine: Vec<String> = ctx.containers().into_iter().filter(|id| ctx.inspect(id)["Config"]["Labels"]["gpugate.env_id"] == a.as_str()).collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_ne!(mine[0], old[0], "the container was re-created");
    assert_eq!(gpu_nodes(&ctx, &mine[0]), vec![1, 2], "device nodes of the new GPUs only");
    let env = ctx.exec(&mine[0], &["env"]);
    assert!(env.contains("GPUGATE_GPUS=1,2") && env.contains(&format!("GPUGATE_SSH_PORT={ssh}")), "{env}");
    assert_eq!(ctx.exec(&mine[0], &["cat", "/home/remotegpu/notes.txt"]), "kept across stop and start\n");
    let inspected = ctx.inspect(&mine[0]);
    assert_eq!(inspected["Config"]["Hostname"], a.as_str());
    match ctx.table().lookup(ssh, gpugate_routes::now_ms()) {
        Lookup::Live(r) => assert_eq!(r.upstream, published(&inspected, 22)),
        other => panic!("{other:?}"),
    }
    let rows = gpu_rows(&ctx).await;
    assert_eq!(rows.iter().filter(|r| r.2.as_deref() == Some(a.as_str())).map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_home_volume_goes_with_delete_and_orphans_go_with_the_reconciler() {
    let mut ctx = Ctx::new("volumes").await;
    ctx.cfg.default_services = vec!["ssh".into()];
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;

    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "a"})).await;
    assert_eq!(s, 201, "{v}");
    let a = v["data"]["id"].as_str().expect("id").to_string();
    let volume = |id: &str| format!("gpugate-{}-{id}-home", ctx.deployment);
    assert_eq!(ctx.volumes(), vec![volume(&a)]);
    let cs = ctx.containers();
    let mounts = ctx.inspect(&cs[0])["Mounts"].clone();
    let home = mounts.as_array().expect("mounts").iter().find(|m| m["Destination"] == "/home/remotegpu").cloned();
    let home = home.unwrap_or_else(|| panic!("no mount on the home: {mounts}"));
    assert_eq!((home["Type"].as_str(), home["Name"].as_str()), (Some("volume"), Some(volume(&a).as_str())));

    // Delete removes the volume after the container.
    let (s, _) = ctx.delete(&format!("/api/v1/environments/{a}"), &alice).await;
    assert_eq!(s, 200);
    assert_eq!(ctx.volumes(), Vec::<String>::new(), "the deleted environment's volume is left");

    // Labelled volumes of a deleted environment and of one never known go; the volume of a
    // live environment and one of another deployment stay.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "b"})).await;
    assert_eq!(s, 201, "{v}");
    let b = v["data"]["id"].as_str().expect("id").to_string();
    let make = |name: &str, deployment: &str, env: &str| {
        let out = std::process::Command::new("docker")
            .args(["volume", "create", "--label", "gpugate.managed=true", "--label"])
            .arg(format!("gpugate.deployment={deployment}"))
            .args(["--label", &format!("gpugate.env_id={env}"), name])
            .output()
            .expect("docker volume create");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let unknown = "zzzzzzzzzzzzzzzz";
    let foreign = format!("{}-other-deployment", volume(unknown));
    make(&volume(&a), &ctx.deployment, &a);
    make(&volume(unknown), &ctx.deployment, unknown);
    make(&foreign, &format!("{}x", ctx.deployment), unknown);
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    let foreign_kept = std::process::Command::new("docker").args(["volume", "inspect", &foreign]).output().expect("inspect").status.success();
    let _ = std::process::Command::new("docker").args(["volume", "rm", "-f", &foreign]).output();
    assert!(foreign_kept, "another deployment's volume was removed");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["volumes_removed"], 2, "{v}");
    assert_eq!(ctx.volumes(), vec![volume(&b)]);
    let metrics = ctx.http.get(format!("{}/metrics", ctx.base)).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("gpugate_reconcile_repairs_total{kind=\"volume_removed\"} 2"), "{metrics}");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'repair_volume_removed'")
        .fetch_one(ctx.db().pool())
        .await
        .expect("events");
    assert_eq!(events, 2);
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
