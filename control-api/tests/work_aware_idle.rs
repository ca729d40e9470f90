//! Work-aware idle over real PostgreSQL and Docker: a workspace whose GPU is busy (a stand-in
//! `nvidia-smi` reporting its utilisation by UUID) is not idle with no connection at all; at
//! 0% it stops; an unknown (stale) sample is never busy; its owner's hold keeps it until the
//! hold ends; an `idle_warning` event always precedes the idle stop; and on a GPU host with no
//! API process of its own, the host prober samples the GPUs from inside the workspace.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::engine::Engine;
use common::Ctx;
use gpugate_api::config::GpuMode;
use serde_json::{json, Value};

const GPU_A: &str = "GPU-aaaaaaaa-0000-4000-8000-000000000000";
const GPU_B: &str = "GPU-bbbbbbbb-1111-4111-8111-111111111111";

/// The stand-in `nvidia-smi`: the inventory query prints `gpus.csv`, the utilisation query
/// prints `util.csv` (missing: it fails, like a broken driver), anything else is refused.
const SMI: &str = r#"#!/bin/sh
dir=$(dirname "$0")
case "$1" in
  --query-gpu=index,uuid,name,memory.total) exec cat "$dir/gpus.csv" ;;
  --query-gpu=uuid,utilization.gpu) exec cat "$dir/util.csv" ;;
  *) echo "stand-in nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"#;

