//! `gpugate-api-bench`: control-plane measurements side by side in one run. It reports
//! ratios and percentiles; it never passes or fails on absolute times.
//!
//! 1. Port allocation: 32 concurrent clients split over two processes, our one-statement
//!    `FOR UPDATE SKIP LOCKED` allocation against the seed's method (a process mutex around
//!    `SELECT ... ORDER BY port LIMIT 1` then `UPDATE`): allocations/s and duplicates.
//! 2. Placement ([`fleet`]): 32 concurrent creates over two processes on two hosts of stand-in
//!    GPUs, `fleet::place` under `spread` and `pack` against the same creates serialised by a
//!    global lock (`LOCK TABLE gpu_devices IN EXCLUSIVE MODE`): creates/s, the ratio, and
//!    duplicates (every reported GPU checked against the database, nothing released meanwhile).
//! 3. Route activation: commit of a route transaction until the slot is live in the table.
//! 4. Route live on all gateways ([`fleet`]): two `gpugate-api publish` processes with a table
//!    each; commit until the slot is live in both, beside the first table alone (same samples).
//! 5. Create latency by step, with a small local image.
//! 6. Activity reports ([`activity`]): what the publishers' reports cost at 10,000 routes
//!    with 1,000 open sessions (CPU beside reporting off), and bytes moved until the API's
//!    fleet-wide sum shows them, on either of two gateways (`gpugate-api-bench activity`
//!    runs this row alone).
//!
//! Needs `DATABASE_URL` (a superuser URL; two scratch databases are created and dropped), a
//! local Docker with the image given by `--image`, and `gpugate-api` built next to this binary.
#![forbid(unsafe_code)]

mod activity;
mod fleet;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use gpugate_api::config::{Config, Placement, PoolConfig, QuotaConfig, Secret};
use gpugate_api::db::{self, ports, Db};
use gpugate_api::lifecycle::{self, CreateSpec};
use gpugate_routes::Service;
use sqlx::Connection;

#[derive(Parser)]
#[command(name = "gpugate-api-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// Image for the create benchmark (must exist locally).
    #[arg(long, default_value = "gpugate-test/tiny:1", global = true)]
    image: String,
    /// Creates to time.
    #[arg(long, default_value_t = 20, global = true)]
    creates: usize,
    /// Route activations to time.
    #[arg(long, default_value_t = 300, global = true)]
    activations: usize,
    /// Allocations per client in the allocation benchmark.
    #[arg(long, default_value_t = 60, global = true)]
    per_client: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Only row 6 (activity reports) on a scratch database.
    Activity {
        /// Seconds per phase (off, on, on with latency samples).
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// One allocation worker process (started by the benchmark itself).
    #[command(hide = true)]
    AllocWorker {
        #[arg(long)]
        url: String,
        #[arg(long)]
        method: String,
        #[arg(long)]
        clients: usize,
        #[arg(long)]
        per_client: usize,
        #[arg(long)]
        env_id: String,
    },
    /// One placement worker process (started by the benchmark itself).
    #[command(hide = true)]
    PlaceWorker {
        #[arg(long)]
        url: String,
        #[arg(long)]
        policy: Placement,
        /// Serialise every create with a global lock on the GPU table (the baseline).
        #[arg(long)]
        global_lock: bool,
        #[arg(long)]
        clients: usize,
        #[arg(long)]
        per_client: usize,
        /// The user owning the environments.
        #[arg(long)]
        owner: i64,
    },
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rand_suffix() -> String {
    gpugate_api::ids::env_id()[..8].to_string()
}

fn with_db(url: &str, db: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => url.to_string(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::AllocWorker { url, method, clients, per_client, env_id }) => {
            return alloc_worker(&url, &method, clients, per_client, &env_id).await;
        }
        Some(Cmd::PlaceWorker { url, policy, global_lock, clients, per_client, owner }) => {
            return fleet::place_worker(&url, policy, global_lock, clients, per_client, owner).await;
        }
        Some(Cmd::Activity { seconds }) => return activity_only(seconds).await,
        None => {}
    }
    let admin = std::env::var("DATABASE_URL").context("DATABASE_URL (a superuser URL) is required")?;
    // The API's database, and the fleet rows' own (no API loop runs on it).
    let name = format!("gg_bench_{}", rand_suffix());
    let names = [name.clone(), format!("{name}_fleet")];
    let mut conn = sqlx::PgConnection::connect(&admin).await?;
    let dir = std::env::temp_dir().join(format!("gpugate-bench-{}", rand_suffix()));
    let mut result = Ok(());
    for n in &names {
        if let Err(e) = sqlx::query(&format!("CREATE DATABASE \"{n}\"")).execute(&mut conn).await {
            result = Err(e.into());
            break;
        }
    }
    if result.is_ok() {
        result = match std::fs::create_dir_all(&dir) {
            Ok(()) => run(&cli, &with_db(&admin, &names[0]), &with_db(&admin, &names[1]), &dir).await,
            Err(e) => Err(e.into()),
        };
    }
    let _ = std::fs::remove_dir_all(&dir);
    for n in &names {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{n}\" WITH (FORCE)")).execute(&mut conn).await;
    }
    result
}

