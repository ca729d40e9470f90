//! Account keys through the real workspace image (`gpugate/workspace`, built by
//! `docker/build-images.sh`) and real OpenSSH: a key added through the API logs in to a running
//! workspace within 5 s, without a restart; password login turns off with it (`auto`) and back
//! on when the last key goes; a removed key is refused within 5 s; a change the API's own
//! follow-up missed is brought by the host prober's pass; a new container starts with the keys;
//! the workspace's script never goes back to an older generation; bad keys are a 422 naming why.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{container_and_port, workspace_image_present, Ctx, WORKSPACE_IMAGE};
use serde_json::{json, Value};

/// One login to `127.0.0.1:port` as remotegpu, with `key` (BatchMode) or the password
/// (through sshpass, the password in its environment); whether `echo` came back.
fn login(port: u16, key: Option<&Path>, password: Option<&str>) -> bool {
    let mut cmd = match password {
        Some(p) => {
            let mut c = Command::new("sshpass");
            c.arg("-e").arg("ssh").env("SSHPASS", p).args(["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"]);
            c
        }
        None => {
            let mut c = Command::new("ssh");
            c.args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no"]);
            c.arg("-i").arg(key.expect("a key or a password"));
            c
        }
    };
    let out = cmd
        .args([
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
            "-o", "ConnectionAttempts=1", "-o", "LogLevel=ERROR", "-p", &port.to_string(), "remotegpu@127.0.0.1",
            "echo logged-in",
        ])
        .output()
        .expect("ssh client");
    String::from_utf8_lossy(&out.stdout).contains("logged-in")
}

