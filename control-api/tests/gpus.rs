//! GPUs the way GPU hosts run them, over a real second Docker engine: device requests of
//! driver `nvidia` (what `docker run --gpus` sends) served by a stand-in
//! `nvidia-container-runtime-hook` on that engine's PATH, an inventory discovered by UUID from a
//! stand-in `nvidia-smi`, and the start-up check of the mode against the engine.

mod common;

use common::engine::Engine;
use common::{Ctx, IMAGE};
use gpugate_api::config::GpuMode;
use serde_json::{json, Value};

const A100_0: &str = "0, GPU-0a0a0a0a-0000-4000-8000-000000000000, NVIDIA A100-SXM4-80GB, 81920 MiB";
const H100_1: &str = "1, GPU-1b1b1b1b-1111-4111-8111-111111111111, NVIDIA H100 80GB HBM3, 81559 MiB";
const A100_2: &str = "2, GPU-2c2c2c2c-2222-4222-8222-222222222222, NVIDIA A100-SXM4-80GB, 81920 MiB";
const H100_3: &str = "3, GPU-3d3d3d3d-3333-4333-8333-333333333333, NVIDIA H100 80GB HBM3, 81559 MiB";

/// The UUID of an nvidia-smi line.
fn uuid(line: &str) -> &str {
    line.split(", ").nth(1).expect("uuid field")
}

/// A test world whose API runs its workspaces on `engine`, with the inventory discovered from
/// the engine's stand-in nvidia-smi, in `mode`.
async fn ctx_on(engine: &Engine, name: &str, mode: GpuMode) -> Ctx {
    let mut ctx = Ctx::new(name).await;
    engine.load_image(IMAGE);
    ctx.cfg.docker.endpoint = engine.endpoint();
    ctx.cfg.gpu.mode = mode;
    ctx.cfg.gpu.devices = vec![];
    ctx.cfg.gpu.nvidia_smi = vec![engine.nvidia_smi().display().to_string()];
    ctx.cfg.default_services = vec!["ssh".into()];
    ctx
}

/// The container of environment `id` on `engine`.
fn container_of(engine: &Engine, id: &str) -> String {
    let out = engine.docker(&["ps", "-q", "--filter", &format!("label=gpugate.env_id={id}")]);
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 1, "one running container for {id}: {ids:?}");
    ids[0].clone()
}

/// The value of `name` in the environment of a container's first process: what Docker put in
/// the container's OCI spec from the device request, which `docker exec` would not show.
fn env_of(engine: &Engine, container: &str, name: &str) -> Option<String> {
    let env = engine.exec(container, &["cat", "/proc/1/environ"]);
    env.split('\0').find_map(|l| l.strip_prefix(&format!("{name}=")).map(str::to_string))
}

