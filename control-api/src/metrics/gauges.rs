//! The gauges read from PostgreSQL (ports, environments, the gateway registry) and from the
//! route table's counters (gateway connections and bytes), refreshed by one task at
//! `metrics.refresh_ms`.
//!
//! Each refresh builds a whole new set of series and swaps it in ([`Metrics::replace`]): a
//! scrape only renders what is there, so it costs no query, two scrapes cannot interleave a
//! reset with an add, and when a source fails its last values stay. Traffic is summed per
//! service (bounded cardinality); series per environment only when `metrics.per_environment`
//! is on; series per gateway always (a fleet has few).

use std::sync::Arc;
use std::time::Duration;

use gpugate_routes::{Counters, NameRefusal, Service};
use prometheus::proto::MetricFamily;
use prometheus::{GaugeVec, Opts, Registry};
use tokio::sync::watch;

use super::{Metrics, Source};
use crate::config::Config;
use crate::db::ports::PoolStats;
use crate::db::gateways::{self, GatewayRow};
use crate::db::{envs, ports, Db};
use crate::table_view::TableView;

/// The longest one database refresh may take before it counts as failed.
const DB_REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// One routed port's share of the traffic: its environment, its service and its counters.
#[derive(Clone, Debug)]
pub struct PortTraffic {
    /// The route's environment id.
    pub env_id: String,
    /// The route's service.
    pub service: &'static str,
    /// The port's counters for that route.
    pub counters: Counters,
}

/// A fresh registry whose gathered families become one refreshed set.
struct Set(Registry);

impl Set {
    fn new() -> Set {
        Set(Registry::new())
    }

    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> Result<GaugeVec, prometheus::Error> {
        let g = GaugeVec::new(Opts::new(name, help), labels)?;
        self.0.register(Box::new(g.clone()))?;
        Ok(g)
    }

    fn finish(self) -> Vec<MetricFamily> {
        self.0.gather()
    }
}

/// The database's series: ports by service and state, environments by status.
pub fn database_families(pools: &[PoolStats], by_status: &[(String, i64)]) -> Result<Vec<MetricFamily>, prometheus::Error> {
    let set = Set::new();
    let ports = set.gauge("gpugate_ports", "Pool ports by service and state", &["service", "state"])?;
    for s in pools {
        for (state, n) in [
            ("allocated", s.allocated),
            ("quarantined", s.quarantined),
            ("available", s.available),
            ("reserved", s.reserved),
        ] {
            ports.with_label_values(&[&s.service, state]).set(n as f64);
        }
    }
    let envs = set.gauge("gpugate_environments", "Environments by status (deleted ones excluded)", &["status"])?;
    for (status, n) in by_status {
        envs.with_label_values(&[status]).set(*n as f64);
    }
    Ok(set.finish())
}

/// The gateway registry's series, one per registered gateway: the route generation its table
/// holds, its lag behind the newest, and its heartbeat's age (a retired gateway's series stay,
/// ageing, until its row is removed).
pub fn gateway_families(rows: &[GatewayRow]) -> Result<Vec<MetricFamily>, prometheus::Error> {
    let set = Set::new();
    let applied = set.gauge(
        "gpugate_gateway_applied_generation",
        "The route generation the gateway's table holds: every committed route change up to it is applied",
        &["gateway"],
    )?;
    let lag = set.gauge(
        "gpugate_gateway_lag_generations",
        "Route generations handed out that the gateway has not confirmed (the sequence's last value minus its applied generation)",
        &["gateway"],
    )?;
    let age = set.gauge(
        "gpugate_gateway_heartbeat_age_seconds",
        "Seconds since the gateway's publisher last renewed its registry row (stale after three of its heartbeat intervals)",
        &["gateway"],
    )?;
    for g in rows {
        applied.with_label_values(&[&g.name]).set(g.applied_generation as f64);
        lag.with_label_values(&[&g.name]).set(g.lag_generations as f64);
        age.with_label_values(&[&g.name]).set(g.heartbeat_age_s.max(0.0));
    }
    Ok(set.finish())
}

