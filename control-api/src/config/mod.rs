//! Typed configuration: a TOML file, overridden by environment variables, validated at start.
//!
//! Every field has a default that runs a development setup on one host. Secrets (the database
//! URL's password) never appear in `Debug` output or logs.

mod env;
mod error;
mod fleet;
mod gateway;
mod gpu;
mod idle;
mod metrics;
mod names;
mod range;
mod readiness;
mod secret;
mod tenant;
mod workspace;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

pub use fleet::{valid_host_name, FleetConfig, Placement};
pub use gateway::{check_name as check_gateway_name, HEARTBEAT_MS_RANGE as GATEWAY_HEARTBEAT_MS_RANGE};
pub use gpu::{GpuConfig, GpuMode, NVIDIA_CAPABILITIES};
pub use idle::{IdleConfig, IdlePolicy, MAX_IDLE_STOP_AFTER_S};
pub use readiness::ReadinessConfig;
pub use metrics::MetricsConfig;
pub use names::{AccessMode, NamesConfig};
pub use error::ConfigError;
pub use range::PortRange;
pub use secret::Secret;
pub use tenant::{QuotaConfig, RateLimitConfig};
pub use workspace::{image_allowed, LimitsConfig, PasswordLogin, MIN_CPUS, MIN_MEMORY_MB, MIN_PIDS};

use gpugate_routes::Service;
use serde::Deserialize;

/// One service's port pool.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The ports handed out for this service. May grow at run time (SIGHUP or
    /// `POST /api/v1/admin/pools/reload`) up to `bound`.
    pub range: PortRange,
    /// The range nginx binds for this service (its `listen` line); the pool may never leave
    /// it. Defaults to `range`. Read at start only.
    #[serde(default)]
    pub bound: Option<PortRange>,
    /// Ports inside `range` that are never handed out.
    #[serde(default)]
    pub reserved: Vec<u16>,
}

impl PoolConfig {
    fn new(range: &str) -> PoolConfig {
        PoolConfig { range: range.parse().unwrap_or(PortRange { start: 1, end: 1 }), bound: None, reserved: vec![] }
    }
    /// The range nginx binds.
    pub fn bound(&self) -> PortRange {
        self.bound.unwrap_or(self.range)
    }
}

/// Docker settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Docker endpoint: empty for the local defaults (`DOCKER_HOST` or
    /// `/var/run/docker.sock`), or `unix:///path/docker.sock`, or `tcp://host:port`.
    pub endpoint: String,
    /// Image used when a create request names none. Must exist locally (`docker pull` it).
    pub default_image: String,
    /// Login name inside workspaces (`GPUGATE_USER`).
    pub username: String,
    /// Whether workspaces take their password over SSH (`auto`: until the owner has an
    /// account key).
    pub password_login: PasswordLogin,
    /// Seconds Docker waits for a workspace to stop before killing it.
    pub stop_timeout_s: u32,
    /// Seconds any one Docker call may take.
    pub call_timeout_s: u64,
    /// Images a create may name: exact names, or prefixes ending in `*`. Empty: only
    /// `default_image`.
    pub allowed_images: Vec<String>,
    /// The bridge network workspaces join (created with inter-container traffic disabled
    /// when missing). Empty: `gpugate-<deployment>`.
    pub network: String,
    /// Resource limits of each workspace.
    pub limits: LimitsConfig,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            endpoint: String::new(),
            default_image: "gpugate/workspace:latest".into(),
            username: "remotegpu".into(),
            password_login: PasswordLogin::default(),
            stop_timeout_s: 10,
            call_timeout_s: 60,
            allowed_images: vec![],
            network: String::new(),
            limits: LimitsConfig::default(),
        }
    }
}

