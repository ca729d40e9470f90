//! Idle auto-stop: when a running workspace counts as idle, and how long it may stay so.
//!
//! The signal comes from the gateway: every byte of every session passes through nginx, which
//! keeps each route's open sessions and the time of its last byte in the table's counters.

use serde::Deserialize;

/// What keeps a workspace from being idle.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IdlePolicy {
    /// Idle when no session is open through the gateway and no byte moved for the whole
    /// period: an open but silent SSH session keeps the workspace running.
    #[default]
    NoConnections,
    /// Idle when no byte moved through the gateway for the whole period, open sessions or
    /// not: a forgotten, silent session does not keep a GPU bound (it is closed at the stop).
    NoTraffic,
}

impl IdlePolicy {
    /// The name used in configuration and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            IdlePolicy::NoConnections => "no_connections",
            IdlePolicy::NoTraffic => "no_traffic",
        }
    }
}

impl std::str::FromStr for IdlePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "no_connections" => Ok(IdlePolicy::NoConnections),
            "no_traffic" => Ok(IdlePolicy::NoTraffic),
            _ => Err("expected no_connections or no_traffic".into()),
        }
    }
}

/// The `[idle]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IdleConfig {
    /// `idle_stop_after_s` of an environment whose create names none; 0: never stopped.
    pub default_stop_after_s: u64,
    /// The largest `idle_stop_after_s` a user may choose; 0: no maximum. With a maximum,
    /// "never" (0) is refused too and the default must be within it.
    pub max_stop_after_s: u64,
    /// What counts as activity.
    pub policy: IdlePolicy,
    /// Seconds between two looks at the counters; an idle workspace stops at most this long
    /// after its limit.
    pub check_interval_s: u64,
}

impl Default for IdleConfig {
    fn default() -> Self {
        IdleConfig { default_stop_after_s: 0, max_stop_after_s: 0, policy: IdlePolicy::NoConnections, check_interval_s: 30 }
    }
}

/// Longest idle period a workspace may ask for: 30 days.
pub const MAX_IDLE_STOP_AFTER_S: u64 = 30 * 24 * 3600;

impl IdleConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.check_interval_s == 0 || self.check_interval_s > 3600 {
            return Err(format!("idle.check_interval_s {} must be 1 to 3600", self.check_interval_s));
        }
        if self.max_stop_after_s > MAX_IDLE_STOP_AFTER_S {
            return Err(format!("idle.max_stop_after_s {} is over 30 days ({MAX_IDLE_STOP_AFTER_S})", self.max_stop_after_s));
        }
        self.check(self.default_stop_after_s).map_err(|e| format!("idle.default_stop_after_s: {e}"))
    }

    /// Whether a workspace may ask for `secs` (0: never); the error is worded for the user.
    pub fn check(&self, secs: u64) -> Result<(), String> {
        if secs > MAX_IDLE_STOP_AFTER_S {
            return Err(format!("{secs} s is over 30 days ({MAX_IDLE_STOP_AFTER_S} s)"));
        }
        if self.max_stop_after_s > 0 {
            if secs == 0 {
                return Err(format!(
                    "0 (never) is not allowed here; the deployment stops idle workspaces after at most {} s",
                    self.max_stop_after_s
                ));
            }
            if secs > self.max_stop_after_s {
                return Err(format!("{secs} s is over this deployment's maximum of {} s", self.max_stop_after_s));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_never() {
        let open = IdleConfig::default();
        assert!(open.validate().is_ok());
        assert!(open.check(0).is_ok());
        assert!(open.check(MAX_IDLE_STOP_AFTER_S).is_ok());
        assert!(open.check(MAX_IDLE_STOP_AFTER_S + 1).is_err());
        let capped = IdleConfig { default_stop_after_s: 3600, max_stop_after_s: 7200, ..IdleConfig::default() };
        assert!(capped.validate().is_ok());
        assert!(capped.check(0).unwrap_err().contains("never"));
        assert!(capped.check(7201).unwrap_err().contains("maximum of 7200"));
        assert!(capped.check(60).is_ok());
        // A cap without a default inside it cannot work: creates without a value would get 0.
        let bad = IdleConfig { max_stop_after_s: 7200, ..IdleConfig::default() };
        assert!(bad.validate().unwrap_err().contains("default_stop_after_s"));
        let bad = IdleConfig { check_interval_s: 0, ..IdleConfig::default() };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn policy_names() {
        for p in [IdlePolicy::NoConnections, IdlePolicy::NoTraffic] {
            assert_eq!(p.as_str().parse::<IdlePolicy>(), Ok(p));
        }
        assert!("connections".parse::<IdlePolicy>().is_err());
        let cfg: IdleConfig = toml::from_str("policy = \"no_traffic\"\ndefault_stop_after_s = 600").expect("toml");
        assert_eq!(cfg.policy, IdlePolicy::NoTraffic);
        assert_eq!(cfg.default_stop_after_s, 600);
    }
}
