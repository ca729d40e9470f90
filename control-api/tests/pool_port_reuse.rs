//! A pool port that passes to another workspace never warns a strict OpenSSH client: host
//! names are per workspace and each certificate names its own, so nothing is pinned to the
//! port. Through the real workspace image, with a pool of one SSH port that a delete hands on
//! at once (no quarantine): a client with `StrictHostKeyChecking=yes`, `BatchMode` and a
//! known_hosts file holding only the deployment's CA line logs in to A and then to B on the
//! same port as each workspace's access information names it; so does a client without
//! certificate support that kept both workspaces' own lines; and one that pinned A's key to
//! B's name is refused (the check is real).

mod common;

use std::path::Path;
use std::process::Command;

use common::{container_and_port, workspace_image_present, Ctx, WORKSPACE_IMAGE};
use serde_json::{json, Value};

/// `ssh -p POOL_PORT remotegpu@HOST hostname` as a user types it from the access information,
/// strictly against `known_hosts` alone, the TCP connection made to the workspace's published
/// address (what the gateway forwards the pool port to).
fn strict_login(pool_port: u16, host: &str, upstream: u16, key: &Path, known_hosts: &Path) -> Result<String, String> {
    let out = Command::new("ssh")
        .args(["-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "-i"])
        .arg(key)
        .arg("-o")
        .arg(format!("ProxyCommand=nc 127.0.0.1 {upstream}"))
        .args(["-p", &pool_port.to_string(), &format!("remotegpu@{host}"), "hostname"])
        .output()
        .expect("ssh client");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

async fn create(ctx: &Ctx, token: &str, name: &str, public: &str) -> Value {
    let body = json!({"name": name, "access": {"ssh": "ports"}, "ssh_public_keys": [public], "wait": "ready"});
    let (s, v) = ctx.post("/api/v1/environments", token, body).await;
    assert_eq!(s, 201, "{v}");
    v["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_port_that_passes_to_another_workspace_never_warns_a_strict_client() {
    workspace_image_present();
    let mut ctx = Ctx::new("pool_port_reuse").await;
    ctx.cfg.docker.default_image = WORKSPACE_IMAGE.into();
    ctx.cfg.docker.allowed_images = vec![WORKSPACE_IMAGE.into()];
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.pools.get_mut("ssh").expect("ssh pool").range = "20000-20000".parse().expect("range");
    ctx.cfg.quarantine_s = 0;
    let (key, public) = common::keypair(&ctx);
    let alice = ctx.token("alice", false).await;
    ctx.start().await;

    let a = create(&ctx, &alice, "a", &public).await;
    let (a_id, pool_port) = (a["id"].as_str().expect("id").to_string(), a["ports"]["ssh"].as_u64().expect("port") as u16);
    let a_ssh = &a["access_info"]["ssh"];
    assert_eq!(a_ssh["command"].as_str(), Some(format!("ssh -p {pool_port} remotegpu@{}", a_ssh["host"].as_str().unwrap_or("")).as_str()));
    let ca_only = ctx.dir.join("known_hosts_ca");
    std::fs::write(&ca_only, format!("{}\n", a_ssh["cert_authority"].as_str().expect("CA line"))).expect("write");
    let own_lines = ctx.dir.join("known_hosts_own");
    std::fs::write(&own_lines, format!("{}\n", a_ssh["known_hosts"].as_str().expect("own lines"))).expect("write");
    let (_, a_upstream) = container_and_port(&ctx, &a_id);
    let a_host = a_ssh["host"].as_str().expect("host").to_string();
    assert_eq!(strict_login(pool_port, &a_host, a_upstream, &key, &ca_only).as_deref(), Ok(a_id.as_str()));
    assert_eq!(strict_login(pool_port, &a_host, a_upstream, &key, &own_lines).as_deref(), Ok(a_id.as_str()));

    // A goes; B gets the same (only) pool port at once.
    let (s, v) = ctx.delete(&format!("/api/v1/environments/{a_id}"), &alice).await;
    assert_eq!(s, 200, "{v}");
    let b = create(&ctx, &alice, "b", &public).await;
    let b_id = b["id"].as_str().expect("id").to_string();
    assert_eq!(b["ports"]["ssh"].as_u64(), Some(u64::from(pool_port)), "B did not get A's pool port: {b}");
    let b_ssh = &b["access_info"]["ssh"];
    let b_host = b_ssh["host"].as_str().expect("host").to_string();
    let (_, b_upstream) = container_and_port(&ctx, &b_id);

    // The same strict client, the same known_hosts: no warning, no prompt.
    assert_eq!(strict_login(pool_port, &b_host, b_upstream, &key, &ca_only).as_deref(), Ok(b_id.as_str()));
    // A client without certificate support that kept A's lines and adds B's.
    let mut both = std::fs::read_to_string(&own_lines).expect("read");
    both.push_str(&format!("{}\n", b_ssh["known_hosts"].as_str().expect("own lines")));
    std::fs::write(&own_lines, both).expect("write");
    assert_eq!(strict_login(pool_port, &b_host, b_upstream, &key, &own_lines).as_deref(), Ok(b_id.as_str()));
    // The check is real: A's key pinned to B's name and port is refused.
    let a_key = a_ssh["host_key"].as_str().expect("A's host key");
    let pinned = ctx.dir.join("known_hosts_pinned");
    std::fs::write(&pinned, format!("[{b_host}]:{pool_port} {a_key}\n")).expect("write");
    let refused = strict_login(pool_port, &b_host, b_upstream, &key, &pinned).expect_err("A's key accepted for B");
    assert!(refused.contains("Host key verification failed") || refused.contains("IDENTIFICATION HAS CHANGED"), "{refused}");

    let _ = ctx.delete(&format!("/api/v1/environments/{b_id}"), &alice).await;
    ctx.finish().await;
}
