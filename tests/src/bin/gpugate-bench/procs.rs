//! What an nginx costs the host: its processes (master and every child, old workers included)
//! and their memory, read from /proc.

use std::time::{Duration, Instant};

use gpugate_tests::children_of;

/// Processes and memory of one nginx at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Footprint {
    /// The master plus all its children (workers of every generation still alive).
    pub processes: usize,
    /// Sum of VmRSS over those processes, KiB (shared pages counted once per process).
    pub rss_kib: u64,
    /// Sum of Pss over those processes, KiB (shared pages split between their sharers).
    pub pss_kib: u64,
}

impl Footprint {
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
    pub fn pss_mib(&self) -> f64 {
        self.pss_kib as f64 / 1024.0
    }
}

/// The footprint of the nginx whose master is `master`.
pub fn footprint(master: u32) -> Footprint {
    let mut pids = vec![master];
    pids.extend(children_of(master));
    let mut f = Footprint { processes: pids.len(), ..Footprint::default() };
    for pid in pids {
        f.rss_kib += kib_field(&format!("/proc/{pid}/status"), "VmRSS:");
        f.pss_kib += kib_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:");
    }
    f
}

fn kib_field(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Waits until the set of `master`'s children has not changed for a second (old workers done
/// exiting, new ones started), at most `limit`.
pub fn settle(master: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = children_of(master);
    let mut since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = children_of(master);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_secs(1) {
            return;
        }
    }
}
