//! Prometheus metrics of the control plane. Units are in the names.
//!
//! Counters and histograms are updated where things happen; gauges of ports, environments and
//! per-environment traffic are refreshed from the database and the route table at scrape time.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Every metric of one process.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Ports by pool and state (scrape time).
    pub ports: GaugeVec,
    /// Environments by status (scrape time).
    pub environments: GaugeVec,
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
    /// 1 while this process holds the table's writer lock.
    pub publisher_active: IntGauge,
    /// Per-environment connection counters, from the table (scrape time).
    pub env_connections: GaugeVec,
    /// Per-environment open connections, from the table (scrape time).
    pub env_connections_active: GaugeVec,
    /// Per-environment bytes, from the table (scrape time).
    pub env_bytes: GaugeVec,
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
        let publisher_active = must(IntGauge::new(
            "gpugate_publisher_active",
            "1 while this process holds the route table's writer lock",
        ));
        must(registry.register(Box::new(publisher_active.clone())));
        Metrics {
            ports: gauge("gpugate_ports", "Pool ports by service and state", &["service", "state"]),
            environments: gauge("gpugate_environments", "Environments by status", &["status"]),
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
            env_connections: gauge(
                "gpugate_environment_connections_total",
                "Connections per environment and service, from the route table counters",
                &["env_id", "service", "outcome"],
            ),
            env_connections_active: gauge(
                "gpugate_environment_connections_active",
                "Open connections per environment and service",
                &["env_id", "service"],
            ),
            env_bytes: gauge(
                "gpugate_environment_bytes_total",
                "Bytes per environment and service by direction (in: client to workspace)",
                &["env_id", "service", "direction"],
            ),
            registry,
        }
    }

    /// Counts one repair of `kind` (by `n`).
    pub fn repaired(&self, kind: &str, n: u64) {
        if n > 0 {
            self.repairs.with_label_values(&[kind]).inc_by(n);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = vec![];
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
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