/// The whole configuration of `gpugate-api`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP API listens on.
    pub listen: SocketAddr,
    /// PostgreSQL URL (`DATABASE_URL`). Required.
    pub database_url: Secret,
    /// Most database connections this process opens.
    pub database_max_connections: u32,
    /// How long a request waits for a database connection before it is a 503 (ms): with the
    /// database down, every endpoint answers within about this long.
    pub database_acquire_timeout_ms: u64,
    /// Base domain: host names are `<env-id>.<service>.<domain>`.
    pub domain: String,
    /// Public address of the gateway, for `gpugate-api dns`.
    pub gateway_address: Option<IpAddr>,
    /// This gateway's name in the gateway registry, under which its publisher reports the
    /// route generation its table holds (`GPUGATE_GATEWAY_NAME`). 1 to 63 characters of
    /// `A-Z a-z 0-9 . _ -`, unique per gateway host. Default: the machine's host name.
    pub gateway_name: String,
    /// How often the publisher renews its row in the gateway registry (ms); a row not renewed
    /// for three intervals shows as stale (`GPUGATE_GATEWAY_HEARTBEAT_MS`, 100-300000).
    pub gateway_heartbeat_ms: u64,
    /// How often the publisher reports its table's counters for fleet-wide activity (ms;
    /// `GPUGATE_GATEWAY_ACTIVITY_REPORT_MS`, 100-60000; 0: off). A gateway whose report is
    /// older than three intervals makes the idle task wait: with 0, this gateway's sessions
    /// are unknown, and no workspace is idle-stopped while it is registered.
    pub gateway_activity_report_ms: u64,
    /// Address container ports are published on; routes point there.
    pub upstream_host: IpAddr,
    /// The route-table file shared with nginx.
    pub route_table: PathBuf,
    /// Seconds a released port waits before it can be handed out again.
    pub quarantine_s: u64,
    /// Seconds between reconcile passes (each also re-syncs the route table).
    pub reconcile_interval_s: u64,
    /// Milliseconds a create or start waits for its routes to be live in the table.
    pub route_wait_ms: u64,
    /// Services a workspace gets when the request names none.
    pub default_services: Vec<String>,
    /// Name of this deployment; labels its containers so that several deployments can share
    /// one Docker engine without reaping each other's workspaces.
    pub deployment: String,
    /// Port pools per service (`ssh`, `jupyter`, `code`, `rdp`).
    pub pools: BTreeMap<String, PoolConfig>,
    /// GPU inventory.
    pub gpu: GpuConfig,
    /// Docker settings.
    pub docker: DockerConfig,
    /// Default quotas per user (overrides: `gpugate-api user set-quota`).
    pub quotas: QuotaConfig,
    /// Per-token request rate limit.
    pub rate_limit: RateLimitConfig,
    /// Idle auto-stop.
    pub idle: IdleConfig,
    /// Per-service readiness probes after each start.
    pub readiness: ReadinessConfig,
    /// Routing by name on the gateway's TLS port (`[names]`).
    pub names: NamesConfig,
    /// GPU hosts: this engine's host name, placement, host health (`[fleet]`).
    pub fleet: FleetConfig,
    /// Seconds an `Idempotency-Key` keeps answering with the environment it created.
    pub idempotency_retention_s: u64,
    /// Days events and deleted environments' rows are kept (the reconciler removes older
    /// ones); 0 keeps them forever.
    pub retention_days: u32,
    /// Seconds a graceful shutdown (SIGTERM) waits for operations in flight before it stops
    /// the publisher and releases the liveness lock anyway.
    pub shutdown_grace_s: u64,
    /// How `/metrics` is served and what it shows (`[metrics]`).
    pub metrics: MetricsConfig,
    /// Testing only: a point at which operations fail or the process aborts
    /// (`GPUGATE_FAULT`, e.g. `fail:docker_create`, `crash:after_docker_start`). Never set it in
    /// production.
    #[serde(skip)]
    pub fault: Option<String>,
    /// The file this configuration was read from (for reloads).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        let mut pools = BTreeMap::new();
        pools.insert("ssh".to_string(), PoolConfig::new("20000-20999"));
        pools.insert("jupyter".to_string(), PoolConfig::new("30000-30999"));
        pools.insert("code".to_string(), PoolConfig::new("31000-31999"));
        pools.insert("rdp".to_string(), PoolConfig::new("32000-32499"));
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: Secret::default(),
            database_max_connections: 20,
            database_acquire_timeout_ms: 2000,
            domain: "x-gpu.com".into(),
            gateway_address: None,
            gateway_name: gateway::default_name(),
            gateway_heartbeat_ms: gateway::DEFAULT_HEARTBEAT_MS,
            gateway_activity_report_ms: gateway::DEFAULT_ACTIVITY_REPORT_MS,
            upstream_host: IpAddr::from([127, 0, 0, 1]),
            route_table: PathBuf::from(gpugate_routes::DEFAULT_TABLE_PATH),
            quarantine_s: 300,
            reconcile_interval_s: 30,
            route_wait_ms: 2000,
            default_services: vec!["ssh".into(), "jupyter".into(), "code".into()],
            deployment: "default".into(),
            pools,
            gpu: GpuConfig::default(),
            docker: DockerConfig::default(),
            quotas: QuotaConfig::default(),
            rate_limit: RateLimitConfig::default(),
            idle: IdleConfig::default(),
            readiness: ReadinessConfig::default(),
            names: NamesConfig::default(),
            fleet: FleetConfig::default(),
            idempotency_retention_s: 24 * 3600,
            retention_days: 30,
            shutdown_grace_s: 60,
            metrics: MetricsConfig::default(),
            fault: None,
            source: None,
        }
    }
}

