//! Idle auto-stop: when a running workspace counts as idle, and how long it may stay so.
//!
//! The signals: the gateways (every byte of every session passes through nginx, which keeps
//! each route's open sessions and the time of its last byte in the table's counters), the
//! utilisation of the workspace's GPUs, and a hold its owner asked for.

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
    /// after its limit. Each look first samples this host's GPUs.
    pub check_interval_s: u64,
    /// A GPU whose utilisation is at or above this percentage is busy, and a workspace with a
    /// busy GPU is not idle (1-100; 0: GPU utilisation never counts).
    pub gpu_busy_percent: u8,
    /// Seconds before an idle stop that the `idle_warning` event comes (0: with the stop). A
    /// workspace whose limit is shorter is warned as soon as it is idle; the stop never comes
    /// sooner than this lead (or the limit, if shorter) after its warning.
    pub warning_before_s: u64,
    /// The longest hold a user may ask for (`POST .../hold`), in seconds (1 to 30 days).
    pub max_hold_s: u64,
}

impl Default for IdleConfig {
    fn default() -> Self {
        IdleConfig {
            default_stop_after_s: 0,
            max_stop_after_s: 0,
            policy: IdlePolicy::NoConnections,
            check_interval_s: 30,
            gpu_busy_percent: 10,
            warning_before_s: 300,
            max_hold_s: 86_400,
        }
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
        if self.gpu_busy_percent > 100 {
            return Err(format!("idle.gpu_busy_percent {} must be 0 (off) to 100", self.gpu_busy_percent));
        }
        if self.warning_before_s > MAX_IDLE_STOP_AFTER_S {
            return Err(format!("idle.warning_before_s {} is over 30 days ({MAX_IDLE_STOP_AFTER_S})", self.warning_before_s));
        }
        if self.max_hold_s == 0 || self.max_hold_s > MAX_IDLE_STOP_AFTER_S {
            return Err(format!("idle.max_hold_s {} must be 1 to 30 days ({MAX_IDLE_STOP_AFTER_S})", self.max_hold_s));
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

    /// Whether a hold of `secs` may be asked for (0: release); the error is worded for the user.
    pub fn check_hold(&self, secs: u64) -> Result<(), String> {
        if secs > self.max_hold_s {
            return Err(format!("{secs} s is over this deployment's longest hold of {} s", self.max_hold_s));
        }
        Ok(())
    }

    /// Whether a GPU at `percent` is busy.
    pub fn gpu_busy(&self, percent: u8) -> bool {
        self.gpu_busy_percent > 0 && percent >= self.gpu_busy_percent
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
    fn work_aware_settings_are_checked() {
        let d = IdleConfig::default();
        assert_eq!((d.gpu_busy_percent, d.warning_before_s, d.max_hold_s), (10, 300, 86_400));
        for (bad, why) in [
            (IdleConfig { gpu_busy_percent: 101, ..d.clone() }, "idle.gpu_busy_percent 101"),
            (IdleConfig { warning_before_s: MAX_IDLE_STOP_AFTER_S + 1, ..d.clone() }, "idle.warning_before_s"),
            (IdleConfig { max_hold_s: 0, ..d.clone() }, "idle.max_hold_s 0"),
            (IdleConfig { max_hold_s: MAX_IDLE_STOP_AFTER_S + 1, ..d.clone() }, "idle.max_hold_s"),
        ] {
            let e = bad.validate().expect_err(why);
            assert!(e.contains(why), "{e}");
        }
        assert!(d.check_hold(0).is_ok() && d.check_hold(86_400).is_ok());
        assert!(d.check_hold(86_401).expect_err("over the longest").contains("longest hold of 86400 s"));
        assert!(d.gpu_busy(10) && d.gpu_busy(90) && !d.gpu_busy(9));
        let off = IdleConfig { gpu_busy_percent: 0, ..d };
        assert!(!off.gpu_busy(100), "0 turns GPU activity off");
    }

    #[test]
    fn policy_names() {
        for p in [IdlePolicy::NoConnections, IdlePolicy::NoTraffic] {
            assert_eq!(p.as_str().parse::<IdlePolicy>(), Ok(p));
        }
        assert!("connections".parse::<IdlePolicy>().is_err());
        let cfg: IdleConfig = toml::from_str("policy = \"no_traffic\"\ndefault_stop_after_s = 600\ngpu_busy_percent = 50")
            .expect("toml");
        assert_eq!(cfg.policy, IdlePolicy::NoTraffic);
        assert_eq!(cfg.gpu_busy_percent, 50);
        assert!(toml::from_str::<IdleConfig>("gpu_busy_percent = 300").is_err(), "not a percentage");
        assert_eq!(cfg.default_stop_after_s, 600);
    }
}
