//! Tenants are strangers, through real containers: workspaces cannot reach each other, a fork
//! bomb or a memory hog in one leaves the other (and its own other processes) working, the
//! limits (open files too) and dropped capabilities are what `docker inspect` shows, and only
//! allowed images run.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{ssh_login, Ctx, ISO_IMAGE};
use serde_json::{json, Value};

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("docker CLI")
}

/// The container of environment `id`.
fn container_of(ctx: &Ctx, id: &str) -> String {
    let out = docker(&["ps", "-aq", "--filter", &format!("label=gpugate.deployment={}", ctx.deployment), "--filter", &format!("label=gpugate.env_id={id}")]);
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 1, "containers of {id}: {ids:?}");
    ids[0].clone()
}

/// Talks TCP from inside `container` to `addr:port` (an HTTP request; sshd answers with its
/// banner first); returns whether anything came back.
fn reaches(container: &str, addr: &str, port: u16) -> bool {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc -w 3 {addr} {port}");
    let out = docker(&["exec", container, "sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.contains("SSH-2.0") || text.contains("workspace")
}

async fn create(ctx: &Ctx, token: &str, body: Value) -> Value {
    let (s, v) = ctx.post("/api/v1/environments", token, body).await;
    assert_eq!(s, 201, "{v}");
    v["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_are_isolated_limited_and_confined() {
    common::ensure_iso_image();
    let mut ctx = Ctx::new("isolation").await;
    ctx.cfg.docker.default_image = ISO_IMAGE.into();
    ctx.cfg.docker.allowed_images = vec![ISO_IMAGE.into()];
    ctx.cfg.docker.limits.memory_mb = 1024;
    ctx.cfg.docker.limits.max_memory_mb = 4096;
    ctx.cfg.docker.limits.open_files = 4096;
    ctx.cfg.default_services = vec!["ssh".into(), "jupyter".into()];
    let (key, public) = common::keypair(&ctx);
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    ctx.start().await;

    // Only allowed images, and limits up to the deployment's maximum.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "x", "image": "gpugate-test/tiny:1"})).await;
    assert_eq!((s, v["code"].as_u64()), (422, Some(1002)), "{v}");
    let msg = v["message"].as_str().expect("message");
    assert!(msg.contains("docker.allowed_images") && msg.contains(ISO_IMAGE), "{msg}");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "x", "memory_mb": 8192})).await;
    assert_eq!((s, v["code"].as_u64()), (422, Some(1002)), "{v}");
    assert!(v["message"].as_str().expect("message").contains("4096"), "{v}");
    assert!(ctx.containers().is_empty());

    let a = create(&ctx, &alice, json!({"name": "a", "memory_mb": 64, "cpus": 0.5, "pids": 64, "ssh_public_keys": [public]})).await;
    let b = create(&ctx, &bob, json!({"name": "b", "ssh_public_keys": [public]})).await;
    let (ca, cb) = (container_of(&ctx, a["id"].as_str().expect("id")), container_of(&ctx, b["id"].as_str().expect("id")));
    // SSH goes to the container's published address (the gateway, which would route the
    // public port there, is not part of these tests).
    let a_ssh = common::published(&ctx.inspect(&ca), 22).port();
    let b_ssh = common::published(&ctx.inspect(&cb), 22).port();

    // docker inspect: limits, capabilities, no-new-privileges, restart policy, network.
    let ia = ctx.inspect(&ca);
    let hc = &ia["HostConfig"];
    assert_eq!(hc["Memory"], 64 * 1024 * 1024, "{hc}");
    assert_eq!(hc["MemorySwap"], 64 * 1024 * 1024, "{hc}");
    assert_eq!(hc["NanoCpus"], 500_000_000u64, "{hc}");
    assert_eq!(hc["PidsLimit"], 64, "{hc}");
    assert_eq!(hc["CapDrop"], json!(["ALL"]), "{hc}");
    let added: Vec<String> = serde_json::from_value(hc["CapAdd"].clone()).expect("CapAdd");
    for dangerous in ["NET_RAW", "NET_ADMIN", "SYS_ADMIN", "MKNOD", "SYS_PTRACE", "SETFCAP"] {
        assert!(!added.iter().any(|c| c.trim_start_matches("CAP_") == dangerous), "{dangerous} kept: {added:?}");
    }
    assert_eq!(hc["SecurityOpt"], json!(["no-new-privileges:true"]), "{hc}");
    assert_eq!(hc["RestartPolicy"]["Name"], "unless-stopped", "{hc}");
    let net = ctx.cfg.network();
    let ib = ctx.inspect(&cb);
    assert_eq!(ib["HostConfig"]["Memory"], 1024u64 * 1024 * 1024, "the default limit");
    let netinfo: Value = serde_json::from_slice(&docker(&["network", "inspect", &net]).stdout).expect("network JSON");
    assert_eq!(netinfo[0]["Options"]["com.docker.network.bridge.enable_icc"], "false");
    // Named, not by id (two API processes starting together agree on the name only).
    assert_eq!(hc["NetworkMode"], net.as_str(), "{hc}");
    assert_eq!(
        ia["NetworkSettings"]["Networks"][net.as_str()]["NetworkID"],
        netinfo[0]["Id"],
        "A is attached to the deployment's network"
    );
    // Inside: no-new-privileges set, NET_RAW gone (no raw sockets: no ARP spoofing).
    let status = ctx.exec(&ca, &["cat", "/proc/1/status"]);
    assert!(status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')), "{status}");
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).expect("CapEff");
    let caps = u64::from_str_radix(cap_eff.split_whitespace().nth(1).expect("mask"), 16).expect("hex");
    assert_eq!(caps & (1 << 13), 0, "CAP_NET_RAW is effective: {cap_eff}");
    assert_eq!(caps & (1 << 21), 0, "CAP_SYS_ADMIN is effective: {cap_eff}");
    // Open files: the deployment's limit, soft and hard (not the daemon's default), and a
    // process cannot raise it.
    let limits = ctx.exec(&ca, &["sh", "-c", "ulimit -Sn; ulimit -Hn"]);
    assert_eq!(limits.split_whitespace().collect::<Vec<_>>(), ["4096", "4096"], "{limits}");
    let raised = docker(&["exec", &ca, "sh", "-c", "ulimit -n 8192"]);
    assert!(!raised.status.success(), "a workspace raised its open-files limit past the deployment's");

    // Network: B listens on its bridge address (B reaches itself there), A cannot reach it.
    let b_ip = ib["NetworkSettings"]["Networks"][&net]["IPAddress"].as_str().expect("B's address").to_string();
    assert!(!b_ip.is_empty());
    assert!(reaches(&cb, &b_ip, 22) && reaches(&cb, &b_ip, 8888), "B's services are not listening on {b_ip}");
    assert!(!reaches(&ca, &b_ip, 22), "A reached B's SSH at {b_ip}:22");
    assert!(!reaches(&ca, &b_ip, 8888), "A reached B's Jupyter port at {b_ip}:8888");
    // Published ports still work: both log in over SSH through the host.
    assert!(ssh_login(a_ssh, &key), "no SSH login to A");
    assert!(ssh_login(b_ssh, &key), "no SSH login to B");

    // Memory: a process allocating past A's 64 MiB is killed; A's other processes and B live on.
    let started = ia["State"]["StartedAt"].clone();
    let hog = docker(&["exec", &ca, "sh", "-c", "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo ${#x}"]);
    assert!(!hog.status.success(), "allocating 300 MB in a 64 MiB workspace succeeded: {}", String::from_utf8_lossy(&hog.stdout));
    assert_eq!(hog.status.code(), Some(137), "the hog should be killed (SIGKILL): {hog:?}");
    let ia = ctx.inspect(&ca);
    assert_eq!((ia["State"]["Running"].clone(), ia["State"]["StartedAt"].clone()), (json!(true), started), "A restarted");
    assert_eq!(ctx.exec(&ca, &["wget", "-q", "-O-", "http://127.0.0.1:8888/"]).trim(), "workspace");
    assert!(ssh_login(a_ssh, &key), "A's sshd died with the hog");
    assert!(ssh_login(b_ssh, &key), "B suffered from A's hog");

    // Pids: a fork bomb in A is stopped by its limit of 64 (the kernel refuses its forks);
    // B's SSH login still works meanwhile.
    // The loop re-lights the bomb whenever its tree collapses at the limit, for as long as A runs.
    let bomb = docker(&["exec", "-d", &ca, "sh", "-c", "f() { f | f; }; while :; do f; done"]);
    assert!(bomb.status.success(), "{bomb:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(ssh_login(b_ssh, &key), "B's SSH login failed during A's fork bomb");
    for _ in 0..3 {
        let out = docker(&["stats", "--no-stream", "--format", "{{.PIDs}}", &ca]);
        let now: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("PIDs");
        assert!(now <= 64, "A holds {now} processes, over its limit of 64");
    }
    // The cgroup counts the forks it refused at the limit (cgroup v1 or v2 layout). An exec
    // may itself be refused while the bomb holds every slot, and a loaded host may take a
    // while to grow the bomb: poll, up to a minute (once, in a full run, 20 s were not enough).
    let mut refused = 0u64;
    let mut seen = String::new();
    for _ in 0..240 {
        let out = docker(&["exec", &ca, "sh", "-c", "cat /sys/fs/cgroup/pids/pids.events 2>/dev/null || cat /sys/fs/cgroup/pids.events"]);
        seen = String::from_utf8_lossy(&out.stdout).to_string();
        refused = seen.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        if refused > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if refused == 0 {
        // What else stopped the bomb, for the failure message (an OOM kill is the suspect).
        let out = docker(&["exec", &ca, "sh", "-c", "cat /sys/fs/cgroup/memory.events 2>/dev/null; ps -o pid,comm 2>/dev/null | wc -l"]);
        let memory = String::from_utf8_lossy(&out.stdout).to_string();
        panic!("the fork bomb never reached the pids limit (pids.events: {seen:?}; memory.events and process count: {memory:?})");
    }

    // A bombed workspace is still deletable.
    let (s, v) = ctx.delete(&format!("/api/v1/environments/{}", a["id"].as_str().expect("id")), &alice).await;
    assert_eq!(s, 200, "{v}");
    assert!(ssh_login(b_ssh, &key), "B lost SSH after A was deleted");
    ctx.finish().await;
}