fn uuids_of(v: &Value) -> Vec<String> {
    v["gpu_devices"].as_array().expect("gpu_devices").iter().map(|g| g["uuid"].as_str().expect("uuid").to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvidia_mode_gives_each_workspace_exactly_its_gpus_by_uuid() {
    let engine = Engine::start(true);
    engine.set_gpus(&[A100_0, H100_1, A100_2, H100_3]);
    let mut ctx = ctx_on(&engine, "gpunvidia", GpuMode::Nvidia).await;
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;

    // The inventory as discovered: four GPUs keyed by UUID, with their models and memory.
    let (s, v) = ctx.get("/api/v1/gpus", &admin).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["data"]["mode"].as_str(), v["data"]["source"].as_str()), (Some("nvidia"), Some("nvidia-smi")), "{v}");
    let gpus = v["data"]["gpus"].as_array().expect("gpus");
    let ids: Vec<&str> = gpus.iter().map(|g| g["id"].as_str().expect("id")).collect();
    assert_eq!(ids, vec![uuid(A100_0), uuid(H100_1), uuid(A100_2), uuid(H100_3)], "{v}");
    assert_eq!((gpus[1]["name"].as_str(), gpus[1]["memory_mib"].as_i64()), (Some("NVIDIA H100 80GB HBM3"), Some(81559)));
    assert!(gpus.iter().all(|g| g["status"] == "available" && g["in_inventory"] == true), "{v}");
    let (s, _) = ctx.get("/api/v1/gpus", &alice).await;
    assert_eq!(s, 403, "the inventory is for admins");

    // A: two A100s. Its container sees exactly their two devices, and Docker named their
    // UUIDs to the hook in NVIDIA_VISIBLE_DEVICES.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "a", "gpus": 2, "gpu_model": "a100"})).await;
    assert_eq!(s, 201, "{v}");
    let a = v["data"]["id"].as_str().expect("id").to_string();
    assert_eq!(v["data"]["gpus"], json!([0, 2]), "{v}");
    assert_eq!(v["data"]["gpu_model"], "a100");
    assert_eq!(uuids_of(&v["data"]), vec![uuid(A100_0), uuid(A100_2)]);
    assert!(v["data"]["gpu_devices"].as_array().expect("devices").iter().all(|g| g["name"] == "NVIDIA A100-SXM4-80GB"), "{v}");
    let ca = container_of(&engine, &a);
    assert_eq!(engine.gpu_nodes(&ca), vec![0, 2]);
    let want_a = format!("{},{}", uuid(A100_0), uuid(A100_2));
    assert_eq!(env_of(&engine, &ca, "NVIDIA_VISIBLE_DEVICES").as_deref(), Some(want_a.as_str()));
    assert_eq!(env_of(&engine, &ca, "NVIDIA_DRIVER_CAPABILITIES").as_deref(), Some("compute,utility"));
    let req = &engine.inspect(&ca)["HostConfig"]["DeviceRequests"][0];
    assert_eq!(req["Driver"], "nvidia", "{req}");
    assert!(engine.hook_log().contains(&format!("prestart devices={want_a}")), "{}", engine.hook_log());

    // B: two of any model get the other two.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "b", "gpus": 2})).await;
    assert_eq!(s, 201, "{v}");
    let b = v["data"]["id"].as_str().expect("id").to_string();
    assert_eq!(v["data"]["gpus"], json!([1, 3]), "{v}");
    let cb = container_of(&engine, &b);
    assert_eq!(engine.gpu_nodes(&cb), vec![1, 3]);
    let want_b = format!("{},{}", uuid(H100_1), uuid(H100_3));
    assert_eq!(env_of(&engine, &cb, "NVIDIA_VISIBLE_DEVICES").as_deref(), Some(want_b.as_str()));
    assert_eq!(engine.gpu_nodes(&ca), vec![0, 2], "A's devices are unchanged");

    // C: none free.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "c", "gpus": 1})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1008)), "{v}");
    assert_eq!(v["data"], json!({"gpus_free": 0, "gpus_needed": 1}));

    // With B gone two H100s are free: a request for an A100 is a 409 naming what is free.
    let (s, _) = ctx.delete(&format!("/api/v1/environments/{b}"), &alice).await;
    assert_eq!(s, 200);
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "c", "gpus": 1, "gpu_model": "A100"})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1008)), "{v}");
    assert_eq!(v["message"], "1 GPUs of model \"A100\" requested, 0 free on any one host; free now: NVIDIA H100 80GB HBM3 (2)");
    assert_eq!(
        v["data"],
        json!({"gpus_free": 0, "gpus_needed": 1, "gpu_model": "A100", "free_by_model": {"NVIDIA H100 80GB HBM3": 2}})
    );
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "c", "gpus": 2, "gpu_model": "H100"})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(uuids_of(&v["data"]), vec![uuid(H100_1), uuid(H100_3)]);

    // A start takes the model asked for at create again: with an A100 taken meanwhile, A's
    // start is refused naming its model, although no GPU of another model would do either.
    let (s, v) = ctx.post(&format!("/api/v1/environments/{a}/stop"), &alice, json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "d", "gpus": 1})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(uuids_of(&v["data"]), vec![uuid(A100_0)]);
    let (s, v) = ctx.post(&format!("/api/v1/environments/{a}/start"), &alice, json!({})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1008)), "{v}");
    assert_eq!(
        v["message"],
        format!("not enough free GPUs of model \"a100\" on host local (where its home volume is) to start environment {a}: 1 free, 2 needed; free now: NVIDIA A100-SXM4-80GB (1)")
    );
    ctx.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_adds_new_gpus_and_retires_vanished_ones_which_are_never_handed_out() {
    let engine = Engine::start(true);
    let g0 = "0, GPU-aaaaaaaa-0000-4000-8000-000000000000, NVIDIA L4, 23034 MiB";
    let g1 = "1, GPU-bbbbbbbb-1111-4111-8111-111111111111, NVIDIA L4, 23034 MiB";
    let g2 = "2, GPU-cccccccc-2222-4222-8222-222222222222, NVIDIA L4, 23034 MiB";
    engine.set_gpus(&[g0, g1, g2]);
    let mut ctx = ctx_on(&engine, "gpudiscover", GpuMode::Nvidia).await;
    let alice = ctx.token("alice", false).await;
    let admin = ctx.token("root", true).await;
    ctx.start().await;

    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "a", "gpus": 1})).await;
    assert_eq!(s, 201, "{v}");
    let a = v["data"]["id"].as_str().expect("id").to_string();
    assert_eq!(uuids_of(&v["data"]), vec![uuid(g0)]);

    // The host changes: g0 (held by A) and g1 (free) disappear, g2 comes back at index 0 (as
    // after a reboot), and a new GPU g9 appears at index 3.
    let g2_now = "0, GPU-cccccccc-2222-4222-8222-222222222222, NVIDIA L4, 23034 MiB";
    let g9 = "3, GPU-99999999-9999-4999-8999-999999999999, NVIDIA L40S, 46068 MiB";
    engine.set_gpus(&[g2_now, g9]);
    let (s, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["data"]["gpus_added"].as_u64(), v["data"]["gpus_retired"].as_u64()), (Some(1), Some(2)), "{v}");
    let (_, v) = ctx.get("/api/v1/gpus", &admin).await;
    let row = |key: &str| -> Value {
        v["data"]["gpus"].as_array().expect("gpus").iter().find(|g| g["id"] == key).cloned().unwrap_or(Value::Null)
    };
    assert_eq!((row(uuid(g1))["status"].as_str(), row(uuid(g1))["in_inventory"].as_bool()), (Some("retired"), Some(false)), "{v}");
    // The one A holds is reported with A until A lets it go.
    let held = row(uuid(g0));
    assert_eq!((held["status"].as_str(), held["in_inventory"].as_bool(), held["env_id"].as_str()), (Some("allocated"), Some(false), Some(a.as_str())), "{v}");
    assert_eq!((row(uuid(g2))["index"].as_i64(), row(uuid(g2))["status"].as_str()), (Some(0), Some("available")), "{v}");
    assert_eq!((row(uuid(g9))["name"].as_str(), row(uuid(g9))["status"].as_str()), (Some("NVIDIA L40S"), Some("available")), "{v}");
    let vanished: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE kind = 'gpu_vanished' AND env_id = $1")
        .bind(&a)
        .fetch_one(ctx.db().pool())
        .await
        .expect("events");
    assert_eq!(vanished, 1);

    // The host has two GPUs now; B gets exactly them, by UUID, at their new indexes.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "b", "gpus": 3})).await;
    assert_eq!((s, v["message"].as_str()), (422, Some("3 GPUs requested, the largest host has 2")), "{v}");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "b", "gpus": 2})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(uuids_of(&v["data"]), vec![uuid(g2), uuid(g9)]);
    let cb = container_of(&engine, v["data"]["id"].as_str().expect("id"));
    assert_eq!(engine.gpu_nodes(&cb), vec![0, 3]);
    let want = format!("{},{}", uuid(g2), uuid(g9));
    assert_eq!(env_of(&engine, &cb, "NVIDIA_VISIBLE_DEVICES").as_deref(), Some(want.as_str()));

    // The vanished GPUs are never handed out: not the free one, not the one A gives back.
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "c", "gpus": 1})).await;
    assert_eq!((s, v["code"].as_u64(), v["data"]["gpus_free"].as_u64()), (409, Some(1008), Some(0)), "{v}");
    let (s, _) = ctx.delete(&format!("/api/v1/environments/{a}"), &alice).await;
    assert_eq!(s, 200);
    let (_, v) = ctx.get("/api/v1/gpus", &admin).await;
    let g0_row = v["data"]["gpus"].as_array().expect("gpus").iter().find(|g| g["id"] == uuid(g0)).cloned().expect("g0");
    assert_eq!((g0_row["status"].as_str(), g0_row["env_id"].as_str()), (Some("retired"), None), "{v}");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "c", "gpus": 1})).await;
    assert_eq!((s, v["code"].as_u64()), (409, Some(1008)), "{v}");

    // g1 comes back: it is handed out again.
    engine.set_gpus(&[g2_now, g1, g9]);
    let (_, v) = ctx.post("/api/v1/admin/reconcile", &admin, json!({})).await;
    assert_eq!(v["data"]["gpus_added"].as_u64(), Some(1), "{v}");
    let (s, v) = ctx.post("/api/v1/environments", &alice, json!({"name": "c", "gpus": 1})).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(uuids_of(&v["data"]), vec![uuid(g1)]);
    let cc = container_of(&engine, v["data"]["id"].as_str().expect("id"));
    assert_eq!(engine.gpu_nodes(&cc), vec![1]);
    ctx.finish().await;
}