impl Config {
    /// Reads `file` (if given), applies environment overrides and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with(file, &|k| std::env::var(k).ok())
    }

    /// [`Config::load`] with an explicit environment (tests).
    pub fn load_with(
        file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
                let mut cfg = Config::from_toml(&text)
                    .map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
                cfg.source = Some(path.to_owned());
                cfg
            }
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment, no validation).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }

    /// Checks that the values make a working setup; the message names what to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.domain.is_empty() || self.domain.starts_with('.') || self.domain.contains(' ') {
            return bad(format!("domain \"{}\" is not a DNS name", self.domain));
        }
        if self.quarantine_s > 7 * 24 * 3600 {
            return bad(format!("quarantine_s {} is over a week", self.quarantine_s));
        }
        if !(100..=60_000).contains(&self.database_acquire_timeout_ms) {
            return bad(format!(
                "database_acquire_timeout_ms {} is outside 100-60000",
                self.database_acquire_timeout_ms
            ));
        }
        self.docker.limits.validate().map_err(ConfigError::Invalid)?;
        self.rate_limit.validate().map_err(ConfigError::Invalid)?;
        self.idle.validate().map_err(ConfigError::Invalid)?;
        self.readiness.validate().map_err(ConfigError::Invalid)?;
        self.names.validate().map_err(ConfigError::Invalid)?;
        self.fleet.validate().map_err(ConfigError::Invalid)?;
        self.metrics.validate().map_err(ConfigError::Invalid)?;
        if self.idempotency_retention_s < 24 * 3600 {
            return bad(format!(
                "idempotency_retention_s {} is under 24 h (86400); clients retry for a day",
                self.idempotency_retention_s
            ));
        }
        gateway::check_name(&self.gateway_name)
            .map_err(|m| ConfigError::Invalid(format!("gateway_name (GPUGATE_GATEWAY_NAME) {m}")))?;
        if !gateway::HEARTBEAT_MS_RANGE.contains(&self.gateway_heartbeat_ms) {
            return bad(format!(
                "gateway_heartbeat_ms {} is outside {}-{}",
                self.gateway_heartbeat_ms,
                gateway::HEARTBEAT_MS_RANGE.start(),
                gateway::HEARTBEAT_MS_RANGE.end()
            ));
        }
        let report = self.gateway_activity_report_ms;
        if report != 0 && !gateway::ACTIVITY_REPORT_MS_RANGE.contains(&report) {
            return bad(format!(
                "gateway_activity_report_ms {report} is outside {}-{} (0: off)",
                gateway::ACTIVITY_REPORT_MS_RANGE.start(),
                gateway::ACTIVITY_REPORT_MS_RANGE.end()
            ));
        }
        if self.reconcile_interval_s == 0 {
            return bad("reconcile_interval_s must be at least 1".into());
        }
        if self.deployment.is_empty()
            || !self.deployment.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(format!(
                "deployment \"{}\" must be non-empty letters, digits, '-' or '_'",
                self.deployment
            ));
        }
        // It names the home directory the workspace's volume is mounted on, and the
        // workspace image refuses any other shape.
        let u = &self.docker.username;
        let first_ok = u.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        if !first_ok || u.len() > 32 || !u.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-') {
            return bad(format!("docker.username \"{u}\" must match [a-z_][a-z0-9_-]{{0,31}}"));
        }
        for (name, pool) in &self.pools {
            let service = pool_service(name).map_err(ConfigError::Invalid)?;
            let _ = service;
            if !pool.bound().covers(&pool.range) {
                return bad(format!(
                    "pool {name}: range {} is not inside its bound {} (the ports nginx binds)",
                    pool.range,
                    pool.bound()
                ));
            }
            if let Some(p) = pool.reserved.iter().find(|p| !pool.range.contains(**p)) {
                return bad(format!("pool {name}: reserved port {p} is outside range {}", pool.range));
            }
        }
        let pools: Vec<_> = self.pools.iter().collect();
        for (i, (a, pa)) in pools.iter().enumerate() {
            for (b, pb) in &pools[i + 1..] {
                if pa.bound().overlaps(&pb.bound()) {
                    return bad(format!(
                        "pools {a} ({}) and {b} ({}) overlap; a port routes to one service",
                        pa.bound(),
                        pb.bound()
                    ));
                }
            }
        }
        if self.default_services.is_empty() {
            return bad("default_services is empty".into());
        }
        for s in &self.default_services {
            let svc = pool_service(s).map_err(ConfigError::Invalid)?;
            if !self.pools.contains_key(svc.as_str()) {
                return bad(format!("default service {s} has no port pool"));
            }
        }
        self.gpu.validate().map_err(ConfigError::Invalid)?;
        Ok(())
    }

    /// Warnings that do not stop the start (pools in the kernel's ephemeral port range).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = vec![];
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().filter_map(|t| t.parse::<u16>().ok());
                Some(PortRange { start: it.next()?, end: it.next()? })
            });
        if let Some(eph) = ephemeral {
            for (name, pool) in &self.pools {
                if pool.bound().overlaps(&eph) {
                    out.push(format!(
                        "pool {name} ({}) overlaps the kernel's ephemeral port range {eph}; \
                         add it to net.ipv4.ip_local_reserved_ports",
                        pool.bound()
                    ));
                }
            }
        }
        out
    }

    /// The configured pools as services.
    pub fn services(&self) -> Vec<(Service, &PoolConfig)> {
        self.pools.iter().filter_map(|(n, p)| Some((pool_service(n).ok()?, p))).collect()
    }

    /// The Docker network workspaces join.
    pub fn network(&self) -> String {
        if self.docker.network.is_empty() {
            format!("gpugate-{}", self.deployment)
        } else {
            self.docker.network.clone()
        }
    }

    /// The fault point named `point` is armed with `action` (`fail` or `crash`).
    pub fn fault_is(&self, action: &str, point: &str) -> bool {
        self.fault.as_deref().is_some_and(|f| f.split_once(':') == Some((action, point)))
    }
}