/// Row 6 alone, on a scratch database and directory.
async fn activity_only(seconds: u64) -> anyhow::Result<()> {
    let admin = std::env::var("DATABASE_URL").context("DATABASE_URL (a superuser URL) is required")?;
    let name = format!("gg_bench_{}", rand_suffix());
    let mut conn = sqlx::PgConnection::connect(&admin).await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await?;
    let dir = std::env::temp_dir().join(format!("gpugate-bench-{}", rand_suffix()));
    let result = async {
        let db = fleet::open(&config(&with_db(&admin, &name), &dir, "unused")).await?;
        activity::reports(&db, &dir, seconds).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut conn).await;
    result
}

fn config(url: &str, dir: &std::path::Path, image: &str) -> Config {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().expect("constant address"),
        database_url: Secret::new(url),
        database_max_connections: 40,
        route_table: dir.join("table").join("routes"),
        deployment: format!("bench{}", rand_suffix()),
        reconcile_interval_s: 3600,
        ..Config::default()
    };
    cfg.docker.default_image = image.into();
    cfg.docker.stop_timeout_s = 1;
    // One user makes every create: the default per-user quotas (10 environments) would stop
    // the create row half-way.
    cfg.quotas = QuotaConfig { environments: None, gpus: None, running: None };
    cfg.pools.clear();
    cfg.pools.insert("ssh".into(), PoolConfig { range: "40000-47999".parse().expect("constant range"), bound: None, reserved: vec![] });
    cfg.pools.insert("jupyter".into(), PoolConfig { range: "48000-48999".parse().expect("constant range"), bound: None, reserved: vec![] });
    cfg.pools.insert("code".into(), PoolConfig { range: "49000-49999".parse().expect("constant range"), bound: None, reserved: vec![] });
    cfg
}

