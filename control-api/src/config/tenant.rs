//! What one user may take: quotas (deployment defaults; per-user overrides live in the
//! database) and the per-token request rate.

use serde::Deserialize;

/// The deployment's default quotas per user. `None` (field omitted, or `none` in the
/// environment variable): no limit.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotaConfig {
    /// Most environments a user may have (any status but deleted).
    pub environments: Option<u32>,
    /// Most GPUs across a user's environments.
    pub gpus: Option<u32>,
    /// Most environments a user may have creating or running at once.
    pub running: Option<u32>,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        QuotaConfig { environments: Some(10), gpus: Some(4), running: None }
    }
}

/// The per-token request rate limit on `/api/v1/*` (a token bucket per bearer token).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Requests per second a token may sustain; 0 turns the limit off.
    pub per_second: f64,
    /// Requests a token may send at once above the sustained rate.
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig { per_second: 50.0, burst: 100 }
    }
}

impl RateLimitConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.per_second.is_finite() && self.per_second >= 0.0 && self.per_second <= 1_000_000.0) {
            return Err(format!("rate_limit.per_second {} must be between 0 (off) and 1000000", self.per_second));
        }
        if self.per_second > 0.0 && self.burst == 0 {
            return Err("rate_limit.burst must be at least 1".into());
        }
        Ok(())
    }
}

/// Parses a quota from an environment variable: a count, or `none` for no limit.
pub fn parse_quota(v: &str) -> Result<Option<u32>, String> {
    match v.trim() {
        "none" => Ok(None),
        n => n.parse().map(Some).map_err(|_| format!("\"{n}\": expected a count or none")),
    }
}
