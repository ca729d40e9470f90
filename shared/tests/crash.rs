//! A writer killed (SIGKILL) before each store of a route write — both sequence stores and
//! every word of both copies — and after the last; then a new writer opens the table and
//! writes on, pausing inside each write while readers use the copy the killed writer may
//! have torn. Reader processes (this binary re-executed with `--reader`) check every read:
//! every field of a route is derived from its generation, so a mixed copy cannot pass.
//!
//! Without the settling pass on open (see `seqlock::settle`), the kill points inside the
//! second copy leave it half old, half new, and the readers catch it.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use gpugate_routes::seqlock::{hooks, STORES_PER_WRITE};
mod common;

use gpugate_routes::{LockMode, Lookup, Route, Table, Writer};

const PORT: u16 = 30000;
const READERS: usize = 2;

fn route_for(n: u64) -> Route {
    common::route_for('c', n)
}

fn reader(path: &Path, stop: &Path) -> Result<u64, String> {
    let table = Table::open_read_only(path).map_err(|e| e.to_string())?;
    let mut reads = 0u64;
    loop {
        for _ in 0..1000 {
            match table.lookup(PORT, 0) {
                Lookup::Live(r) if r == route_for(r.generation) => reads += 1,
                Lookup::Live(r) => return Err(format!("torn read after {reads} reads: {r:?}")),
                other => return Err(format!("expected a live route, got {other:?}")),
            }
        }
        if stop.exists() {
            return Ok(reads);
        }
    }
}

static KILL_AT: AtomicU32 = AtomicU32::new(u32::MAX);

fn kill_self_at(step: u32) {
    if step == KILL_AT.load(Ordering::Relaxed) {
        // SAFETY: sending SIGKILL to this very process; nothing to clean up.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

fn pause_after_first_store(step: u32) {
    // Step 1 comes right after W1: readers now read the second copy, the one a writer killed
    // inside its last stores tears. Stay there long enough for every reader to look.
    if step == 1 {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Child: write generation `n` whole, then die before store `k` of writing `n + 1`
/// (`k == STORES_PER_WRITE`: right after that write, before closing cleanly).
fn crash_writer(path: &Path, k: u32, n: u64) -> ! {
    let mut w = Writer::open(path, LockMode::NoWait).expect("crash writer opens");
    w.set(PORT, &route_for(n)).expect("set");
    KILL_AT.store(k, Ordering::Relaxed);
    hooks::set(Some(kill_self_at));
    w.set(PORT, &route_for(n + 1)).expect("set");
    // SAFETY: as above.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL does not return");
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        println!("crash: test");
        return ExitCode::SUCCESS;
    }
    if let Some(i) = args.iter().position(|a| a == "--reader") {
        return match reader(Path::new(&args[i + 1]), Path::new(&args[i + 2])) {
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
    if let Some(i) = args.iter().position(|a| a == "--crash-writer") {
        let k = args[i + 2].parse().expect("k");
        let n = args[i + 3].parse().expect("n");
        crash_writer(Path::new(&args[i + 1]), k, n);
    }

    let dir = std::env::temp_dir().join(format!("gpugate-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The writer makes the table directory itself (0755, whatever the umask of the run).
    let path = dir.join("table").join("routes");
    let stop: PathBuf = dir.join("stop");
    let mut n = 2u64;
    {
        let mut w = Writer::open(&path, LockMode::NoWait).expect("writer");
        w.set(PORT, &route_for(n)).expect("set");
    }
    let exe = std::env::current_exe().expect("current exe");
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            Command::new(&exe)
                .arg("--reader")
                .arg(&path)
                .arg(&stop)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn reader")
        })
        .collect();

    let mut failures = Vec::new();
    let mut repaired_total = 0usize;
    for k in 0..=STORES_PER_WRITE {
        n += 1;
        let status = Command::new(&exe)
            .arg("--crash-writer")
            .arg(&path)
            .arg(k.to_string())
            .arg(n.to_string())
            .status()
            .expect("spawn crash writer");
        if status.signal() != Some(libc::SIGKILL) {
            failures.push(format!("kill point {k}: the writer was not killed ({status})"));
            continue;
        }
        n += 1;
        let mut w = Writer::open(&path, LockMode::NoWait).expect("writer after a crash");
        let report = w.open_report();
        if !report.settled {
            failures.push(format!("kill point {k}: the table was not settled after a crash"));
        }
        repaired_total += report.repaired;
        hooks::set(Some(pause_after_first_store));
        for _ in 0..2 {
            n += 1;
            w.set(PORT, &route_for(n)).expect("set after crash");
        }
        hooks::set(None);
        drop(w);
        if !Writer::open(&path, LockMode::NoWait).map(|w| !w.open_report().settled).unwrap_or(false) {
            failures.push(format!("kill point {k}: a clean close still made the next open settle"));
        }
    }
    std::fs::write(&stop, b"").expect("stop file");
    let mut reads = 0u64;
    for child in readers {
        let out = child.wait_with_output().expect("wait reader");
        if !out.status.success() {
            failures.push(format!("a reader failed ({})", out.status));
        }
        reads += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap_or(0);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if reads == 0 {
        failures.push("the readers read nothing".into());
    }
    if !failures.is_empty() {
        for f in &failures {
            println!("  {f}");
        }
        println!("test crash ... FAILED");
        println!("0 passed, 1 failed");
        return ExitCode::FAILURE;
    }
    println!(
        "test crash ... ok ({} kill points, {repaired_total} torn slots repaired on open, {reads} whole reads by {READERS} reader processes, 0 torn)",
        STORES_PER_WRITE + 1
    );
    println!("1 passed, 0 failed");
    ExitCode::SUCCESS
}
