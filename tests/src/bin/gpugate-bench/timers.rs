//! Live sessions: what the per-session flush timers cost. The same number of idle sessions is
//! held open through one nginx with `gpugate_flush_interval 1s` (ours) and then through one
//! with `gpugate_flush_interval 0` (the baseline: no timers), on the same machine in one run;
//! reported are the workers' CPU over a window and their memory per session.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::Duration;

use gpugate_tests::{
    children_of, nginx_conf_with, route, routed_stream, table_dir, temp_dir, ConfOptions, LockMode,
    Nginx, ProxyForm, Service, Writer,
};

use crate::ports::Ports;
use crate::procs::{footprint, settle};
use crate::{check_held, open_held, progress};

/// One side's figures.
#[derive(Clone, Copy, Debug, Default)]
pub struct Side {
    /// Workers' CPU (user + system) over the window, percent of one core.
    pub cpu_pct: f64,
    /// Workers' RSS growth per held session, KiB.
    pub kib_per_session: f64,
    /// Held sessions still answering at the end.
    pub alive: usize,
}

/// Both sides: timers on, timers off.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimerCost {
    pub sessions: usize,
    pub secs: u64,
    pub sides: [Side; 2],
}

/// CPU ticks (user + system) of `pids` so far.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let rest = stat.rfind(')').map(|i| &stat[i + 1..]).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After ')': field 3 is index 0, so utime (14) and stime (15) are 11 and 12.
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            get(11) + get(12)
        })
        .sum()
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Holds `sessions` idle sessions through nginx with each flush interval for `secs`.
pub fn measure(hold: SocketAddr, sessions: usize, secs: u64) -> TimerCost {
    let mut cost = TimerCost { sessions, secs, ..TimerCost::default() };
    for (i, flush) in ["1s", "0"].iter().enumerate() {
        progress(&format!("live sessions: {sessions} idle sessions, gpugate_flush_interval {flush}"));
        let port = Ports::new().take(1)[0];
        let root = temp_dir("bench-timers");
        let table = table_dir(&root).join("routes");
        let mut w = Writer::open(&table, LockMode::NoWait).expect("open the route table");
        w.set(port, &route(hold, "benchidle", Service::Ssh)).expect("route");
        let body = format!("    gpugate_flush_interval {flush};\n{}", routed_stream(&table, port, port, ProxyForm::Balancer));
        let opts = ConfOptions { worker_connections: 16384, rlimit_nofile: 16384, ..ConfOptions::default() };
        let ng = Nginx::start(&root, &nginx_conf_with(&body, opts));
        let master = ng.master_pid();
        let before = footprint(master);
        let mut held: Vec<_> = (0..sessions).map(|_| open_held(port)).collect();
        settle(master, Duration::from_secs(5));
        let workers = children_of(master);
        let t0 = cpu_ticks(&workers);
        std::thread::sleep(Duration::from_secs(secs));
        let t1 = cpu_ticks(&workers);
        let after = footprint(master);
        let alive = check_held(&mut held);
        cost.sides[i] = Side {
            cpu_pct: (t1 - t0) as f64 / ticks_per_second() / secs as f64 * 100.0,
            kib_per_session: after.rss_kib.saturating_sub(before.rss_kib) as f64 / sessions as f64,
            alive,
        };
        drop(held);
        drop(ng);
        drop(w);
    }
    cost
}

impl TimerCost {
    /// The report's section.
    pub fn render(&self, o: &mut String) {
        let [on, off] = self.sides;
        let _ = writeln!(o, "\nLive sessions: {} idle sessions held {} s; ours: gpugate_flush_interval 1s (a timer", self.sessions, self.secs);
        let _ = writeln!(o, "  per session flushing bytes and checking revokes); baseline: gpugate_flush_interval 0");
        let _ = writeln!(o, "  {:<44} {:>10} {:>18} {:>10}", "", "ours", "baseline", "difference");
        let _ = writeln!(
            o,
            "  {:<44} {:>10.2} {:>18.2} {:>10.2}",
            "workers' CPU, % of one core",
            on.cpu_pct,
            off.cpu_pct,
            on.cpu_pct - off.cpu_pct
        );
        let _ = writeln!(
            o,
            "  {:<44} {:>10.2} {:>18.2} {:>10.2}",
            "workers' RSS per session, KiB",
            on.kib_per_session,
            off.kib_per_session,
            on.kib_per_session - off.kib_per_session
        );
        let _ = writeln!(o, "  {:<44} {:>10} {:>18}", "sessions still answering", format!("{}/{}", on.alive, self.sessions), format!("{}/{}", off.alive, self.sessions));
    }
}
