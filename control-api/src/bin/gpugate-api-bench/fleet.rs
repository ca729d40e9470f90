//! The fleet rows of `gpugate-api-bench`: placement throughput (two worker processes driving
//! `fleet::place`, against the same work under one global lock, with a duplicate check) and
//! route commit → live on every gateway (two `gpugate-api publish` processes, each with its
//! own table). Both run on a scratch database of their own, away from the in-process API.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gpugate_api::config::{Config, Placement, Secret};
use gpugate_api::db::envs::{self, NewEnv};
use gpugate_api::db::{hosts, ports, Db};
use gpugate_routes::{EnvId, Lookup, Route, Service, Table};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::{commit_route, pct};

/// The stand-in GPU hosts of the placement row.
const HOSTS: [&str; 2] = ["bench-a", "bench-b"];
/// Worker processes, and clients in each.
const WORKERS: usize = 2;
const CLIENTS: usize = 16;

/// Connects to the fleet rows' scratch database, migrates it and fills its port pools.
pub async fn open(cfg: &Config) -> anyhow::Result<Db> {
    let db = Db::connect(cfg).await?;
    db.migrate().await?;
    ports::sync_pools(&db, cfg).await?;
    Ok(db)
}

/// What one placement run measured.
struct PlaceRun {
    /// Successful creates per second, both processes together.
    rate: f64,
    /// Per-create latency (begin to commit), ms, sorted.
    lat: Vec<f64>,
    /// GPUs placed per host, by host.
    per_host: BTreeMap<String, usize>,
    /// Creates that found no host.
    unplaced: usize,
    /// Successful creates.
    placed: usize,
    /// Creates that reported a GPU another create also reported.
    duplicates: usize,
    /// Reported GPUs the database shows held by the environment that reported them.
    held: i64,
    /// Placed environments not holding exactly one GPU in the database.
    wrong: i64,
}

/// Row 2: creates/s of `fleet::place` under `spread` and `pack`, each against the same
/// workload serialised by a global lock, side by side; then the duplicate check.
pub async fn placement(db: &Db, url: &str, owner: i64, per_client: usize) -> anyhow::Result<()> {
    let creates = WORKERS * CLIENTS * per_client;
    // Nothing is released during a run, so that the end state shows every double booking:
    // the hosts hold a GPU for every create (split over two, with room for pack's overflow).
    let per_host = creates.div_ceil(HOSTS.len()) + 40;
    for (i, name) in HOSTS.iter().enumerate() {
        let h = hosts::NewHost {
            name: (*name).into(),
            docker_endpoint: format!("unix:///nonexistent/{name}.sock"),
            tls_dir: None,
            upstream_address: IpAddr::from([127, 0, 0, 2 + i as u8]),
            gpu_model: "Stand-in".into(),
            max_environments: None,
            gpus: (0..u32::try_from(per_host)?).collect(),
        };
        hosts::add(db, &h).await?.with_context(|| format!("host {name} already exists"))?;
    }
    reset(db, owner).await?;
    println!(
        "\n## placement: {} concurrent creates over {WORKERS} processes, {} hosts x {per_host} GPUs, {creates} creates of 1 GPU per run",
        WORKERS * CLIENTS,
        HOSTS.len()
    );
    println!("   (a create: begin, insert the environment, fleet::place, set its host, commit; \"global lock\": the same with LOCK TABLE gpu_devices IN EXCLUSIVE MODE first)");
    for policy in [Placement::Spread, Placement::Pack] {
        let mut rates = vec![];
        for global_lock in [false, true] {
            let r = place_run(db, url, owner, policy, global_lock, per_client).await?;
            reset(db, owner).await?;
            let what = format!("{}, {}", policy.as_str(), if global_lock { "global lock" } else { "ours" });
            let spread: Vec<String> = HOSTS.iter().map(|h| r.per_host.get(*h).copied().unwrap_or(0).to_string()).collect();
            println!(
                "{what:>19}: {:>6.0} creates/s  p50 {:>6.2} ms  p99 {:>7.2} ms  per host {}  unplaced {}  duplicates: {}  (database: {}/{} held as reported, {} environments without exactly one)",
                r.rate,
                pct(&r.lat, 0.5),
                pct(&r.lat, 0.99),
                spread.join("/"),
                r.unplaced,
                r.duplicates,
                r.held,
                r.placed,
                r.wrong
            );
            rates.push(r.rate);
        }
        println!("{:>19}  ratio ours/global lock ({}): {:.2}x", "", policy.as_str(), rates[0] / rates[1]);
    }
    Ok(())
}