/// The service a pool key names; only endpoint services have pools.
pub fn pool_service(name: &str) -> Result<Service, String> {
    match name.parse::<Service>() {
        Ok(Service::Other) | Err(_) => Err(format!(
            "unknown service \"{name}\" (expected ssh, jupyter, code or rdp)"
        )),
        Ok(s) => Ok(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn overlapping_pools_are_refused() {
        let cfg = Config::from_toml(
            "[pools.ssh]\nrange = \"20000-20100\"\n[pools.jupyter]\nrange = \"20100-20200\"\n",
        )
        .expect("parses");
        let err = cfg.validate().expect_err("refused").to_string();
        assert!(err.contains("overlap"), "{err}");
    }

    #[test]
    fn out_of_range_and_unknown_fields_are_refused() {
        let err = Config::from_toml("[pools.ssh]\nrange = \"60000-65536\"\n").expect_err("refused");
        assert!(err.contains("not a TCP port"), "{err}");
        let err = Config::from_toml("listen_adress = \"1.2.3.4:1\"\n").expect_err("refused");
        assert!(err.contains("unknown field"), "{err}");
        let cfg = Config::from_toml("[pools.ftp]\nrange = \"1000-1001\"\n").expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("unknown service"));
        // The user name names the home the volume is mounted on: no path tricks.
        let cfg = Config::from_toml("[docker]\nusername = \"../etc\"\n").expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("docker.username"));
    }

    #[test]
    fn environment_overrides_file() {
        let env = |k: &str| match k {
            "GPUGATE_POOL_SSH" => Some("21000-21009".to_string()),
            "GPUGATE_GPUS" => Some("0,1,3".to_string()),
            "DATABASE_URL" => Some("postgres://u:hunter2@h/db".to_string()),
            _ => None,
        };
        let mut cfg = Config::from_toml("quarantine_s = 5\n").expect("parses");
        cfg.apply_env(&env).expect("applies");
        assert_eq!(cfg.pools["ssh"].range, PortRange { start: 21000, end: 21009 });
        assert_eq!(cfg.gpu.devices, vec![0, 1, 3]);
        assert_eq!(cfg.quarantine_s, 5);
        assert!(!format!("{cfg:?}").contains("hunter2"), "secret leaked into Debug");
        let bad = |k: &str| (k == "GPUGATE_QUARANTINE_S").then(|| "soon".to_string());
        assert!(cfg.apply_env(&bad).expect_err("refused").to_string().contains("GPUGATE_QUARANTINE_S"));
        let _ = no_env("x");
    }

    #[test]
    fn the_example_file_is_valid_and_matches_the_defaults() {
        let cfg = Config::from_toml(include_str!("../../gpugate.example.toml")).expect("example parses");
        cfg.validate().expect("example validates");
        let d = Config::default();
        assert_eq!(cfg.pools, d.pools);
        assert_eq!((cfg.listen, cfg.quarantine_s, cfg.route_table.clone()), (d.listen, d.quarantine_s, d.route_table));
    }

    #[test]
    fn a_bad_gateway_name_is_refused_naming_the_setting() {
        let env = |k: &str| (k == "GPUGATE_GATEWAY_NAME").then(|| "gw a".to_string());
        let err = Config::load_with(None, &env).expect_err("refused").to_string();
        assert!(err.contains("GPUGATE_GATEWAY_NAME"), "{err}");
        let env = |k: &str| (k == "GPUGATE_GATEWAY_NAME").then(|| "gw-b.example".to_string());
        assert_eq!(Config::load_with(None, &env).expect("valid").gateway_name, "gw-b.example");
        let cfg = Config::from_toml("gateway_name = \"\"\n").expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("gateway_name"));
        let cfg = Config::from_toml("gateway_heartbeat_ms = 50\n").expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("gateway_heartbeat_ms"));
    }

    #[test]
    fn range_must_stay_inside_bound() {
        let cfg = Config::from_toml(
            "[pools.ssh]\nrange = \"20000-20100\"\nbound = \"20000-20050\"\n",
        )
        .expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("bound"));
    }
}
