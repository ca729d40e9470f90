//! Environment variables that override the configuration file (names in the example file).

use std::fmt;
use std::str::FromStr;

use super::{Config, ConfigError, PoolConfig, PortRange, Secret};

/// Reads variable `name`, if set and not empty.
fn env_var(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty())
}

fn parse_env<T: FromStr>(
    env: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    slot: &mut T,
) -> Result<(), ConfigError>
where
    T::Err: fmt::Display,
{
    if let Some(v) = env_var(env, name) {
        *slot = v.trim().parse().map_err(|e: T::Err| ConfigError::Env {
            name,
            message: format!("\"{v}\": {e}"),
        })?;
    }
    Ok(())
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}


impl Config {
    /// Applies the documented environment variables over the file's values.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        parse_env(env, "GPUGATE_LISTEN", &mut self.listen)?;
        if let Some(v) = env_var(env, "DATABASE_URL") {
            self.database_url = Secret::new(v);
        }
        parse_env(env, "GPUGATE_DATABASE_MAX_CONNECTIONS", &mut self.database_max_connections)?;
        parse_env(env, "GPUGATE_DATABASE_ACQUIRE_TIMEOUT_MS", &mut self.database_acquire_timeout_ms)?;
        parse_env(env, "GPUGATE_DOMAIN", &mut self.domain)?;
        if let Some(v) = env_var(env, "GPUGATE_GATEWAY_ADDRESS") {
            let ip = v.trim().parse().map_err(|e| ConfigError::Env {
                name: "GPUGATE_GATEWAY_ADDRESS",
                message: format!("\"{v}\": {e}"),
            })?;
            self.gateway_address = Some(ip);
        }
        if let Some(v) = env_var(env, "GPUGATE_GATEWAY_NAME") {
            let name = v.trim();
            super::check_gateway_name(name)
                .map_err(|message| ConfigError::Env { name: "GPUGATE_GATEWAY_NAME", message })?;
            self.gateway_name = name.to_string();
        }
        parse_env(env, "GPUGATE_GATEWAY_HEARTBEAT_MS", &mut self.gateway_heartbeat_ms)?;
        parse_env(env, "GPUGATE_GATEWAY_ACTIVITY_REPORT_MS", &mut self.gateway_activity_report_ms)?;
        parse_env(env, "GPUGATE_UPSTREAM_HOST", &mut self.upstream_host)?;
        parse_env(env, "GPUGATE_ROUTE_TABLE", &mut self.route_table)?;
        if let Some(v) = env_var(env, "GPUGATE_TLS_PORT") {
            let port = v.trim().parse().map_err(|e| ConfigError::Env {
                name: "GPUGATE_TLS_PORT",
                message: format!("\"{v}\": {e}"),
            })?;
            self.names.tls_port = Some(port);
        }
        parse_env(env, "GPUGATE_NAME_TABLE_SLOTS", &mut self.names.table_slots)?;
        for svc in ["ssh", "jupyter", "code", "rdp"] {
            let name: &'static str = match svc {
                "ssh" => "GPUGATE_ACCESS_SSH",
                "jupyter" => "GPUGATE_ACCESS_JUPYTER",
                "code" => "GPUGATE_ACCESS_CODE",
                _ => "GPUGATE_ACCESS_RDP",
            };
            if let Some(v) = env_var(env, name) {
                let access = v.trim().parse().map_err(|message| ConfigError::Env { name, message })?;
                self.names.access.insert(svc.to_string(), access);
            }
        }
        parse_env(env, "GPUGATE_QUARANTINE_S", &mut self.quarantine_s)?;
        parse_env(env, "GPUGATE_RECONCILE_INTERVAL_S", &mut self.reconcile_interval_s)?;
        parse_env(env, "GPUGATE_ROUTE_WAIT_MS", &mut self.route_wait_ms)?;
        parse_env(env, "GPUGATE_DEPLOYMENT", &mut self.deployment)?;
        for (name, slot) in [
            ("GPUGATE_QUOTA_ENVIRONMENTS", &mut self.quotas.environments),
            ("GPUGATE_QUOTA_GPUS", &mut self.quotas.gpus),
            ("GPUGATE_QUOTA_RUNNING", &mut self.quotas.running),
        ] {
            if let Some(v) = env_var(env, name) {
                *slot = super::tenant::parse_quota(&v).map_err(|message| ConfigError::Env { name, message })?;
            }
        }
        parse_env(env, "GPUGATE_RATE_LIMIT_PER_S", &mut self.rate_limit.per_second)?;
        parse_env(env, "GPUGATE_RATE_LIMIT_BURST", &mut self.rate_limit.burst)?;
        parse_env(env, "GPUGATE_RATE_LIMIT_FAILED_AUTH_PER_MIN", &mut self.rate_limit.failed_auth_per_minute)?;
        parse_env(env, "GPUGATE_RATE_LIMIT_FAILED_AUTH_BURST", &mut self.rate_limit.failed_auth_burst)?;
        parse_env(env, "GPUGATE_IDLE_STOP_AFTER_S", &mut self.idle.default_stop_after_s)?;
        parse_env(env, "GPUGATE_IDLE_MAX_STOP_AFTER_S", &mut self.idle.max_stop_after_s)?;
        parse_env(env, "GPUGATE_IDLE_POLICY", &mut self.idle.policy)?;
        parse_env(env, "GPUGATE_IDLE_CHECK_INTERVAL_S", &mut self.idle.check_interval_s)?;
        parse_env(env, "GPUGATE_IDLE_GPU_BUSY_PERCENT", &mut self.idle.gpu_busy_percent)?;
        parse_env(env, "GPUGATE_IDLE_WARNING_BEFORE_S", &mut self.idle.warning_before_s)?;
        parse_env(env, "GPUGATE_IDLE_MAX_HOLD_S", &mut self.idle.max_hold_s)?;
        parse_env(env, "GPUGATE_READINESS_SSH_DEADLINE_S", &mut self.readiness.ssh_deadline_s)?;
        parse_env(env, "GPUGATE_READINESS_JUPYTER_DEADLINE_S", &mut self.readiness.jupyter_deadline_s)?;
        parse_env(env, "GPUGATE_READINESS_CODE_DEADLINE_S", &mut self.readiness.code_deadline_s)?;
        parse_env(env, "GPUGATE_READINESS_RDP_DEADLINE_S", &mut self.readiness.rdp_deadline_s)?;
        parse_env(env, "GPUGATE_READINESS_PROBE_TIMEOUT_MS", &mut self.readiness.probe_timeout_ms)?;
        parse_env(env, "GPUGATE_READINESS_MAX_BACKOFF_MS", &mut self.readiness.max_backoff_ms)?;
        parse_env(env, "GPUGATE_HOST_NAME", &mut self.fleet.host_name)?;
        parse_env(env, "GPUGATE_PLACEMENT", &mut self.fleet.placement)?;
        parse_env(env, "GPUGATE_HOST_PROBE_INTERVAL_S", &mut self.fleet.probe_interval_s)?;
        parse_env(env, "GPUGATE_HOST_FAIL_AFTER_S", &mut self.fleet.fail_after_s)?;
        parse_env(env, "GPUGATE_IDEMPOTENCY_RETENTION_S", &mut self.idempotency_retention_s)?;
        parse_env(env, "GPUGATE_RETENTION_DAYS", &mut self.retention_days)?;
        parse_env(env, "GPUGATE_SHUTDOWN_GRACE_S", &mut self.shutdown_grace_s)?;
        self.metrics.apply_env(env)?;
        if let Some(v) = env_var(env, "GPUGATE_DEFAULT_SERVICES") {
            self.default_services = split_list(&v);
        }
        for svc in ["ssh", "jupyter", "code", "rdp"] {
            let name: &'static str = match svc {
                "ssh" => "GPUGATE_POOL_SSH",
                "jupyter" => "GPUGATE_POOL_JUPYTER",
                "code" => "GPUGATE_POOL_CODE",
                _ => "GPUGATE_POOL_RDP",
            };
            if let Some(v) = env_var(env, name) {
                if v.trim() == "none" {
                    self.pools.remove(svc);
                    continue;
                }
                let range: PortRange =
                    v.parse().map_err(|message| ConfigError::Env { name, message })?;
                let pool = self.pools.entry(svc.to_string()).or_insert_with(|| PoolConfig {
                    range,
                    bound: None,
                    reserved: vec![],
                });
                pool.range = range;
            }
        }
        if let Some(v) = env_var(env, "GPUGATE_GPUS") {
            let mut devices = vec![];
            for item in split_list(&v) {
                devices.push(item.parse().map_err(|_| ConfigError::Env {
                    name: "GPUGATE_GPUS",
                    message: format!("\"{item}\" is not a GPU index"),
                })?);
            }
            self.gpu.devices = devices;
        }
        parse_env(env, "GPUGATE_GPU_MODE", &mut self.gpu.mode)?;
        if let Some(v) = env_var(env, "GPUGATE_GPU_CAPABILITIES") {
            self.gpu.capabilities = split_list(&v);
        }
        if let Some(v) = env_var(env, "GPUGATE_NVIDIA_SMI") {
            // "none" turns discovery off; otherwise a command line split on whitespace.
            self.gpu.nvidia_smi = match v.trim() {
                "none" => vec![],
                line => line.split_whitespace().map(str::to_string).collect(),
            };
        }
        if let Some(v) = env_var(env, "GPUGATE_WORKSPACE_NVIDIA_SMI") {
            self.gpu.workspace_nvidia_smi = match v.trim() {
                "none" => vec![],
                line => line.split_whitespace().map(str::to_string).collect(),
            };
        }
        parse_env(env, "GPUGATE_GPU_KIND", &mut self.gpu.kind)?;
        parse_env(env, "GPUGATE_GPU_NODE_PATH", &mut self.gpu.node_path)?;
        parse_env(env, "GPUGATE_DOCKER_ENDPOINT", &mut self.docker.endpoint)?;
        parse_env(env, "GPUGATE_DEFAULT_IMAGE", &mut self.docker.default_image)?;
        parse_env(env, "GPUGATE_USERNAME", &mut self.docker.username)?;
        parse_env(env, "GPUGATE_PASSWORD_LOGIN", &mut self.docker.password_login)?;
        parse_env(env, "GPUGATE_DOCKER_STOP_TIMEOUT_S", &mut self.docker.stop_timeout_s)?;
        if let Some(v) = env_var(env, "GPUGATE_ALLOWED_IMAGES") {
            self.docker.allowed_images = split_list(&v);
        }
        parse_env(env, "GPUGATE_DOCKER_NETWORK", &mut self.docker.network)?;
        let l = &mut self.docker.limits;
        parse_env(env, "GPUGATE_MEMORY_MB", &mut l.memory_mb)?;
        parse_env(env, "GPUGATE_MAX_MEMORY_MB", &mut l.max_memory_mb)?;
        parse_env(env, "GPUGATE_CPUS", &mut l.cpus)?;
        parse_env(env, "GPUGATE_MAX_CPUS", &mut l.max_cpus)?;
        parse_env(env, "GPUGATE_PIDS", &mut l.pids)?;
        parse_env(env, "GPUGATE_MAX_PIDS", &mut l.max_pids)?;
        parse_env(env, "GPUGATE_OPEN_FILES", &mut l.open_files)?;
        if let Some(v) = env_var(env, "GPUGATE_FAULT") {
            if !cfg!(feature = "fault-injection") {
                return Err(ConfigError::Env {
                    name: "GPUGATE_FAULT",
                    message: "fault injection is compiled out of this build (feature fault-injection, tests only)".into(),
                });
            }
            self.fault = Some(v);
        }
        Ok(())
    }

}