/// Gives every GPU back, removes the run's environments and refreshes the planner's
/// statistics, so each run starts from the same state.
async fn reset(db: &Db, owner: i64) -> anyhow::Result<()> {
    sqlx::query("UPDATE gpu_devices SET status = 'available', env_id = NULL WHERE host = ANY($1)")
        .bind(&HOSTS[..])
        .execute(db.pool())
        .await?;
    sqlx::query("DELETE FROM environments WHERE owner_id = $1").bind(owner).execute(db.pool()).await?;
    sqlx::query("VACUUM ANALYZE gpu_devices, environments, hosts").execute(db.pool()).await?;
    Ok(())
}

/// One run: two worker processes started, released together, their reports checked.
async fn place_run(db: &Db, url: &str, owner: i64, policy: Placement, global_lock: bool, per_client: usize) -> anyhow::Result<PlaceRun> {
    let exe = std::env::current_exe()?;
    let mut workers = vec![];
    for _ in 0..WORKERS {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["place-worker", "--url", url, "--policy", policy.as_str(), "--owner", &owner.to_string()])
            .args(["--clients", &CLIENTS.to_string(), "--per-client", &per_client.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if global_lock {
            cmd.arg("--global-lock");
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("worker stdout")?);
        workers.push((child, stdin, stdout));
    }
    // Both have their connections open before either starts.
    for (_, _, out) in workers.iter_mut() {
        let mut line = String::new();
        out.read_line(&mut line).await?;
        if line.trim() != "ready" {
            bail!("placement worker did not start");
        }
    }
    for (_, stdin, _) in workers.iter_mut() {
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
    }
    let (mut seconds, mut lat, mut placed, mut unplaced) = (0f64, vec![], vec![], 0usize);
    for (mut child, stdin, mut out) in workers {
        drop(stdin);
        let mut text = String::new();
        out.read_to_string(&mut text).await?;
        if !child.wait().await?.success() {
            bail!("placement worker failed");
        }
        let v: serde_json::Value = serde_json::from_str(&text).context("placement worker report")?;
        seconds = seconds.max(v["seconds"].as_f64().unwrap_or(f64::NAN));
        lat.extend(v["latency_ms"].as_array().into_iter().flatten().filter_map(|x| x.as_f64()));
        unplaced += v["unplaced"].as_u64().and_then(|n| usize::try_from(n).ok()).unwrap_or(0);
        for p in v["placed"].as_array().into_iter().flatten() {
            let (Some(env), Some(host), Some(idx)) = (p[0].as_str(), p[1].as_str(), p[2].as_i64()) else {
                bail!("placement worker report: bad entry {p}");
            };
            placed.push((env.to_string(), host.to_string(), i32::try_from(idx)?));
        }
    }
    lat.sort_by(f64::total_cmp);
    let distinct: HashSet<(&str, i32)> = placed.iter().map(|(_, h, i)| (h.as_str(), *i)).collect();
    let mut per_host = BTreeMap::new();
    for (_, h, _) in &placed {
        *per_host.entry(h.clone()).or_insert(0) += 1;
    }
    // The database's side: each reported GPU is still held by the environment that reported
    // it (nothing was released, so a GPU handed out twice shows as a lost holder), and every
    // placed environment holds exactly one GPU.
    let envs: Vec<&str> = placed.iter().map(|(e, _, _)| e.as_str()).collect();
    let hosts_of: Vec<&str> = placed.iter().map(|(_, h, _)| h.as_str()).collect();
    let idx: Vec<i32> = placed.iter().map(|(_, _, i)| *i).collect();
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM unnest($1::text[], $2::text[], $3::int[]) AS r(env, host, idx) \
         JOIN gpu_devices g ON g.host = r.host AND g.idx = r.idx AND g.env_id = r.env AND g.status = 'allocated'",
    )
    .bind(&envs)
    .bind(&hosts_of)
    .bind(&idx)
    .fetch_one(db.pool())
    .await?;
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM environments e WHERE e.owner_id = $1 \
         AND (SELECT count(*) FROM gpu_devices g WHERE g.env_id = e.id) <> 1",
    )
    .bind(owner)
    .fetch_one(db.pool())
    .await?;
    Ok(PlaceRun {
        rate: placed.len() as f64 / seconds,
        lat,
        per_host,
        unplaced,
        placed: placed.len(),
        duplicates: placed.len() - distinct.len(),
        held,
        wrong,
    })
}