/// Writes `text` to `path` whole (a reader never sees half of it).
fn write_whole(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Sets the utilisation the stand-in reports: (UUID, percent) lines; `None`: it fails.
fn set_utilization(smi: &Path, lines: Option<&[(&str, u8)]>) {
    let path = smi.with_file_name("util.csv");
    match lines {
        Some(lines) => write_whole(&path, &lines.iter().map(|(u, p)| format!("{u}, {p}\n")).collect::<String>()),
        None => {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// A test world with two GPUs (A at index 0, B at index 1) discovered by UUID from the
/// stand-in, passed as device nodes; idle checks every second, warnings 2 s before a stop.
async fn gpu_ctx(name: &str) -> (Ctx, PathBuf) {
    let mut ctx = Ctx::new(name).await;
    let bin = ctx.dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let smi = bin.join("nvidia-smi");
    write_whole(&smi, SMI);
    let made = std::process::Command::new("chmod").arg("755").arg(&smi).status().expect("chmod");
    assert!(made.success());
    write_whole(
        &bin.join("gpus.csv"),
        &format!("0, {GPU_A}, NVIDIA L4, 23034 MiB\n1, {GPU_B}, NVIDIA L4, 23034 MiB\n"),
    );
    set_utilization(&smi, Some(&[(GPU_A, 0), (GPU_B, 0)]));
    ctx.cfg.gpu.devices = vec![];
    ctx.cfg.gpu.mode = GpuMode::Nodes;
    ctx.cfg.gpu.nvidia_smi = vec![smi.display().to_string()];
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx.cfg.idle.check_interval_s = 1;
    // Samples count for three probe intervals too (those taken inside workspaces).
    ctx.cfg.fleet.probe_interval_s = 1;
    ctx.cfg.idle.warning_before_s = 2;
    ctx.cfg.idle.gpu_busy_percent = 10;
    (ctx, smi)
}

async fn create(ctx: &Ctx, token: &str, name: &str, gpus: u32, idle_s: u64) -> (String, Value) {
    let (s, v) = ctx.post("/api/v1/environments", token, json!({"name": name, "gpus": gpus, "idle_stop_after_s": idle_s})).await;
    assert_eq!(s, 201, "{v}");
    (v["data"]["id"].as_str().expect("id").to_string(), v["data"].clone())
}

async fn env_view(ctx: &Ctx, token: &str, id: &str) -> Value {
    let (s, v) = ctx.get(&format!("/api/v1/environments/{id}"), token).await;
    assert_eq!(s, 200, "{v}");
    v["data"].clone()
}

/// Waits until `pred` holds of the environment's view; returns it, or panics with the last
/// view after `secs`.
async fn wait_view(ctx: &Ctx, token: &str, id: &str, secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = env_view(ctx, token, id).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {secs} s: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stopped by the idle task (the reason comes once the stop finished).
fn idle_stopped(v: &Value) -> bool {
    v["status"] == "stopped" && v["status_reason"].as_str().is_some_and(|r| r.starts_with("idle for "))
}

/// The environment's idle events, oldest first.
async fn idle_events(ctx: &Ctx, id: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT kind FROM events WHERE env_id = $1 AND kind IN ('idle_warning', 'idle_stopped') ORDER BY id",
    )
    .bind(id)
    .fetch_all(ctx.db().pool())
    .await
    .expect("events")
}

fn time(v: &Value) -> DateTime<Utc> {
    v.as_str().and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("not a timestamp: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_gpu_keeps_its_workspace_running_and_an_idle_one_stops_after_a_warning() {
    let (mut ctx, smi) = gpu_ctx("idlegpu").await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;

    // A holds GPU A (90%), B holds GPU B (0%); both stop after 3 idle seconds, and neither
    // ever has a connection.
    set_utilization(&smi, Some(&[(GPU_A, 90), (GPU_B, 0)]));
    let (a, v) = create(&ctx, &alice, "busy", 1, 3).await;
    assert_eq!(v["gpu_devices"][0]["uuid"], GPU_A, "{v}");
    let (b, v) = create(&ctx, &alice, "quiet", 1, 3).await;
    assert_eq!(v["gpu_devices"][0]["uuid"], GPU_B, "{v}");
    let started = Instant::now();

    // B is idle: warned, then stopped; the warning came first.
    let v = wait_view(&ctx, &alice, &b, 20, "B stopped as idle", idle_stopped).await;
    assert_eq!(idle_events(&ctx, &b).await, vec!["idle_warning", "idle_stopped"], "{v}");

    // A runs on through three idle intervals past its limit, with no connection at all; the
    // view shows the sample and why A is not idle.
    while started.elapsed() < Duration::from_secs(3 + 3 * 2 + 1) {
        let v = env_view(&ctx, &alice, &a).await;
        assert_eq!(v["status"], "running", "a workspace with a busy GPU was stopped: {v}");
        assert_eq!(v["idle"]["waiting_because"], "gpu_busy", "{v}");
        let g = &v["idle"]["gpu_utilization"][0];
        assert_eq!((g["gpu"].as_str(), g["percent"].as_u64(), g["fresh"].as_bool(), g["busy"].as_bool()), (Some(GPU_A), Some(90), Some(true), Some(true)), "{v}");
        assert!(v["idle"]["stop_at"].is_null(), "a busy GPU has no known end: {v}");
        assert_eq!(v["idle_seconds"], 0, "{v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(idle_events(&ctx, &a).await.is_empty(), "a busy workspace is not even warned");
    let (_, v) = ctx.get(&format!("/api/v1/environments/{a}/access"), &alice).await;
    assert!(v["data"]["access_info"]["ssh"].is_object(), "{v}");

    // At 0% A is idle: its clock restarts at its last busy sample, it is warned, then stopped.
    set_utilization(&smi, Some(&[(GPU_A, 0), (GPU_B, 0)]));
    let v = wait_view(&ctx, &alice, &a, 10, "A's GPU sampled idle", |v| v["idle"]["gpu_utilization"][0]["percent"] == 0).await;
    assert!(v["idle"]["waiting_because"].is_null(), "{v}");
    assert!(v["idle"]["stop_at"].is_string(), "an idle workspace has a stop time: {v}");
    let v = wait_view(&ctx, &alice, &a, 20, "A stopped once its GPU is idle", idle_stopped).await;
    assert_eq!(idle_events(&ctx, &a).await, vec!["idle_warning", "idle_stopped"], "{v}");
    assert!(v.get("idle").is_none(), "a stopped workspace has no idle clock: {v}");

    let metrics = ctx.metrics_with(&ctx.base, &["gpugate_idle_warnings_total 2", "gpugate_idle_stops_total 2"]).await;
    let keeps = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gpugate_idle_gpu_busy_keeps_total "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .expect("the keeps counter");
    assert!(keeps >= 3, "one keep per check while A was busy: {keeps}");
    assert!(metrics.contains("gpugate_gpu_utilization_samples_total{result=\"ok\",source=\"host\"}"), "{metrics}");
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_utilisation_is_never_busy() {
    let (mut ctx, smi) = gpu_ctx("idlestale").await;
    let alice = ctx.token("alice", false).await;
    ctx.start().await;
    set_utilization(&smi, Some(&[(GPU_A, 100), (GPU_B, 100)]));
    let (a, _) = create(&ctx, &alice, "busy", 1, 3).await;
    wait_view(&ctx, &alice, &a, 10, "A's GPU sampled busy", |v| v["idle"]["waiting_because"] == "gpu_busy").await;

    // nvidia-smi breaks: the last sample goes stale (unknown, not busy) and A stops as idle.
    set_utilization(&smi, None);
    let v = wait_view(&ctx, &alice, &a, 10, "A's sample stale", |v| v["idle"]["gpu_utilization"][0]["fresh"] == false).await;
    assert_eq!((v["idle"]["gpu_utilization"][0]["percent"].as_u64(), v["idle"]["gpu_utilization"][0]["busy"].as_bool()), (Some(100), Some(false)), "{v}");
    let v = wait_view(&ctx, &alice, &a, 20, "A stopped with its utilisation unknown", idle_stopped).await;
    assert_eq!(idle_events(&ctx, &a).await, vec!["idle_warning", "idle_stopped"], "{v}");
    ctx.metrics_with(&ctx.base, &["gpugate_gpu_utilization_samples_total{result=\"failed\",source=\"host\"}"]).await;
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_keeps_a_workspace_until_it_ends_and_is_validated() {
    let (mut ctx, _smi) = gpu_ctx("idlehold").await;
    ctx.cfg.idle.max_hold_s = 3600;
    let alice = ctx.token("alice", false).await;
    let bob = ctx.token("bob", false).await;
    ctx.start().await;
    let hold = |id: &str, token: &str, body: Value| {
        let (path, token) = (format!("/api/v1/environments/{id}/hold"), token.to_string());
        let ctx = &ctx;
        async move { ctx.post(&path, &token, body).await }
    };
    // H is held at once (its limit, 60 s, is far), then its limit is lowered to 2 s.
    let (h, _) = create(&ctx, &alice, "held", 0, 60).await;
    let (s, v) = hold(&h, &alice, json!({"seconds": 600})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["idle"]["waiting_because"], "held", "{v}");
    let (s, v) = ctx.call(&ctx.base, reqwest::Method::PATCH, &format!("/api/v1/environments/{h}"), &alice, Some(json!({"idle_stop_after_s": 2}))).await;
    assert_eq!(s, 200, "{v}");
    let (never, _) = create(&ctx, &alice, "never", 0, 0).await;

    // Bad requests change nothing: a hold over the deployment's longest, a negative or
    // fractional one, an unknown field, another user's or an unknown environment.
    for bad in [json!({"seconds": 3601}), json!({"seconds": -1}), json!({"seconds": 1.5}), json!({"secs": 5}), json!({})] {
        let (s, v) = hold(&h, &alice, bad.clone()).await;
        assert_eq!((s, v["code"].as_u64()), (422, Some(1002)), "{bad}: {v}");
    }
    let (_, v) = hold(&h, &alice, json!({"seconds": 3601})).await;
    assert!(v["message"].as_str().unwrap_or_default().contains("longest hold of 3600 s"), "{v}");
    let (s, v) = hold(&h, &bob, json!({"seconds": 60})).await;
    assert_eq!(s, 404, "another user's environment is unknown: {v}");
    let (s, v) = hold("zzzzzzzzzzzzzzzz", &alice, json!({"seconds": 60})).await;
    assert_eq!(s, 404, "{v}");

    // A long hold, then a release: the view follows.
    let (s, v) = hold(&never, &alice, json!({"seconds": 600})).await;
    assert_eq!(s, 200, "{v}");
    let until = time(&v["data"]["idle"]["held_until"]);
    assert!((until - Utc::now()).num_seconds() > 590, "{v}");
    assert!(v["data"]["idle"]["waiting_because"].is_null() && v["data"]["idle"]["stop_at"].is_null(), "no limit, no stop: {v}");
    let (s, v) = hold(&never, &alice, json!({"seconds": 0})).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["data"]["idle"]["held_until"].is_null(), "released: {v}");

    // H (limit 2 s) held for 5 s from now instead: it runs until the hold ends, then is
    // warned and stopped.
    let (s, v) = hold(&h, &alice, json!({"seconds": 5})).await;
    assert_eq!(s, 200, "{v}");
    let held_until = time(&v["data"]["idle"]["held_until"]);
    assert_eq!(v["data"]["idle"]["waiting_because"], "held", "{v}");
    let stop_at = time(&v["data"]["idle"]["stop_at"]);
    let after = (stop_at - held_until).num_milliseconds();
    assert!((1990..=2000).contains(&after), "the idle clock starts at the hold's end ({after} ms): {v}");
    while Utc::now() < held_until - chrono::Duration::milliseconds(300) {
        let v = env_view(&ctx, &alice, &h).await;
        assert_eq!(v["status"], "running", "stopped while held: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(idle_events(&ctx, &h).await.is_empty(), "no warning while held");
    let v = wait_view(&ctx, &alice, &h, 20, "H stopped after its hold", idle_stopped).await;
    assert_eq!(idle_events(&ctx, &h).await, vec!["idle_warning", "idle_stopped"], "{v}");
    let warned_at: DateTime<Utc> = sqlx::query_scalar("SELECT at FROM events WHERE env_id = $1 AND kind = 'idle_warning'")
        .bind(&h)
        .fetch_one(ctx.db().pool())
        .await
        .expect("warning");
    assert!(warned_at >= held_until, "warned during the hold: {warned_at} < {held_until}");

    // A stopped workspace cannot be held.
    let (s, v) = hold(&h, &alice, json!({"seconds": 60})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1006)), "{v}");
    let holds: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind IN ('idle_hold_set', 'idle_hold_released')")
        .fetch_one(ctx.db().pool())
        .await
        .expect("events");
    assert_eq!(holds, 4, "each accepted hold is in the audit trail, nothing else");
    ctx.finish().await;
}

/// The stand-in `nvidia-smi` inside a workspace (the tiny image has `sh` and `cat`): the
/// utilisation query prints `/tmp/util.csv`, anything else is refused.
const WORKSPACE_SMI: &str = r#"case "$1" in
  --query-gpu=uuid,utilization.gpu) exec cat /tmp/util.csv ;;
  *) echo "stand-in nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
"#;

/// A GPU host with no API process of its own (a second engine, GPUs listed by index): its
/// GPUs are sampled from inside the workspace by the host prober. A training run at 90% keeps
/// the workspace running with no connection; a sample that speaks for more GPUs than the
/// workspace holds is refused, the last one goes stale, and the workspace is warned and
/// stopped. Before the prober sampled workspaces, such a host's GPUs were never sampled and
/// the training workspace was stopped as idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_run_on_a_host_without_an_api_process_is_not_idle() {
    let (mut ctx, _smi) = gpu_ctx("idleremote").await;
    ctx.cfg.gpu.workspace_nvidia_smi = vec!["sh".into(), "/tmp/nvidia-smi".into()];
    let engine = Engine::start(false);
    engine.load_image(common::IMAGE);
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;
    let (s, v) = ctx.post("/api/v1/admin/hosts/local/drain", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let body = json!({"name": "h2", "docker_endpoint": engine.endpoint(), "upstream_address": "127.0.0.4", "gpus": [0, 1]});
    let (s, v) = ctx.post("/api/v1/admin/hosts", &admin, body).await;
    assert_eq!(s, 201, "{v}");

    let (id, v) = create(&ctx, &alice, "train", 1, 3).await;
    assert_eq!(v["host"], "h2", "{v}");
    let container: String = sqlx::query_scalar("SELECT container_id FROM environments WHERE id = $1")
        .bind(&id)
        .fetch_one(ctx.db().pool())
        .await
        .expect("container");
    let set = |text: &str| engine.exec(&container, &["sh", "-c", &format!("printf '%s' '{text}' > /tmp/util.csv")]);
    set(&format!("{GPU_A}, 90\n"));
    engine.exec(&container, &["sh", "-c", &format!("cat > /tmp/nvidia-smi <<'EOF'\n{WORKSPACE_SMI}EOF\n")]);
    let started = Instant::now();
    let v = wait_view(&ctx, &alice, &id, 10, "the workspace's GPU sampled busy", |v| v["idle"]["waiting_because"] == "gpu_busy").await;
    let g = &v["idle"]["gpu_utilization"][0];
    assert_eq!((g["percent"].as_u64(), g["busy"].as_bool()), (Some(90), Some(true)), "{v}");
    while started.elapsed() < Duration::from_secs(3 + 3 * 2 + 1) {
        let v = env_view(&ctx, &alice, &id).await;
        assert_eq!(v["status"], "running", "a training run on a host without an API process was stopped: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(idle_events(&ctx, &id).await.is_empty(), "a busy workspace is not even warned");

    // The workspace now claims two busy GPUs while it holds one: refused, never guessed. Its
    // last sample goes stale (unknown, never busy), and it is warned and stopped.
    set(&format!("{GPU_A}, 90\n{GPU_B}, 90\n"));
    let v = wait_view(&ctx, &alice, &id, 20, "stopped once its samples are refused", idle_stopped).await;
    assert_eq!(idle_events(&ctx, &id).await, vec!["idle_warning", "idle_stopped"], "{v}");
    ctx.metrics_with(
        &ctx.base,
        &[
            "gpugate_gpu_utilization_samples_total{result=\"ok\",source=\"workspace\"}",
            "gpugate_gpu_utilization_samples_total{result=\"failed\",source=\"workspace\"}",
        ],
    )
    .await;
    ctx.finish().await;
}