/// How connections ended, as outcome labels that add up without double counting: the table's
/// `connections_total` includes revoked sessions, so `completed` is the rest of them.
fn outcomes(c: &Counters) -> [(&'static str, u64); 4] {
    [
        ("completed", c.connections_total.saturating_sub(c.revoked_total)),
        ("revoked", c.revoked_total),
        ("upstream_failed", c.upstream_failed_total),
        ("refused", c.refused_total),
    ]
}

/// The table's series: totals per service over every routed port (each service of
/// `services` present, zero without traffic), and, if `per_environment`, the same per
/// environment.
pub fn traffic_families(
    ports: &[PortTraffic],
    services: &[&'static str],
    per_environment: bool,
) -> Result<Vec<MetricFamily>, prometheus::Error> {
    const WHEN: &str = "counted when a session ends (completed, revoked, upstream_failed) or at once \
                        (refused: no live route); over the ports routed now, so a sum drops when a port loses its route";
    let set = Set::new();
    let conns = set.gauge(
        "gpugate_gateway_connections_total",
        &format!("Gateway connections per service by outcome, from the route table counters; {WHEN}"),
        &["service", "outcome"],
    )?;
    let active = set.gauge(
        "gpugate_gateway_connections_active",
        "Gateway sessions open now per service, from the route table counters",
        &["service"],
    )?;
    let bytes = set.gauge(
        "gpugate_gateway_bytes_total",
        "Gateway bytes per service by direction (in: client to workspace), flushed while sessions are \
         open; over the ports routed now",
        &["service", "direction"],
    )?;
    let zero = Counters::default();
    for svc in services {
        for (outcome, _) in outcomes(&zero) {
            conns.with_label_values(&[svc, outcome]).add(0.0);
        }
        active.with_label_values(&[svc]).add(0.0);
        for dir in ["in", "out"] {
            bytes.with_label_values(&[svc, dir]).add(0.0);
        }
    }
    let per_env = if per_environment {
        Some((
            set.gauge(
                "gpugate_environment_connections_total",
                &format!("Connections per environment and service by outcome, from the route table counters; {WHEN}"),
                &["env_id", "service", "outcome"],
            )?,
            set.gauge(
                "gpugate_environment_connections_active",
                "Sessions open now per environment and service",
                &["env_id", "service"],
            )?,
            set.gauge(
                "gpugate_environment_bytes_total",
                "Bytes per environment and service by direction (in: client to workspace)",
                &["env_id", "service", "direction"],
            )?,
        ))
    } else {
        None
    };
    for p in ports {
        let c = &p.counters;
        for (outcome, n) in outcomes(c) {
            conns.with_label_values(&[p.service, outcome]).add(n as f64);
        }
        active.with_label_values(&[p.service]).add(c.connections_active as f64);
        bytes.with_label_values(&[p.service, "in"]).add(c.bytes_in as f64);
        bytes.with_label_values(&[p.service, "out"]).add(c.bytes_out as f64);
        if let Some((e_conns, e_active, e_bytes)) = &per_env {
            let env = p.env_id.as_str();
            for (outcome, n) in outcomes(c) {
                e_conns.with_label_values(&[env, p.service, outcome]).add(n as f64);
            }
            e_active.with_label_values(&[env, p.service]).add(c.connections_active as f64);
            e_bytes.with_label_values(&[env, p.service, "in"]).add(c.bytes_in as f64);
            e_bytes.with_label_values(&[env, p.service, "out"]).add(c.bytes_out as f64);
        }
    }
    Ok(set.finish())
}

/// Connections the TLS port refused by name, per reason (every reason present, zero included).
pub fn name_refused_families(counts: &[(NameRefusal, u64)]) -> Result<Vec<MetricFamily>, prometheus::Error> {
    let set = Set::new();
    let g = set.gauge(
        "gpugate_gateway_name_refused_total",
        "Connections the gateway's name routing refused at once, by reason (no_name, other_domain, \
         bad_name, unknown_service, no_route, not_tls), since the counters file was made",
        &["reason"],
    )?;
    for why in NameRefusal::ALL {
        let n = counts.iter().find(|(r, _)| *r == why).map_or(0, |(_, n)| *n);
        g.with_label_values(&[why.as_str()]).set(n as f64);
    }
    Ok(set.finish())
}

/// The one task that refreshes the gauges.
pub struct Refresher {
    db: Db,
    table: Arc<TableView>,
    cfg: Arc<Config>,
    metrics: Metrics,
    /// The last failure of each source (logged once per change, not per refresh).
    db_failure: Option<String>,
    table_failure: Option<String>,
}

impl Refresher {
    /// A refresher over this process's database, table view and metrics.
    pub fn new(db: Db, table: Arc<TableView>, cfg: Arc<Config>, metrics: Metrics) -> Refresher {
        Refresher { db, table, cfg, metrics, db_failure: None, table_failure: None }
    }

    /// Refreshes every source once; a source that fails keeps its last values.
    pub async fn refresh(&mut self) {
        let db = tokio::time::timeout(DB_REFRESH_TIMEOUT, self.read_database()).await;
        let db = match db {
            Ok(Ok(families)) => Ok(families),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {DB_REFRESH_TIMEOUT:?}")),
        };
        let table = self.read_table();
        note(&mut self.db_failure, Source::Database, db.as_ref().err());
        note(&mut self.table_failure, Source::Table, table.as_ref().err());
        if let Ok(f) = db {
            self.metrics.replace(Source::Database, f);
        }
        if let Ok(f) = table {
            self.metrics.replace(Source::Table, f);
        }
    }

    async fn read_database(&self) -> Result<Vec<MetricFamily>, String> {
        let pools = ports::stats(&self.db).await.map_err(|e| e.to_string())?;
        let by_status = envs::count_by_status(&self.db).await.map_err(|e| e.to_string())?;
        let registry = gateways::list(&self.db).await.map_err(|e| e.to_string())?;
        let mut families = database_families(&pools, &by_status).map_err(|e| e.to_string())?;
        families.extend(gateway_families(&registry).map_err(|e| e.to_string())?);
        Ok(families)
    }

    fn read_table(&self) -> Result<Vec<MetricFamily>, String> {
        let t = self.table.get().map_err(|e| e.to_string())?;
        // Port routes and name routes alike (a service reached both ways adds both up).
        let mut traffic: Vec<PortTraffic> = t
            .routes()
            .map(|(port, r)| PortTraffic { env_id: r.env_id.to_string(), service: r.service.as_str(), counters: t.counters(port) })
            .collect();
        traffic.extend(t.host_routes().map(|(slot, r)| PortTraffic {
            env_id: r.env_id.to_string(),
            service: r.service.as_str(),
            counters: t.counters(slot),
        }));
        let services: Vec<&'static str> =
            self.cfg.services().into_iter().map(|(s, _)| s.as_str()).filter(|s| *s != Service::Other.as_str()).collect();
        let mut families =
            traffic_families(&traffic, &services, self.cfg.metrics.per_environment).map_err(|e| e.to_string())?;
        let refused = t.counter_file().map(|c| c.name_refused()).unwrap_or_default();
        families.extend(name_refused_families(&refused).map_err(|e| e.to_string())?);
        Ok(families)
    }

    /// Refreshes every `metrics.refresh_ms` until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let every = Duration::from_millis(self.cfg.metrics.refresh_ms);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => self.refresh().await,
                _ = stop.changed() => return,
            }
        }
    }
}

