//! The printed report: each measurement beside its baseline, the ratio, and the target.

use std::fmt::Write;

use crate::procs::Footprint;
use crate::{Arrival, Config};

/// Everything the run measured.
pub struct Report {
    clients: usize,
    rate_rounds: usize,
    rate_ms: u64,
    bulk_rounds: usize,
    bulk_mb: u64,
    /// Connections/s, medians: static, balancer, variable.
    pub rate: [f64; 3],
    /// Median of per-round ratios to static: balancer, variable.
    pub rate_ratio: [f64; 2],
    /// (min, max) of the rate runs: static, balancer, variable.
    pub rate_spread: [(f64, f64); 3],
    /// Failed connections in the rate runs: static, balancer, variable.
    pub rate_failed: [u64; 3],
    /// MB/s of one connection, medians: static, balancer, variable.
    pub bulk: [f64; 3],
    /// Median of per-round ratios to static: balancer, variable.
    pub bulk_ratio: [f64; 2],
    /// (min, max) of the throughput runs: static, balancer, variable.
    pub bulk_spread: [(f64, f64); 3],
    /// (p50 ms, p99 ms, samples): gateway, reload baseline.
    pub activation: [(f64, f64, usize); 2],
    /// (p50 ms, p99 ms, activations whose first attempt succeeded): a round trip on a port
    /// already routed, measured right after each gateway activation.
    pub activation_reference: (f64, f64, usize),
    /// Per arrival pattern (in `Arrival::ORDER`), per side (gateway, reload baseline):
    /// (before, after, held connections still answering, held connections).
    pub footprint: [[(Footprint, Footprint, usize, usize); 2]; 2],
    /// Criterion medians, ns: live route, miss.
    pub lookup_ns: (Option<f64>, Option<f64>),
    /// Criterion medians of the hostname lookup, ns: live name route, miss.
    pub lookup_host_ns: (Option<f64>, Option<f64>),
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The noise behind the medians: min-max of the runs of each form.
fn spread_line(o: &mut String, s: &[(f64, f64); 3]) {
    let r = |(lo, hi): (f64, f64)| format!("{}-{}", thousands(lo), thousands(hi));
    let _ = writeln!(
        o,
        "  (min-max of the runs: static {}, balancer {}, variable {})",
        r(s[0]),
        r(s[1]),
        r(s[2])
    );
}

impl Report {
    pub fn new(clients: usize, rate_rounds: usize, rate_ms: u64, bulk_rounds: usize, bulk_mb: u64) -> Report {
        Report {
            clients,
            rate_rounds,
            rate_ms,
            bulk_rounds,
            bulk_mb,
            rate: [0.0; 3],
            rate_ratio: [0.0; 2],
            rate_spread: [(0.0, 0.0); 3],
            rate_failed: [0; 3],
            bulk: [0.0; 3],
            bulk_ratio: [0.0; 2],
            bulk_spread: [(0.0, 0.0); 3],
            activation: [(0.0, 0.0, 0); 2],
            activation_reference: (0.0, 0.0, 0),
            footprint: [[(Footprint::default(), Footprint::default(), 0, 0); 2]; 2],
            lookup_ns: (None, None),
            lookup_host_ns: (None, None),
        }
    }

    pub fn render(&self, cfg: &Config) -> String {
        let mut o = String::new();
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let row = |o: &mut String, what: &str, ours: &str, base: &str, ratio: &str, target: &str| {
            let _ = writeln!(o, "  {what:<34} {ours:>18} {base:>18} {ratio:>10}  {target}");
        };
        let _ = writeln!(o, "gpugate benchmark: ours vs baseline, measured side by side in one run");
        let _ = writeln!(
            o,
            "host: {cpus} CPUs, shared with other work; absolute figures are noisy, the ratios are the result"
        );
        let _ = writeln!(o);
        row(&mut o, "", "ours", "baseline", "ours/base", "target");

        let _ = writeln!(
            o,
            "Data path: one nginx, same backend; runs interleaved (A B C, B C A, ...); figures are"
        );
        let _ = writeln!(o, "  medians, ours/base is the median of the per-round ratios");
        let _ = writeln!(
            o,
            "  connection rate: {} clients, connect + 64-byte round trip + close, {} x {} ms per form",
            self.clients, self.rate_rounds, self.rate_ms
        );
        for (i, form) in [(1, "balancer form"), (2, "variable form")] {
            let r = self.rate_ratio[i - 1];
            row(
                &mut o,
                &format!("conn/s, {form}"),
                &thousands(self.rate[i]),
                &format!("{} static", thousands(self.rate[0])),
                &format!("{r:.3}"),
                &format!(">= 0.98  {}", verdict(r >= 0.98)),
            );
        }
        spread_line(&mut o, &self.rate_spread);
        if self.rate_failed.iter().any(|&f| f > 0) {
            let _ = writeln!(
                o,
                "  failed connections: static {}, balancer {}, variable {}",
                self.rate_failed[0], self.rate_failed[1], self.rate_failed[2]
            );
        }
        let _ = writeln!(
            o,
            "  throughput: one connection, {} MB from the backend, {} runs per form",
            self.bulk_mb, self.bulk_rounds
        );
        for (i, form) in [(1, "balancer form"), (2, "variable form")] {
            let r = self.bulk_ratio[i - 1];
            row(
                &mut o,
                &format!("MB/s, {form}"),
                &thousands(self.bulk[i]),
                &format!("{} static", thousands(self.bulk[0])),
                &format!("{r:.3}"),
                &format!(">= 0.99  {}", verdict(r >= 0.99)),
            );
        }
        spread_line(&mut o, &self.bulk_spread);

        let (g, b) = (self.activation[0], self.activation[1]);
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Route activation: change -> first proxied round trip, {} existing ports",
            thousands(f64::from(cfg.ports))
        );
        let _ = writeln!(
            o,
            "  ours: Writer::set, n={}; baseline: port file + nginx -t + nginx -s reload, n={}",
            g.2, b.2
        );
        row(
            &mut o,
            "p50, ms",
            &format!("{:.3}", g.0),
            &format!("{:.1}", b.0),
            &format!("{:.6}", g.0 / b.0),
            &format!("{}x faster", thousands(b.0 / g.0)),
        );
        row(
            &mut o,
            "p99, ms",
            &format!("{:.3}", g.1),
            &format!("{:.1}", b.1),
            &format!("{:.6}", g.1 / b.1),
            &format!("< 1 ms  {}  ({}x faster)", verdict(g.1 < 1.0), thousands(b.1 / g.1)),
        );
        let r = self.activation_reference;
        row(
            &mut o,
            "ours, round trip on a routed port",
            &format!("{:.3}/{:.3}", r.0, r.1),
            "",
            "",
            "p50/p99 ms: the floor for activation",
        );
        let _ = writeln!(
            o,
            "  ours: {}/{} activations answered on the first connection attempt",
            r.2, g.2
        );

