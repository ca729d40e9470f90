//! One writer process flips routes as fast as it can while reader processes (this binary
//! re-executed with `--reader`) check that every read is a whole route that was written.
//!
//! Every field of a written route is derived from its generation, so a reader can tell a
//! torn copy (fields from two writes) from a whole one. Name routes too: a set of stable
//! (environment, service) keys is rewritten while other keys are added and removed around
//! them in a small region (collisions, tombstones), and no reader may ever miss a stable key.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

mod common;

use gpugate_routes::{HostKey, LockMode, Lookup, Route, Service, Table, Writer};

const PORTS: std::ops::RangeInclusive<u16> = 30000..=30015;
const READERS: usize = 3;
const SECONDS: u64 = 3;

fn route_for(n: u64) -> Route {
    common::route_for('g', n)
}

/// Stable name keys (always routed) and the churn keys added and removed around them.
const NAMES: u64 = 64;
const HOST_SLOTS: u32 = 1024;

fn name_key(i: u64) -> HostKey {
    HostKey::new(format!("stable{i}").parse().expect("id"), Service::Jupyter)
}

/// The route of stable key `i` at generation `n` (fields derived from `n`, key fixed).
fn name_route(i: u64, n: u64) -> Route {
    let r = common::route_for('x', n);
    let k = name_key(i);
    Route { env_id: k.env_id, service: k.service, ..r }
}

fn check_name(r: &Route, i: u64) -> bool {
    *r == name_route(i, r.generation)
}

fn reader(path: &Path) -> Result<u64, String> {
    let table = Table::open_read_only(path).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let mut reads = 0u64;
    while Instant::now() < deadline {
        for port in PORTS {
            match table.lookup(port, 0) {
                Lookup::Live(r) => {
                    if r != route_for(r.generation) {
                        return Err(format!("torn read on port {port}: {r:?}"));
                    }
                }
                other => return Err(format!("port {port}: expected a live route, got {other:?}")),
            }
            reads += 1;
        }
        for i in 0..NAMES {
            match table.lookup_host(name_key(i), 0).0 {
                Lookup::Live(r) if check_name(&r, i) => {}
                Lookup::Live(r) => return Err(format!("torn name route {i}: {r:?}")),
                other => return Err(format!("name route {i}: expected a live route, got {other:?}")),
            }
            reads += 1;
        }
    }
    Ok(reads)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--reader") {
        let path = PathBuf::from(&args[i + 1]);
        return match reader(&path) {
            Ok(n) => {
                println!("{n}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("reader {}: {e}", std::process::id());
                ExitCode::FAILURE
            }
        };
    }
    if args.iter().any(|a| a == "--list") {
        // `cargo test -- --list` asks each test binary for its tests.
        println!("multiprocess: test");
        return ExitCode::SUCCESS;
    }

    let dir = std::env::temp_dir().join(format!("gpugate-mp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The writer makes the table directory itself (0755, whatever the umask of the run).
    let path = dir.join("table").join("routes");
    let mut w = Writer::open_with(&path, LockMode::NoWait, HOST_SLOTS).expect("writer");
    let mut n = 1u64;
    for port in PORTS {
        w.set(port, &route_for(n)).expect("set");
        n += 1;
    }
    for i in 0..NAMES {
        w.set_host(&name_route(i, n)).expect("set name");
        n += 1;
    }
    let exe = std::env::current_exe().expect("current exe");
    let children: Vec<_> = (0..READERS)
        .map(|_| {
            Command::new(&exe)
                .arg("--reader")
                .arg(&path)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn reader")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(SECONDS);
    let mut churn = 0u64;
    while Instant::now() < deadline {
        for port in PORTS {
            w.set(port, &route_for(n)).expect("set");
            n += 1;
        }
        for i in 0..NAMES {
            w.set_host(&name_route(i, n)).expect("set name");
            n += 1;
        }
        // 600 churn keys live at a time (~65% load with the stable ones): each round adds
        // 16 and removes the 16 oldest.
        for _ in 0..16 {
            let add = Route { env_id: format!("c{churn}").parse().expect("id"), ..name_route(0, n) };
            w.set_host(&add).expect("churn add");
            if churn >= 600 {
                let gone = HostKey::new(format!("c{}", churn - 600).parse().expect("id"), Service::Jupyter);
                w.remove_host(gone).expect("churn remove");
            }
            churn += 1;
        }
    }
    let mut failed = false;
    let mut total = 0u64;
    for child in children {
        let out = child.wait_with_output().expect("wait reader");
        if !out.status.success() {
            failed = true;
        }
        total += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap_or(0);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let writes = n - 1;
    if failed || total == 0 || writes < 10_000 {
        println!("test multiprocess ... FAILED ({writes} writes, {total} reads)");
        println!("0 passed, 1 failed");
        return ExitCode::FAILURE;
    }
    println!(
        "test multiprocess ... ok ({writes} writes by one process ({churn} name keys added and removed), \
         {total} whole reads by {READERS} reader processes, 0 torn, 0 missed; probe bound {})",
        w.table().host_probe_max()
    );
    println!("1 passed, 0 failed");
    ExitCode::SUCCESS
}