/// Logs a source's failure when it starts or changes, and its recovery, once each.
fn note(last: &mut Option<String>, source: Source, now: Option<&String>) {
    match (last.as_deref(), now) {
        (prev, Some(e)) if prev != Some(e.as_str()) => {
            tracing::warn!(source = source.as_str(), error = %e, "metrics: refresh failed; serving the last values");
            *last = Some(e.clone());
        }
        (Some(_), None) => {
            tracing::info!(source = source.as_str(), "metrics: refreshed again");
            *last = None;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: &[MetricFamily]) -> String {
        let mut buf = vec![];
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), f, &mut buf).expect("encode");
        String::from_utf8(buf).expect("utf-8")
    }

    fn traffic(env: &str, service: &'static str, total: u64, revoked: u64, refused: u64, active: u64) -> PortTraffic {
        PortTraffic {
            env_id: env.into(),
            service,
            counters: Counters {
                connections_total: total,
                revoked_total: revoked,
                refused_total: refused,
                upstream_failed_total: 1,
                connections_active: active,
                bytes_in: 100,
                bytes_out: 1000,
                last_activity_ms: 0,
            },
        }
    }

    #[test]
    fn every_name_refusal_reason_is_a_series() {
        let t = text(&name_refused_families(&[(NameRefusal::NoRoute, 3)]).unwrap());
        assert!(t.contains("gpugate_gateway_name_refused_total{reason=\"no_route\"} 3"), "{t}");
        assert!(t.contains("gpugate_gateway_name_refused_total{reason=\"no_name\"} 0"), "{t}");
        assert_eq!(t.matches("gpugate_gateway_name_refused_total{").count(), NameRefusal::ALL.len());
    }

    #[test]
    fn totals_add_up_without_double_counting_and_stay_bounded() {
        let ports = [traffic("aaaaaaaaaaaaaaaa", "ssh", 10, 3, 2, 1), traffic("bbbbbbbbbbbbbbbb", "ssh", 5, 0, 0, 2)];
        let t = text(&traffic_families(&ports, &["ssh", "jupyter"], false).expect("families"));
        for want in [
            // 10 ended of which 3 revoked, plus 5: 12 completed, 3 revoked, never 15 + 3.
            "gpugate_gateway_connections_total{outcome=\"completed\",service=\"ssh\"} 12",
            "gpugate_gateway_connections_total{outcome=\"revoked\",service=\"ssh\"} 3",
            "gpugate_gateway_connections_total{outcome=\"refused\",service=\"ssh\"} 2",
            "gpugate_gateway_connections_total{outcome=\"upstream_failed\",service=\"ssh\"} 2",
            "gpugate_gateway_connections_active{service=\"ssh\"} 3",
            "gpugate_gateway_bytes_total{direction=\"out\",service=\"ssh\"} 2000",
            // A configured service without routes is there, at zero.
            "gpugate_gateway_connections_active{service=\"jupyter\"} 0",
        ] {
            assert!(t.contains(want), "missing {want}:\n{t}");
        }
        assert!(!t.contains("env_id"), "per-environment series while off:\n{t}");
        assert!(t.contains("counted when a session ends"), "the help says when connections count:\n{t}");

        let t = text(&traffic_families(&ports, &["ssh"], true).expect("families"));
        assert!(
            t.contains("gpugate_environment_connections_total{env_id=\"aaaaaaaaaaaaaaaa\",outcome=\"completed\",service=\"ssh\"} 7"),
            "{t}"
        );
        assert!(t.contains("gpugate_environment_bytes_total{direction=\"in\",env_id=\"bbbbbbbbbbbbbbbb\",service=\"ssh\"} 100"), "{t}");
    }

    #[test]
    fn each_gateway_is_a_series_of_its_own() {
        let row = |name: &str, applied: i64, age: f64| GatewayRow {
            name: name.into(),
            applied_generation: applied,
            current_generation: 9,
            lag_generations: 9 - applied,
            heartbeat_age_s: age,
            stale: age > 6.0,
            heartbeat_ms: 2000,
            heartbeat_at: chrono::Utc::now(),
            last_sync_at: chrono::Utc::now(),
            started_at: chrono::Utc::now(),
            table_path: "/dev/shm/gpugate/routes".into(),
            pid: 1,
            version: "0".into(),
        };
        let t = text(&gateway_families(&[row("gw-a", 9, 0.5), row("gw-b", 4, 30.0)]).expect("families"));
        for want in [
            "gpugate_gateway_applied_generation{gateway=\"gw-a\"} 9",
            "gpugate_gateway_applied_generation{gateway=\"gw-b\"} 4",
            "gpugate_gateway_lag_generations{gateway=\"gw-a\"} 0",
            "gpugate_gateway_lag_generations{gateway=\"gw-b\"} 5",
            "gpugate_gateway_heartbeat_age_seconds{gateway=\"gw-b\"} 30",
        ] {
            assert!(t.contains(want), "missing {want}:\n{t}");
        }
    }

    #[test]
    fn database_series_are_replaced_whole() {
        let pools = [PoolStats {
            service: "ssh".into(),
            total: 10,
            allocated: 2,
            quarantined: 1,
            available: 7,
            reserved: 0,
            utilisation: 0.2,
        }];
        let m = Metrics::new();
        m.replace(Source::Database, database_families(&pools, &[("running".into(), 2)]).expect("families"));
        let first = m.render();
        assert!(first.contains("gpugate_ports{service=\"ssh\",state=\"allocated\"} 2"), "{first}");
        assert!(first.contains("gpugate_environments{status=\"running\"} 2"), "{first}");
        assert!(first.contains("gpugate_metrics_refreshed_timestamp_seconds{source=\"database\"}"), "{first}");
        // The next refresh has no running environment: the old series is gone, not kept.
        m.replace(Source::Database, database_families(&pools, &[("stopped".into(), 1)]).expect("families"));
        let second = m.render();
        assert!(!second.contains("status=\"running\""), "{second}");
        assert!(second.contains("gpugate_environments{status=\"stopped\"} 1"), "{second}");
        // Rendering twice changes nothing (no reset-then-add per scrape).
        assert_eq!(second, m.render());
    }
}
