//! Row 6: the publishers' activity reports. Two gateways, each a table of 10,000 routes with
//! 1,000 open sessions whose bytes move every second (nginx's flush, simulated through the
//! counters API). Three phases of the same traffic: reporting off, reporting on (the
//! publisher's snapshot each interval and the reporter's transaction, the code a publisher
//! runs), and reporting on with a sampler that moves bytes on one session of either gateway
//! and times until the API's fleet-wide sum shows them. CPU is this process's, from
//! `/proc/self/stat`, as a share of one core; the difference between the first two phases is
//! what reporting costs.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use gpugate_api::activity_report::{snapshot, Reporter};
use gpugate_api::db::{activity, gateways, Db};
use gpugate_api::metrics::Metrics;
use gpugate_routes::{EnvId, LockMode, Route, Service, Writer};

use super::pct;

const ROUTES: u16 = 10_000;
const SESSIONS: u16 = 1_000;
const FIRST_PORT: u16 = 20_000;

/// One simulated gateway: its table (held by this process as the writer) and the owner
/// stamp of each route.
struct Gateway {
    name: String,
    writer: Writer,
    owners: Vec<u64>,
}

fn env_of(g: usize, i: u16) -> String {
    format!("act{g}x{i:05}")
}

fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").context("/proc/self/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: f64 = f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / 100.0)
}

fn gateway(dir: &Path, g: usize) -> anyhow::Result<Gateway> {
    let path = dir.join(format!("activity-gw{g}")).join("routes");
    let mut writer = Writer::open(&path, LockMode::NoWait)?;
    let upstream = "127.0.0.1:1".parse()?;
    let now = gpugate_routes::now_ms();
    let mut owners = Vec::with_capacity(usize::from(ROUTES));
    for i in 0..ROUTES {
        let env: EnvId = env_of(g, i).parse().map_err(|e| anyhow::anyhow!("env id: {e:?}"))?;
        let route = Route { upstream, env_id: env, service: Service::Ssh, generation: 1, expires_ms: None };
        writer.set(FIRST_PORT + i, &route)?;
        owners.push(writer.table().lookup_owned(FIRST_PORT + i, now).1);
    }
    let counters = writer.table().counter_file().context("counters file")?;
    let row = counters.claim_worker().context("a worker row")?;
    for i in 0..SESSIONS {
        counters.session_open(Some(row), FIRST_PORT + i, owners[usize::from(i)], now);
    }
    Ok(Gateway { name: format!("bench-act-gw{g}"), writer, owners })
}

/// Moves `bytes` on session `i` of `gw` now (what a worker's flush does).
fn flush(gw: &Gateway, i: u16, bytes: u64) {
    if let Some(c) = gw.writer.table().counter_file() {
        c.session_flush(FIRST_PORT + i, gw.owners[usize::from(i)], bytes, bytes, gpugate_routes::now_ms());
    }
}

/// Runs the traffic (every session of every gateway moves a few bytes each second, a tenth
/// of them every 100 ms) for `secs`, with reporting when `report` is set and the latency
/// sampler when `sample` is set; returns (CPU share of one core, latency samples in ms).
async fn phase(db: &Db, gws: &[Gateway], secs: u64, report: bool, sample: bool) -> anyhow::Result<(f64, Vec<f64>)> {
    let metrics = Metrics::new();
    let every = Duration::from_secs(1);
    let reporters: Vec<Reporter> =
        if report { gws.iter().map(|g| Reporter::start(db.clone(), &g.name, every, metrics.clone())).collect() } else { vec![] };
    let mut report_tick = tokio::time::interval(every);
    let mut traffic = tokio::time::interval(Duration::from_millis(100));
    let mut next_sample = Instant::now() + Duration::from_secs(2);
    let mut samples = vec![];
    let mut waiting: Option<(usize, u16, u64, Instant)> = None;
    // What the sampler moved so far on each gateway's session 0 (flushes add deltas).
    let mut moved = vec![0u64; gws.len()];
    let (cpu0, t0) = (cpu_seconds()?, Instant::now());
    let mut round = 0u16;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::select! {
            _ = report_tick.tick(), if report => {
                for (g, r) in gws.iter().zip(&reporters) {
                    r.offer(snapshot(&g.writer, usize::from(ROUTES)));
                }
            }
            _ = traffic.tick() => {
                let tenth = SESSIONS / 10;
                for g in gws {
                    // Session 0 of each gateway is the sampler's.
                    for i in (round * tenth..(round + 1) * tenth).filter(|i| *i != 0) {
                        flush(g, i, 10);
                    }
                }
                round = (round + 1) % 10;
            }
            _ = tokio::time::sleep(Duration::from_millis(10)), if sample => {
                match waiting {
                    None if Instant::now() >= next_sample => {
                        // Alternate gateways; bytes move on one session, once.
                        let g = samples.len() % gws.len();
                        flush(&gws[g], 0, 1);
                        moved[g] += 1;
                        waiting = Some((g, 0, moved[g], Instant::now()));
                    }
                    Some((g, i, want, at)) => {
                        let sums = activity::of_env(db, &env_of(g + 1, i)).await?;
                        if sums.get("ssh").is_some_and(|s| u64::try_from(s.bytes_in).unwrap_or(0) >= want) {
                            samples.push(at.elapsed().as_secs_f64() * 1000.0);
                            waiting = None;
                            next_sample = Instant::now() + Duration::from_millis(150);
                        }
                    }
                    None => {}
                }
            }
        }
    }
    let share = (cpu_seconds()? - cpu0) / t0.elapsed().as_secs_f64();
    drop(reporters);
    samples.sort_by(f64::total_cmp);
    Ok((share, samples))
}

/// Row 6 on `db` (migrated), tables under `dir`.
pub async fn reports(db: &Db, dir: &Path, secs: u64) -> anyhow::Result<()> {
    let gws = vec![gateway(dir, 1)?, gateway(dir, 2)?];
    for g in &gws {
        let beat = gateways::Beat {
            name: &g.name,
            applied_generation: Some(0),
            // Fresh for the whole row: nothing else beats for these gateways.
            heartbeat_ms: 300_000,
            sync_age_s: 0.0,
            started_age_s: 0.0,
            table_path: "bench",
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
        };
        gateways::beat(db, &beat).await?;
    }
    println!(
        "\n## activity reports: 2 gateways x {ROUTES} routes, {SESSIONS} open sessions each moving bytes every second, reports every 1 s ({secs} s per phase)"
    );
    let (off, _) = phase(db, &gws, secs, false, false).await?;
    let (on, _) = phase(db, &gws, secs, true, false).await?;
    let (_, lat) = phase(db, &gws, secs, true, true).await?;
    println!("CPU, share of one core: reporting off {:.2}%   on {:.2}%", off * 100.0, on * 100.0);
    println!(
        "reporting costs {:.2}% of a core per gateway (snapshot of the table and the report's transaction)",
        (on - off).max(0.0) * 100.0 / gws.len() as f64
    );
    println!(
        "bytes moved -> seen in the API's fleet-wide sum, either gateway ({} samples): p50 {:.0} ms   p99 {:.0} ms   max {:.0} ms   (target p99 < 2000 ms)",
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    Ok(())
}