/// One placement worker process: opens its connections, says `ready`, waits for `go` on
/// stdin, runs `clients` concurrent clients of `per_client` creates each and prints what it
/// placed as JSON.
pub async fn place_worker(url: &str, policy: Placement, global_lock: bool, clients: usize, per_client: usize, owner: i64) -> anyhow::Result<()> {
    let cfg = Config {
        database_url: Secret::new(url),
        database_max_connections: u32::try_from(clients)? + 2,
        ..Config::default()
    };
    let db = Db::connect(&cfg).await?;
    let mut warm = vec![];
    for _ in 0..clients {
        warm.push(db.pool().acquire().await?);
    }
    drop(warm);
    println!("ready");
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await??;
    if line.trim() != "go" {
        bail!("placement worker: expected go on stdin");
    }
    let t = Instant::now();
    let mut tasks = vec![];
    for _ in 0..clients {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            let (mut placed, mut lat, mut unplaced) = (vec![], vec![], 0usize);
            for _ in 0..per_client {
                let id = gpugate_api::ids::env_id();
                let t0 = Instant::now();
                let mut tx = db.begin().await?;
                if global_lock {
                    sqlx::query("LOCK TABLE gpu_devices IN EXCLUSIVE MODE").execute(&mut *tx).await?;
                }
                let env = NewEnv {
                    id: &id,
                    owner_id: owner,
                    name: "place",
                    image: "none",
                    services: &[],
                    name_services: &[],
                    username: "u",
                    password: "p",
                    jupyter_token: "t",
                    ssh_public_keys: &[],
                    gpu_count: 1,
                    gpu_model: None,
                    memory_mb: 1024,
                    cpus: 1.0,
                    pids: 256,
                    idle_stop_after_s: 0,
                    instance: 0,
                    host: hosts::LEGACY_LOCAL,
                };
                envs::insert_creating(&mut tx, &env).await?;
                match gpugate_api::fleet::place(&mut tx, &id, 1, None, policy).await? {
                    Some((host, got)) => {
                        envs::set_host(&mut tx, &id, &host).await?;
                        tx.commit().await?;
                        for g in got {
                            placed.push(serde_json::json!([id, host, g.index]));
                        }
                    }
                    None => {
                        tx.rollback().await?;
                        unplaced += 1;
                    }
                }
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, sqlx::Error>((placed, lat, unplaced))
        }));
    }
    let (mut placed, mut lat, mut unplaced) = (vec![], vec![], 0usize);
    for task in tasks {
        let (p, l, u) = task.await??;
        placed.extend(p);
        lat.extend(l);
        unplaced += u;
    }
    let seconds = t.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({ "seconds": seconds, "placed": placed, "latency_ms": lat, "unplaced": unplaced }));
    Ok(())
}

