//! One writer process flips routes as fast as it can while reader processes (this binary
//! re-executed with `--reader`) check that every read is a whole route that was written.
//!
//! Every field of a written route is derived from its generation, so a reader can tell a
//! torn copy (fields from two writes) from a whole one.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

mod common;

use gpugate_routes::{LockMode, Lookup, Route, Table, Writer};

const PORTS: std::ops::RangeInclusive<u16> = 30000..=30015;
const READERS: usize = 3;
const SECONDS: u64 = 3;

fn route_for(n: u64) -> Route {
    common::route_for('g', n)
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
    let mut w = Writer::open(&path, LockMode::NoWait).expect("writer");
    let mut n = 1u64;
    for port in PORTS {
        w.set(port, &route_for(n)).expect("set");
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
    while Instant::now() < deadline {
        for port in PORTS {
            w.set(port, &route_for(n)).expect("set");
            n += 1;
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
    println!("test multiprocess ... ok ({writes} writes by one process, {total} whole reads by {READERS} reader processes, 0 torn)");
    println!("1 passed, 0 failed");
    ExitCode::SUCCESS
}