/// How long until `login` gives `want`, polled; `None` if not within `limit`.
fn until(limit: Duration, mut attempt: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if attempt() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

fn keypair(ctx: &Ctx, name: &str) -> (std::path::PathBuf, String) {
    let key = ctx.dir.join(name);
    let made = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", &format!("{name}@laptop"), "-f"]).arg(&key).status();
    assert!(made.expect("ssh-keygen").success());
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key").trim().to_string();
    (key, public)
}

fn fingerprint(key: &Path) -> String {
    let out = Command::new("ssh-keygen").arg("-lf").arg(key.with_extension("pub")).output().expect("ssh-keygen -l");
    String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1).expect("fingerprint").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_keys_reach_running_workspaces_and_password_login_follows_them() {
    workspace_image_present();
    let mut ctx = Ctx::new("account_keys").await;
    ctx.cfg.docker.default_image = WORKSPACE_IMAGE.into();
    ctx.cfg.docker.allowed_images = vec![WORKSPACE_IMAGE.into()];
    ctx.cfg.default_services = vec!["ssh".into()];
    // The prober's own passes stay out of the first part: what arrives within 5 s there is the
    // API's follow-up to the change. The test runs the prober's pass itself further down.
    ctx.cfg.fleet.probe_interval_s = 600;
    ctx.cfg.fleet.fail_after_s = 600;
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    ctx.start().await;
    let keys = "/api/v1/users/me/ssh-keys";

    // Bad keys: a 422 that says why, and nothing stored.
    let rsa2048 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC4zjn3va5eNC6WNw+XpJyrWB9UDAHbjsrEWhW0kbFkTM3liCTdqjJ/Q/qLxP9NeWWs/rAObxhh+3eKIyMNxZomJVv1Vj+7HztqEJ7/NyIDNGKUDktwQNWKGtQT+SHktnXmWJDBPAV2fThe+wpajk0KzVjG8TppvmyriKxvUrtv66UBTIL04Fu/lf6PiBziuytIr6nDNI7DbeSRNoOgDbc4gzzcHnYBhXlQU5BzMIKd0QpMSnnaVzdcl3GTKfPBTImqOkb5HhrDmKrEABKtBdgqk0DpuY5Gyyxyt6M0ac/vBzwSI6D6VGi1XFhlCQg0bbPY3qiShyIfwZmE1Pp+Go0t old@laptop";
    for (body, says) in [
        (json!({"public_key": rsa2048}), "at least 3072"),
        (json!({"public_key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE="}), "private key"),
        (json!({"public_key": "ssh-ed25519 not-a-key"}), "not an OpenSSH public key"),
        (json!({"public_key": ""}), "empty"),
        (json!({"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMsPYWUBvbtIOCU/jWO+Z73Es8vVe17lnQeHcpNTgfNn", "name": ""}), "name"),
        (json!({"key": "x"}), "unknown field"),
    ] {
        let (s, v) = ctx.post(keys, &alice, body.clone()).await;
        assert_eq!((s, v["code"].as_u64()), (422, Some(1002)), "{body}: {v}");
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{body}: {msg}");
    }
    let (s, v) = ctx.get(keys, &alice).await;
    assert_eq!((s, v["data"]["keys"].as_array().map(Vec::len), &v["data"]["password_login"]), (200, Some(0), &json!(true)), "{v}");

    // A running workspace with no key named at its create: the password logs in, no key does.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "w", "wait": "ready"})).await;
    assert_eq!(s, 201, "{v}");
    let id = v["data"]["id"].as_str().expect("id").to_string();
    let password = v["data"]["access_info"]["ssh"]["password"].as_str().expect("password").to_string();
    let (container, port) = container_and_port(&ctx, &id);
    let (laptop, laptop_pub) = keypair(&ctx, "laptop");
    let (desk, desk_pub) = keypair(&ctx, "desk");
    assert!(until(Duration::from_secs(20), || login(port, None, Some(&password))).is_some(), "no password login to the new workspace");
    assert!(!login(port, Some(&laptop), None), "a key nobody added logged in");

    // Added: the key logs in within 5 s, without a restart, and the password stops working.
    let (s, v) = ctx.post(keys, &alice, json!({"public_key": format!("  {laptop_pub}\n")})).await;
    assert_eq!(s, 201, "{v}");
    let laptop_id = v["data"]["id"].as_i64().expect("id");
    assert_eq!(v["data"]["name"], "laptop@laptop", "the name defaults to the key's comment");
    assert_eq!(v["data"]["fingerprint"].as_str(), Some(fingerprint(&laptop).as_str()), "not OpenSSH's fingerprint");
    assert!(!v["data"]["public_key"].as_str().unwrap_or_default().contains("laptop@"), "the comment reached the workspace's key");
    let took = until(Duration::from_secs(5), || login(port, Some(&laptop), None));
    let took = took.unwrap_or_else(|| panic!("the added key did not log in within 5 s; account keys file: {}", ctx.exec(&container, &["cat", "/etc/ssh/gpugate_account_keys"])));
    eprintln!("account key added → first login in {} ms", took.as_millis());
    assert!(
        until(Duration::from_secs(5), || !login(port, None, Some(&password))).is_some(),
        "password login still works once the owner has an account key (password_login auto)"
    );
    let (_, v) = ctx.get(keys, &alice).await;
    assert_eq!(v["data"]["password_login"], false, "{v}");
    assert_eq!(v["data"]["keys"][0]["id"].as_i64(), Some(laptop_id), "{v}");
    let started_at = ctx.inspect(&container)["State"]["StartedAt"].clone();

    // The same key again changes nothing; another user sees none of it and cannot remove it.
    let (s, v) = ctx.post(keys, &alice, json!({"public_key": laptop_pub, "name": "again"})).await;
    assert_eq!((s, v["data"]["id"].as_i64(), v["data"]["name"].as_str()), (200, Some(laptop_id), Some("laptop@laptop")), "{v}");
    let (_, v) = ctx.get(keys, &bob).await;
    assert_eq!(v["data"]["keys"], json!([]), "bob sees alice's keys: {v}");
    let (s, v) = ctx.delete(&format!("{keys}/{laptop_id}"), &bob).await;
    assert_eq!((s, v["code"].as_u64()), (404, Some(1005)), "bob removed alice's key: {v}");
    for bad in ["0", "abc", "99999999999999999999"] {
        let (s, _) = ctx.delete(&format!("{keys}/{bad}"), &alice).await;
        assert_eq!(s, 404, "{bad}");
    }

    // A change the API's follow-up never brought (as if its process died right after the
    // commit): the host prober's pass brings it.
    let st = ctx.running.as_ref().and_then(|r| r.state.clone()).expect("in-process state");
    let alice_id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE name = 'alice'").fetch_one(ctx.db().pool()).await.expect("alice");
    let desk_key = desk_pub.split(' ').take(2).collect::<Vec<_>>().join(" ");
    sqlx::query("INSERT INTO user_ssh_keys (user_id, name, public_key, fingerprint) VALUES ($1, 'desk', $2, 'SHA256:x')")
        .bind(alice_id)
        .bind(&desk_key)
        .execute(ctx.db().pool())
        .await
        .expect("insert");
    sqlx::query("UPDATE users SET ssh_keys_generation = ssh_keys_generation + 1 WHERE id = $1")
        .bind(alice_id)
        .execute(ctx.db().pool())
        .await
        .expect("bump");
    assert!(!login(port, Some(&desk), None), "the key logged in before anything brought it");
    gpugate_api::host_health::pass(&st, &mut Default::default()).await.expect("a probe pass");
    assert!(login(port, Some(&desk), None), "the prober's pass did not bring the missed key");
    assert!(login(port, Some(&laptop), None), "the earlier key went");

    // The workspace's script never goes back: an older generation changes nothing.
    let before = ctx.exec(&container, &["cat", "/etc/ssh/gpugate_account_keys"]);
    let said = ctx.exec(&container, &["gpugate-account-keys", "1", "yes", &desk_key]);
    assert_eq!(said.trim(), "stale");
    assert_eq!(ctx.exec(&container, &["cat", "/etc/ssh/gpugate_account_keys"]), before, "an older generation was written");
    assert!(!login(port, None, Some(&password)), "an older generation turned the password back on");

    // Removed: refused within 5 s; with no account key left the password works again (auto).
    let desk_id: i64 = sqlx::query_scalar("SELECT id FROM user_ssh_keys WHERE name = 'desk'").fetch_one(ctx.db().pool()).await.expect("id");
    for kid in [laptop_id, desk_id] {
        let (s, v) = ctx.delete(&format!("{keys}/{kid}"), &alice).await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, _) = ctx.delete(&format!("{keys}/{laptop_id}"), &alice).await;
    assert_eq!(s, 404, "a key removed twice");
    assert!(
        until(Duration::from_secs(5), || !login(port, Some(&laptop), None)).is_some(),
        "a removed key still logs in after 5 s"
    );
    assert!(!login(port, Some(&desk), None), "the other removed key still logs in");
    assert!(
        until(Duration::from_secs(5), || login(port, None, Some(&password))).is_some(),
        "no password login after the last account key went"
    );
    assert_eq!(ctx.inspect(&container)["State"]["StartedAt"], started_at, "the workspace was restarted");

    // A new container starts with the owner's keys: logs in at once after a start.
    let (s, v) = ctx.post(keys, &alice, json!({"public_key": desk_pub})).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/stop"), &alice, json!({})).await;
    assert!(s == 200 || s == 202, "{v}");
    assert_eq!(ctx.status_within_10s(&alice, &id, "stopped").await, "stopped");
    let (s, v) = ctx.post(&format!("/api/v1/environments/{id}/start"), &alice, json!({"wait": "ready"})).await;
    assert!(s == 200 || s == 202, "{v}");
    assert_eq!(ctx.status_within_10s(&alice, &id, "running").await, "running");
    let (new_container, port) = container_and_port(&ctx, &id);
    assert_ne!(new_container, container);
    assert!(until(Duration::from_secs(20), || login(port, Some(&desk), None)).is_some(), "the new container lacks the account key");
    assert!(!login(port, None, Some(&password)), "the new container takes the password though the owner has a key");
    let metrics = ctx.metrics_with(&ctx.base, &["gpugate_account_key_syncs_total{result=\"ok\"}"]).await;
    assert!(metrics.contains("gpugate_account_key_syncs_total"), "{metrics}");

    let _: Value = ctx.delete(&format!("/api/v1/environments/{id}"), &alice).await.1;
    ctx.finish().await;
}
