//! Prometheus metrics of the control plane. Units are in the names.
//!
//! Counters and histograms are updated where things happen, once per event. Gauges of ports,
//! environments and gateway traffic come from the database and the route table: one background
//! task ([`gauges`]) reads them at a fixed interval and swaps in a whole new set, so a scrape
//! runs no query, overlapping scrapes cannot interfere, and a database outage leaves the last
//! values (with their age in `gpugate_metrics_refreshed_timestamp_seconds`).

pub mod gauges;

use std::sync::{Arc, RwLock};

use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Where a set of refreshed gauges comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Ports and environments, from PostgreSQL.
    Database,
    /// Connections and bytes, from the route table's counters.
    Table,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Database => "database",
            Source::Table => "table",
        }
    }
}

/// The last refreshed gauges of each source, replaced whole.
#[derive(Default)]
struct Refreshed {
    database: Vec<MetricFamily>,
    table: Vec<MetricFamily>,
}

/// Every metric of one process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The gauges of the last refresh (see [`gauges`]).
    refreshed: Arc<RwLock<Refreshed>>,
    /// When each source was last refreshed (unix seconds).
    pub refreshed_at: GaugeVec,
    /// Allocations refused because a pool was empty.
    pub allocation_failures: IntCounterVec,
    /// Create calls by result.
    pub creates: IntCounterVec,
    /// Delete calls by result.
    pub deletes: IntCounterVec,
    /// Create latency by step.
    pub create_step_seconds: HistogramVec,
    /// From delete request to ports released.
    pub port_release_seconds: HistogramVec,
    /// Route table writes by operation.
    pub route_writes: IntCounterVec,
    /// Reconcile repairs by kind.
    pub repairs: IntCounterVec,
    /// Environments whose reconcile repair failed (the pass went on without them).
    pub reconcile_errors: IntCounter,
    /// 1 while this process holds the table's writer lock.
    pub publisher_active: IntGauge,
    /// sessions/close requests by whether the table had the revoke within the wait.
    pub sessions_closed: IntCounterVec,
    /// Environments stopped by the idle task.
    pub idle_stops: IntCounter,
    /// `idle_warning` events sent before idle stops.
    pub idle_warnings: IntCounter,
    /// Idle checks of a workspace that kept it running because one of its GPUs was busy.
    pub idle_gpu_busy_keeps: IntCounter,
    /// This host's GPU utilisation samples by result (`ok`, `failed`).
    pub gpu_samples: IntCounterVec,
    /// Workspaces brought to their owner's account keys, by result (`ok`, `stale`, `failed`,
    /// `unsupported`).
    pub account_key_syncs: IntCounterVec,
    /// Requests answered 429 because their address failed to authenticate too often.
    pub auth_failures_limited: IntCounter,
    /// Idle checks that stopped nothing because the fleet's activity was not all known, by
    /// reason (`gateway_stale`, `no_gateway`).
    pub idle_waits: IntCounterVec,
    /// This gateway's activity reports by result (`ok`, `failed`).
    pub activity_reports: IntCounterVec,
    /// Readiness probes by service and result.
    pub readiness_probes: IntCounterVec,
    /// From a start to each service's first answer.
    pub service_ready_seconds: HistogramVec,
    /// Services given up on at their readiness deadline.
    pub services_not_ready: IntCounterVec,
    /// 1 while a host's engine answered the last probe, 0 after one it did not answer.
    pub host_up: GaugeVec,
    /// Creates placed, by host.
    pub placements: IntCounterVec,
}