        let _ = writeln!(o);
        let _ = writeln!(o, "Lookup: Table::lookup_owned (the read per connection), criterion median");
        let ns = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1}"));
        let live_ok = self.lookup_ns.0.is_some_and(|v| v < 50.0);
        row(&mut o, "live route, ns", &ns(self.lookup_ns.0), "", "", &format!("< 50 ns  {}", verdict(live_ok)));
        row(&mut o, "miss (no route), ns", &ns(self.lookup_ns.1), "", "", "");
        let _ = writeln!(
            o,
            "  Table::lookup_host (routing by server name), 100,000 name routes in 262,144 slots,"
        );
        let _ = writeln!(o, "  cycling through 1,024 random ids each (slots in different pages: cache and TLB misses count)");
        let host_ok = self.lookup_host_ns.0.is_some_and(|v| v < 100.0);
        row(&mut o, "live name route, ns", &ns(self.lookup_host_ns.0), "", "", &format!("< 100 ns  {}", verdict(host_ok)));
        let miss_ok = self.lookup_host_ns.1.is_some_and(|v| v < 100.0);
        row(&mut o, "unknown name, ns", &ns(self.lookup_host_ns.1), "", "", &format!("< 100 ns  {}", verdict(miss_ok)));

        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Footprint: nginx master + all workers (old generations included); ours: {} route",
            thousands(f64::from(cfg.changes))
        );
        let _ = writeln!(o, "  changes, baseline: {} reloads (port file + nginx -t + reload each)", cfg.reloads);
        for (k, arrival) in Arrival::ORDER.into_iter().enumerate() {
            let [(gb, ga, gh, gn), (bb, ba, bh, bn)] = self.footprint[k];
            let _ = writeln!(o, "  {} long-lived connections {}:", cfg.conns, arrival.describe());
            row(
                &mut o,
                "processes, before -> after",
                &format!("{} -> {}", gb.processes, ga.processes),
                &format!("{} -> {}", bb.processes, ba.processes),
                "",
                &format!("no new  {}", verdict(ga.processes <= gb.processes)),
            );
            let grow = |a: &Footprint, b: &Footprint| a.rss_kib as f64 / b.rss_kib.max(1) as f64;
            let (gr, br) = (grow(&ga, &gb), grow(&ba, &bb));
            row(
                &mut o,
                "RSS MiB, before -> after",
                &format!("{:.1} -> {:.1}", gb.rss_mib(), ga.rss_mib()),
                &format!("{:.1} -> {:.1}", bb.rss_mib(), ba.rss_mib()),
                &format!("{:.4}", ga.rss_kib as f64 / ba.rss_kib.max(1) as f64),
                "",
            );
            let target = match arrival {
                Arrival::UpFront => format!("within 5%  {}", verdict((gr - 1.0).abs() <= 0.05)),
                Arrival::Spread => "(includes the new connections' buffers)".to_owned(),
            };
            row(&mut o, "RSS after / before", &format!("{gr:.3}"), &format!("{br:.3}"), "", &target);
            row(
                &mut o,
                "PSS MiB, before -> after",
                &format!("{:.1} -> {:.1}", gb.pss_mib(), ga.pss_mib()),
                &format!("{:.1} -> {:.1}", bb.pss_mib(), ba.pss_mib()),
                &format!("{:.4}", ga.pss_kib as f64 / ba.pss_kib.max(1) as f64),
                "",
            );
            row(
                &mut o,
                "long-lived conns still answering",
                &format!("{gh}/{gn}"),
                &format!("{bh}/{bn}"),
                "",
                "",
            );
        }
        o
    }
}
