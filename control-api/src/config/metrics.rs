//! The `[metrics]` section: how `/metrics` is served, what it shows and how fresh it is.

use std::net::SocketAddr;

use serde::Deserialize;

use super::error::ConfigError;
use super::secret::Secret;

/// Shortest and longest accepted bearer token for `/metrics`.
const TOKEN_LEN: std::ops::RangeInclusive<usize> = 16..=256;

/// How `/metrics` is served and what it shows.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Series per environment (`env_id` label: connections, open connections, bytes). Off by
    /// default: they list every environment id with its traffic and grow with the number of
    /// environments. Totals per service are always there.
    pub per_environment: bool,
    /// When set, `/metrics` answers only requests with `Authorization: Bearer <token>`
    /// (401 otherwise). Never printed.
    pub token: Secret,
    /// A separate address that serves only `/metrics` and `/healthz`; when set, the API's own
    /// address no longer serves `/metrics`. For deployments that expose the API port.
    pub listen: Option<SocketAddr>,
    /// Milliseconds between refreshes of the gauges read from the database and the route
    /// table; a scrape answers from the last refresh and runs no query.
    pub refresh_ms: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { per_environment: false, token: Secret::default(), listen: None, refresh_ms: 5000 }
    }
}

impl MetricsConfig {
    /// Checks the values; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(100..=300_000).contains(&self.refresh_ms) {
            return Err(format!("metrics.refresh_ms {} is outside 100-300000", self.refresh_ms));
        }
        let token = self.token.expose();
        if !token.is_empty() {
            // The token travels in a header: visible ASCII only, and long enough not to guess.
            if !TOKEN_LEN.contains(&token.len()) {
                return Err(format!(
                    "metrics.token must be {}-{} characters long",
                    TOKEN_LEN.start(),
                    TOKEN_LEN.end()
                ));
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("metrics.token must be visible ASCII characters without spaces".into());
            }
        }
        Ok(())
    }

    /// Applies `GPUGATE_METRICS_*` over the file's values.
    pub(super) fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let var = |name: &str| env(name).filter(|v| !v.is_empty());
        if let Some(v) = var("GPUGATE_METRICS_PER_ENVIRONMENT") {
            self.per_environment = match v.trim() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                other => {
                    return Err(ConfigError::Env {
                        name: "GPUGATE_METRICS_PER_ENVIRONMENT",
                        message: format!("\"{other}\": expected true or false"),
                    })
                }
            };
        }
        if let Some(v) = var("GPUGATE_METRICS_TOKEN") {
            self.token = Secret::new(v);
        }
        if let Some(v) = var("GPUGATE_METRICS_LISTEN") {
            let addr = v.trim().parse().map_err(|e| ConfigError::Env {
                name: "GPUGATE_METRICS_LISTEN",
                message: format!("\"{v}\": {e}"),
            })?;
            self.listen = Some(addr);
        }
        if let Some(v) = var("GPUGATE_METRICS_REFRESH_MS") {
            self.refresh_ms = v.trim().parse().map_err(|e| ConfigError::Env {
                name: "GPUGATE_METRICS_REFRESH_MS",
                message: format!("\"{v}\": {e}"),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn metrics_options_from_file_and_environment() {
        let cfg = Config::from_toml("[metrics]\nper_environment = true\nrefresh_ms = 1000\n").expect("parses");
        assert!(cfg.metrics.per_environment);
        assert_eq!(cfg.metrics.refresh_ms, 1000);
        assert!(!Config::default().metrics.per_environment, "per-environment series are off by default");

        let mut cfg = Config::default();
        let env = |k: &str| match k {
            "GPUGATE_METRICS_PER_ENVIRONMENT" => Some("true".to_string()),
            "GPUGATE_METRICS_TOKEN" => Some("scrape-secret-0123456789".to_string()),
            "GPUGATE_METRICS_LISTEN" => Some("127.0.0.1:9100".to_string()),
            _ => None,
        };
        cfg.apply_env(&env).expect("applies");
        cfg.validate().expect("valid");
        assert!(cfg.metrics.per_environment);
        assert_eq!(cfg.metrics.listen, Some("127.0.0.1:9100".parse().expect("addr")));
        let shown = format!("{cfg:#?}");
        assert!(!shown.contains("scrape-secret"), "the metrics token leaked into Debug: {shown}");
        assert!(shown.contains("per_environment: true"), "check-config shows the option: {shown}");

        let bad = |k: &str| (k == "GPUGATE_METRICS_PER_ENVIRONMENT").then(|| "maybe".to_string());
        let err = Config::default().apply_env(&bad).expect_err("refused").to_string();
        assert!(err.contains("GPUGATE_METRICS_PER_ENVIRONMENT"), "{err}");
    }

    #[test]
    fn short_tokens_and_odd_intervals_are_refused() {
        let cfg = Config::from_toml("[metrics]\ntoken = \"short\"\n").expect("parses");
        let err = cfg.validate().expect_err("refused").to_string();
        assert!(err.contains("metrics.token") && !err.contains("short\""), "{err}");
        let cfg = Config::from_toml("[metrics]\ntoken = \"has a space in it, long enough\"\n").expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("metrics.token"));
        let cfg = Config::from_toml("[metrics]\nrefresh_ms = 0\n").expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("metrics.refresh_ms"));
    }
}