fn must<T>(r: Result<T, prometheus::Error>) -> T {
    // Metric names and labels are constants of this file; a failure is a programming error
    // that the unit test below catches.
    match r {
        Ok(v) => v,
        Err(e) => panic!("metric definition: {e}"),
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = must(GaugeVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(g.clone())));
            g
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = must(IntCounterVec::new(Opts::new(name, help), labels));
            must(registry.register(Box::new(c.clone())));
            c
        };
        let hist = |name: &str, help: &str, labels: &[&str]| {
            let buckets = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
            let h = must(HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels));
            must(registry.register(Box::new(h.clone())));
            h
        };
        let service_ready_seconds = must(HistogramVec::new(
            HistogramOpts::new(
                "gpugate_service_ready_seconds",
                "From a start (container started, routes committed) to the service's first answer at its published address",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0]),
            &["service"],
        ));
        must(registry.register(Box::new(service_ready_seconds.clone())));
        let publisher_active = must(IntGauge::new(
            "gpugate_publisher_active",
            "1 while this process holds the route table's writer lock",
        ));
        must(registry.register(Box::new(publisher_active.clone())));
        let idle_stops =
            must(IntCounter::new("gpugate_idle_stops_total", "Environments stopped because they were idle"));
        must(registry.register(Box::new(idle_stops.clone())));
        let idle_warnings = must(IntCounter::new(
            "gpugate_idle_warnings_total",
            "idle_warning events sent, each a while before an idle stop",
        ));
        must(registry.register(Box::new(idle_warnings.clone())));
        let idle_gpu_busy_keeps = must(IntCounter::new(
            "gpugate_idle_gpu_busy_keeps_total",
            "Idle checks of a workspace that kept it running because one of its GPUs was busy",
        ));
        must(registry.register(Box::new(idle_gpu_busy_keeps.clone())));
        let auth_failures_limited = must(IntCounter::new(
            "gpugate_auth_failures_limited_total",
            "Requests refused (429) because their client address failed to authenticate too often",
        ));
        must(registry.register(Box::new(auth_failures_limited.clone())));
        let reconcile_errors = must(IntCounter::new(
            "gpugate_reconcile_errors_total",
            "Environments whose reconcile repair failed; logged, and tried again at the next pass",
        ));
        must(registry.register(Box::new(reconcile_errors.clone())));
        Metrics {
            refreshed: Arc::default(),
            refreshed_at: gauge(
                "gpugate_metrics_refreshed_timestamp_seconds",
                "When the gauges from each source (database, table) were last refreshed",
                &["source"],
            ),
            allocation_failures: counter(
                "gpugate_port_allocation_failures_total",
                "Port allocations refused because the pool was empty",
                &["service"],
            ),
            creates: counter("gpugate_environment_creates_total", "Create calls by result", &["result"]),
            deletes: counter("gpugate_environment_deletes_total", "Delete calls by result", &["result"]),
            create_step_seconds: hist(
                "gpugate_create_step_duration_seconds",
                "Create latency by step (database, docker_create, docker_start, route_write, total)",
                &["step"],
            ),
            port_release_seconds: hist(
                "gpugate_port_release_duration_seconds",
                "From a delete request to its ports released",
                &["kind"],
            ),
            route_writes: counter(
                "gpugate_route_writes_total",
                "Route table slot writes by operation",
                &["op"],
            ),
            repairs: counter("gpugate_reconcile_repairs_total", "Reconcile repairs by kind", &["kind"]),
            publisher_active,
            sessions_closed: counter(
                "gpugate_sessions_close_requests_total",
                "sessions/close requests by result (applied: in the table within the route wait)",
                &["result"],
            ),
            idle_stops,
            idle_warnings,
            idle_gpu_busy_keeps,
            gpu_samples: counter(
                "gpugate_gpu_utilization_samples_total",
                "GPU utilisation samples by source (host: this host's nvidia-smi; workspace: inside a GPU workspace, by the host prober) and result (ok, failed)",
                &["source", "result"],
            ),
            account_key_syncs: counter(
                "gpugate_account_key_syncs_total",
                "Workspaces brought to their owner's account keys and password setting, by result (ok; stale: a newer state was there already; failed; unsupported: the image lacks gpugate-account-keys)",
                &["result"],
            ),
            auth_failures_limited,
            reconcile_errors,
            idle_waits: counter(
                "gpugate_idle_check_waits_total",
                "Idle checks that stopped nothing because some gateway's activity was unknown, by reason",
                &["reason"],
            ),
            activity_reports: counter(
                "gpugate_gateway_activity_reports_total",
                "Activity reports of this gateway's publisher, by result (ok, failed)",
                &["result"],
            ),
            readiness_probes: counter(
                "gpugate_readiness_probes_total",
                "Readiness probes at published addresses by service and result (ready, not_ready)",
                &["service", "result"],
            ),
            service_ready_seconds,
            services_not_ready: counter(
                "gpugate_services_not_ready_total",
                "Services that did not answer by their readiness deadline",
                &["service"],
            ),
            host_up: gauge(
                "gpugate_host_up",
                "1 while the host's Docker engine answered the last probe of this process, 0 when it did not",
                &["host"],
            ),
            placements: counter("gpugate_placements_total", "Creates placed on each host", &["host"]),
            registry,
        }
    }

    /// Counts one repair of `kind` (by `n`).
    pub fn repaired(&self, kind: &str, n: u64) {
        if n > 0 {
            self.repairs.with_label_values(&[kind]).inc_by(n);
        }
    }

    /// Replaces the gauges of `source` with `families` (a whole set, never merged).
    pub fn replace(&self, source: Source, families: Vec<MetricFamily>) {
        {
            let mut r = self.refreshed.write().unwrap_or_else(|p| p.into_inner());
            match source {
                Source::Database => r.database = families,
                Source::Table => r.table = families,
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.refreshed_at.with_label_values(&[source.as_str()]).set(now.floor());
    }

    /// The text exposition of every metric: the live counters and the last refreshed gauges.
    /// Runs no query.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        {
            let r = self.refreshed.read().unwrap_or_else(|p| p.into_inner());
            families.extend(r.database.iter().cloned());
            families.extend(r.table.iter().cloned());
        }
        families.sort_by(|a, b| a.get_name().cmp(b.get_name()));
        let mut buf = vec![];
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_register_and_render() {
        let m = super::Metrics::new();
        m.creates.with_label_values(&["ok"]).inc();
        m.create_step_seconds.with_label_values(&["total"]).observe(0.2);
        let text = m.render();
        assert!(text.contains("gpugate_environment_creates_total{result=\"ok\"} 1"));
        assert!(text.contains("gpugate_create_step_duration_seconds_bucket"));
    }
}
