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

/// The request limits on `/api/v1/*`: a token bucket per authenticated user, and one per
/// client address for failed authentications.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Requests per second a token may sustain; 0 turns the limit off.
    pub per_second: f64,
    /// Requests a token may send at once above the sustained rate.
    pub burst: u32,
    /// Failed authentications (no token, or an unknown, revoked or expired one) one client
    /// address (an IPv6 /64) may sustain per minute before it is answered 429; 0 turns this
    /// limit off. Valid tokens from the same address are never limited by it.
    pub failed_auth_per_minute: u32,
    /// Failed authentications an address may send at once above that rate.
    pub failed_auth_burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig { per_second: 50.0, burst: 100, failed_auth_per_minute: 60, failed_auth_burst: 30 }
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
        if self.failed_auth_per_minute > 0 && self.failed_auth_burst == 0 {
            return Err("rate_limit.failed_auth_burst must be at least 1".into());
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