async fn run(cli: &Cli, url: &str, fleet_url: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let cfg = config(url, dir, &cli.image);
    let running = gpugate_api::app::start(cfg.clone(), gpugate_api::app::Mode::Api { publisher: true }).await?;
    let st = running.state.clone().context("API state")?;
    let (user, _) = db::users::create_token(&st.db, "bench", false, None).await?;
    println!("gpugate control-plane benchmark (ratios side by side; absolute times depend on the machine)");

    // 1. Allocation throughput and duplicates, two processes of 16 clients each.
    let owner_env = bench_env(&st.db, user.id, &cfg.fleet.host_name).await?;
    let mut rates = vec![];
    println!("\n## port allocation: 32 concurrent clients over 2 processes, {} allocations each method", 32 * cli.per_client);
    for method in ["ours", "seed"] {
        sqlx::query("UPDATE port_pool SET status = 'available', env_id = NULL, released_at = NULL, quarantine_until = NULL WHERE service = 'ssh'")
            .execute(st.db.pool())
            .await?;
        let exe = std::env::current_exe()?;
        let mut children = vec![];
        let t = Instant::now();
        for _ in 0..2 {
            children.push(
                tokio::process::Command::new(&exe)
                    .args(["alloc-worker", "--url", url, "--method", method, "--clients", "16"])
                    .args(["--per-client", &cli.per_client.to_string(), "--env-id", &owner_env])
                    .stdout(Stdio::piped())
                    .spawn()?,
            );
        }
        let mut all: Vec<u16> = vec![];
        let mut busy = 0f64;
        for c in children {
            let out = c.wait_with_output().await?;
            if !out.status.success() {
                bail!("allocation worker failed");
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            all.extend(v["ports"].as_array().into_iter().flatten().filter_map(|p| p.as_u64()).map(|p| p as u16));
            busy = busy.max(v["seconds"].as_f64().unwrap_or(0.0));
        }
        let wall = t.elapsed().as_secs_f64();
        let unique: HashSet<u16> = all.iter().copied().collect();
        let rate = all.len() as f64 / busy;
        rates.push(rate);
        println!(
            "{method:>5}: {:>8.0} allocations/s  ({} allocations in {busy:.2} s of allocation, {wall:.2} s with process start)  duplicates: {}",
            rate,
            all.len(),
            all.len() - unique.len()
        );
    }
    println!("ratio ours/seed: {:.2}x", rates[0] / rates[1]);
    sqlx::query("UPDATE port_pool SET status = 'available', env_id = NULL, released_at = NULL WHERE service = 'ssh'")
        .execute(st.db.pool())
        .await?;

    // 2. Placement throughput and duplicates, on the fleet rows' own database.
    let fleet_db = fleet::open(&config(fleet_url, dir, &cli.image)).await?;
    let (placer, _) = db::users::create_token(&fleet_db, "bench-place", false, None).await?;
    fleet::placement(&fleet_db, fleet_url, placer.id, cli.per_client).await?;

    // 3. Route activation: commit -> live in the table (through NOTIFY and the publisher).
    let mut lat = vec![];
    let env_id: gpugate_routes::EnvId = owner_env.parse()?;
    for i in 0..cli.activations {
        let port = 40000 + (i % 1000) as u16;
        let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", 10000 + i).parse()?;
        let generation = commit_route(&st.db, &owner_env, port, upstream).await?;
        let t = Instant::now();
        let want = gpugate_routes::Route { upstream, env_id, service: Service::Ssh, generation: generation as u64, expires_ms: None };
        if !st.table.wait_live(&[(port, want)], &[], Duration::from_secs(5)).await {
            bail!("route {port} never went live");
        }
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    sqlx::query("DELETE FROM routes").execute(st.db.pool()).await?;
    sqlx::query("UPDATE port_pool SET status = 'available', env_id = NULL WHERE status = 'allocated'")
        .execute(st.db.pool())
        .await?;
    lat.sort_by(f64::total_cmp);
    println!("\n## route activation: commit -> slot live in the table ({} samples)", lat.len());
    println!("p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   (target p99 < 10 ms)", pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 1.0));

    // 4. Commit -> live on every gateway: two publisher processes on the fleet database.
    let gateway_env = bench_env(&fleet_db, placer.id, &cfg.fleet.host_name).await?;
    fleet::gateways(&fleet_db, fleet_url, dir, &gateway_env, cli.activations).await?;

    // 6. Activity reports: their cost to a gateway, and bytes -> the API's fleet-wide sum.
    activity::reports(&fleet_db, dir, 10).await?;
    fleet_db.pool().close().await;

    // 5. Create latency by step, small image, sequential creates.
    let mut steps: std::collections::BTreeMap<&'static str, Vec<f64>> = Default::default();
    let mut ids = vec![];
    for i in 0..cli.creates {
        let spec = CreateSpec { id: gpugate_api::ids::env_id(), idempotency: None, name: format!("b{i}"), image: None, gpus: 0, gpu_model: None, services: None, ssh_public_keys: vec![], memory_mb: None, cpus: None, pids: None, idle_stop_after_s: None, access: None };
        let out = lifecycle::create(&st, &user, spec).await.map_err(|e| anyhow::anyhow!("create: {e}"))?;
        for (k, v) in out.timings {
            steps.entry(k).or_default().push(v * 1000.0);
        }
        ids.push(out.env.id);
    }
    println!("\n## create environment latency by step ({} creates, image {}, 3 services)", cli.creates, cli.image);
    for k in ["database", "docker_create", "docker_start", "route_write", "total"] {
        let mut v = steps.remove(k).unwrap_or_default();
        v.sort_by(f64::total_cmp);
        println!("{k:>14}: p50 {:>8.2} ms   p99 {:>8.2} ms", pct(&v, 0.5), pct(&v, 0.99));
    }
    for id in ids {
        if let Err(e) = lifecycle::delete(&st, &user, &id).await {
            eprintln!("delete {id}: {e}");
        }
    }
    running.shutdown().await;
    Ok(())
}

/// An environment row on `host` to own the benchmark's allocations.
async fn bench_env(db: &Db, owner: i64, host: &str) -> anyhow::Result<String> {
    let id = gpugate_api::ids::env_id();
    sqlx::query("INSERT INTO environments (id, owner_id, name, image, status, services, username, password, jupyter_token, host) VALUES ($1, $2, 'bench', 'none', 'stopped', '{ssh}', 'u', 'p', 't', $3)")
        .bind(&id)
        .bind(owner)
        .bind(host)
        .execute(db.pool())
        .await?;
    Ok(id)
}

/// Commits a route of `env` on `port` to `upstream` (the port taken for it, a new generation)
/// as the lifecycle does; returns the generation. The publisher hears of it on commit.
async fn commit_route(db: &Db, env: &str, port: u16, upstream: std::net::SocketAddr) -> anyhow::Result<i64> {
    let mut tx = db.begin().await?;
    sqlx::query("UPDATE port_pool SET status = 'allocated', env_id = $2 WHERE port = $1")
        .bind(i32::from(port))
        .bind(env)
        .execute(&mut *tx)
        .await?;
    let generation = db::envs::next_generation(&mut tx, env).await?;
    db::routes::put(&mut tx, env, generation, &[(port, Service::Ssh, upstream)], &[]).await?;
    tx.commit().await?;
    Ok(generation)
}

/// One worker process: `clients` concurrent clients, `per_client` allocations each.
async fn alloc_worker(url: &str, method: &str, clients: usize, per_client: usize, env_id: &str) -> anyhow::Result<()> {
    let cfg = Config {
        database_url: Secret::new(url),
        database_max_connections: clients as u32 + 2,
        ..Config::default()
    };
    let db = Db::connect(&cfg).await?;
    // The seed's process-wide mutex: serialises this process only.
    let mutex = Arc::new(tokio::sync::Mutex::new(()));
    let t = Instant::now();
    let mut tasks = vec![];
    for _ in 0..clients {
        let (db, mutex, method, env_id) = (db.clone(), mutex.clone(), method.to_string(), env_id.to_string());
        tasks.push(tokio::spawn(async move {
            let mut got = vec![];
            for _ in 0..per_client {
                let port = if method == "ours" {
                    let mut tx = db.begin().await?;
                    let p = ports::allocate(&mut tx, Service::Ssh, &env_id).await?;
                    tx.commit().await?;
                    p
                } else {
                    let _guard = mutex.lock().await;
                    let p: Option<i32> = sqlx::query_scalar(
                        "SELECT port FROM port_pool WHERE service = 'ssh' AND status = 'available' ORDER BY port LIMIT 1",
                    )
                    .fetch_optional(db.pool())
                    .await?;
                    if let Some(p) = p {
                        sqlx::query("UPDATE port_pool SET status = 'allocated', env_id = $2, allocated_at = now() WHERE port = $1")
                            .bind(p)
                            .bind(&env_id)
                            .execute(db.pool())
                            .await?;
                    }
                    p.and_then(|p| u16::try_from(p).ok())
                };
                got.extend(port);
            }
            Ok::<_, sqlx::Error>(got)
        }));
    }
    let mut all = vec![];
    for task in tasks {
        all.extend(task.await??);
    }
    let out = serde_json::json!({ "ports": all, "seconds": t.elapsed().as_secs_f64() });
    println!("{out}");
    Ok(())
}