/// Starts the API with `ctx.cfg`; returns the refusal's message, or `None` when it started
/// (and is stopped again).
async fn start_refusal(ctx: &Ctx) -> Option<String> {
    match gpugate_api::app::start(ctx.cfg.clone(), gpugate_api::app::Mode::Api { publisher: false }).await {
        Ok(running) => {
            running.shutdown().await;
            None
        }
        Err(e) => Some(format!("{e:#}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_refuses_a_gpu_mode_the_engine_cannot_serve() {
    // An engine without the NVIDIA Container Toolkit's hook.
    let engine = Engine::start(false);
    engine.set_gpus(&[A100_0]);
    let mut ctx = ctx_on(&engine, "gpucheck", GpuMode::Nvidia).await;
    ctx.connect().await;

    let e = start_refusal(&ctx).await.expect("mode nvidia is refused without the hook");
    assert!(e.contains("gpu.mode = \"nvidia\"") && e.contains("no \"nvidia\" device driver"), "{e}");
    assert!(e.contains("could not select device driver"), "the engine's own words: {e}");
    assert!(e.contains("install the NVIDIA Container Toolkit"), "names the fix: {e}");
    // Nothing was taken into the inventory by a refused start.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM gpu_devices").fetch_one(ctx.db().pool()).await.expect("rows");
    assert_eq!(rows, 0);

    // CDI needs Docker Engine 25: refused on an older engine, accepted on a newer one.
    let out = engine.docker(&["version", "--format", "{{.Server.Version}}"]);
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).expect("engine version");
    ctx.cfg.gpu.mode = GpuMode::Cdi;
    let cdi = start_refusal(&ctx).await;
    let auto = {
        ctx.cfg.gpu.mode = GpuMode::Auto;
        start_refusal(&ctx).await
    };
    if major < 25 {
        let e = cdi.expect("mode cdi is refused before Docker 25");
        assert!(e.contains("gpu.mode = \"cdi\"") && e.contains("Docker Engine 25 or newer"), "{e}");
        assert!(e.contains(&format!("this engine is {version}")), "{e}");
        let e = auto.expect("auto finds neither the nvidia driver nor CDI");
        assert!(e.contains("neither the \"nvidia\" device driver") && e.contains("gpu.mode = \"nodes\""), "{e}");
    } else {
        assert_eq!(cdi, None, "Docker {version} has CDI");
        assert_eq!(auto, None, "auto falls back to CDI on Docker {version}");
    }

    // Mode nodes needs nothing of the engine: the same host starts.
    ctx.cfg.gpu.mode = GpuMode::Nodes;
    assert_eq!(start_refusal(&ctx).await, None);

    // A discovery command that fails is a refusal naming the setting, never an empty inventory.
    ctx.cfg.gpu.nvidia_smi = vec!["/bin/false".into()];
    let e = start_refusal(&ctx).await.expect("a failing discovery is refused");
    assert!(e.contains("GPU discovery") && e.contains("gpu.nvidia_smi"), "{e}");
    ctx.finish().await;
}