/// Row 4: route commit → live in both gateways' tables, each kept by its own publisher
/// process; the first table's latency from the same samples beside it.
pub async fn gateways(db: &Db, url: &str, dir: &Path, env: &str, samples: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let api = exe.parent().context("the benchmark's directory")?.join("gpugate-api");
    if !api.is_file() {
        bail!("{} is missing: cargo build --release -p gpugate-api --bin gpugate-api", api.display());
    }
    let paths: Vec<PathBuf> = (1..=2).map(|i| dir.join(format!("gateway{i}")).join("routes")).collect();
    let mut publishers = vec![];
    for (i, path) in paths.iter().enumerate() {
        publishers.push(
            tokio::process::Command::new(&api)
                .arg("publish")
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("DATABASE_URL", url)
                .env("GPUGATE_ROUTE_TABLE", path)
                // Each publisher serves its probes on a port of its own, under its own name.
                .env("GPUGATE_LISTEN", "127.0.0.1:0")
                .env("GPUGATE_GATEWAY_NAME", format!("bench-gw{}", i + 1))
                .env("GPUGATE_RECONCILE_INTERVAL_S", "3600")
                .env("GPUGATE_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()?,
        );
    }
    let result = gateway_samples(db, &paths, env, samples).await;
    for mut p in publishers {
        let _ = p.kill().await;
    }
    let (first, both) = result?;
    println!("\n## route live on all gateways: commit -> slot live in both tables, 2 publisher processes ({} samples)", both.len());
    let row = |what: &str, v: &[f64]| {
        println!("{what:>22}: p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>6.2} ms", pct(v, 0.5), pct(v, 0.99), pct(v, 1.0));
    };
    row("both gateways", &both);
    row("first gateway alone", &first);
    println!(
        "{:>22}  ratio both/first: p50 {:.2}x   p99 {:.2}x   (target: both p99 < 20 ms)",
        "",
        pct(&both, 0.5) / pct(&first, 0.5),
        pct(&both, 0.99) / pct(&first, 0.99)
    );
    Ok(())
}

/// Waits for both tables, warms up with one route, then times `samples` commits; returns
/// the sorted latencies (ms) to the first table and to both.
async fn gateway_samples(db: &Db, paths: &[PathBuf], env: &str, samples: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tables = vec![];
    for path in paths {
        let table = loop {
            match Table::open_read_only(path) {
                Ok(t) => break t,
                Err(e) if Instant::now() > deadline => bail!("gateway table {}: {e}", path.display()),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        tables.push(table);
    }
    let tables = Arc::new(tables);
    let env_id: EnvId = env.parse()?;
    let (mut first, mut both) = (vec![], vec![]);
    // Sample 0 warms up (the publishers may still be on their first full sync).
    for i in 0..=samples {
        let port = 41000 + u16::try_from(i % 1000)?;
        let upstream: SocketAddr = format!("127.0.0.1:{}", 20000 + i % 10000).parse()?;
        let generation = commit_route(db, env, port, upstream).await?;
        let t = Instant::now();
        let want = Route { upstream, env_id, service: Service::Ssh, generation: u64::try_from(generation)?, expires_ms: None };
        let timeout = Duration::from_secs(if i == 0 { 30 } else { 5 });
        let tables = tables.clone();
        let at = tokio::task::spawn_blocking(move || live_in_all(&tables, port, &want, t, timeout)).await??;
        if i > 0 {
            first.push(at[0]);
            both.push(at.iter().copied().fold(0.0, f64::max));
        }
    }
    first.sort_by(f64::total_cmp);
    both.sort_by(f64::total_cmp);
    Ok((first, both))
}

/// Polls every table (every 0.1 ms, on a blocking thread: finer than the runtime's 1 ms
/// timer) until `port` holds `want` in each; returns when it was first seen in each (ms
/// since `since`).
fn live_in_all(tables: &[Table], port: u16, want: &Route, since: Instant, timeout: Duration) -> anyhow::Result<Vec<f64>> {
    let mut at: Vec<Option<f64>> = vec![None; tables.len()];
    loop {
        let now = gpugate_routes::now_ms();
        for (table, seen) in tables.iter().zip(at.iter_mut()) {
            if seen.is_none() {
                let live = matches!(table.lookup(port, now), Lookup::Live(r)
                    if r.generation == want.generation && r.upstream == want.upstream && r.env_id == want.env_id);
                if live {
                    *seen = Some(since.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
        if let Some(all) = at.iter().copied().collect::<Option<Vec<f64>>>() {
            return Ok(all);
        }
        if since.elapsed() > timeout {
            bail!("route {port} not live in every gateway's table within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
