//! The `[fleet]` section: which host this API's own Docker engine is, how creates choose a
//! host, and how hosts are watched.
//!
//! Other hosts are rows of the `hosts` table (`gpugate-api host add`, or the admin API), so
//! every API replica sees the same fleet without a configuration push.

use serde::Deserialize;

/// How a create chooses among the hosts that can take it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Fill a host before using the next: the host with the fewest free GPUs that still fit
    /// (then the most environments). Keeps whole hosts free for large requests and draining.
    #[default]
    Pack,
    /// Spread the load: the host with the fewest environments (then the most free GPUs).
    Spread,
}

impl Placement {
    /// The name used in configuration and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Pack => "pack",
            Placement::Spread => "spread",
        }
    }
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "pack" => Ok(Placement::Pack),
            "spread" => Ok(Placement::Spread),
            _ => Err("expected pack or spread".into()),
        }
    }
}

/// The `[fleet]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// The host name of this API's own engine (`docker.endpoint`, `upstream_host`, the GPUs
    /// of `[gpu]`): its row in `hosts` is written from this configuration at start. Keep it
    /// stable: environments name their host.
    pub host_name: String,
    /// How a create chooses a host.
    pub placement: Placement,
    /// Seconds between two probes of every host's Docker engine.
    pub probe_interval_s: u64,
    /// Seconds a host may stay unreachable before its environments become `failed` and their
    /// routes are removed (until then they are `unreachable` and keep their routes).
    pub fail_after_s: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig { host_name: "local".into(), placement: Placement::Pack, probe_interval_s: 5, fail_after_s: 300 }
    }
}

/// Whether `name` is a valid host name: 1 to 63 of `a-z 0-9 -`, not starting or ending with `-`
/// (the `hosts` table checks the same).
pub fn valid_host_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl FleetConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_host_name(&self.host_name) {
            return Err(format!(
                "fleet.host_name \"{}\" must be 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'",
                self.host_name
            ));
        }
        if !(1..=3600).contains(&self.probe_interval_s) {
            return Err(format!("fleet.probe_interval_s {} must be 1 to 3600", self.probe_interval_s));
        }
        if self.fail_after_s < self.probe_interval_s {
            return Err(format!(
                "fleet.fail_after_s {} is shorter than fleet.probe_interval_s {}: one missed probe would fail every workspace of the host",
                self.fail_after_s, self.probe_interval_s
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        for ok in ["local", "gpu-01", "a", "h2"] {
            assert!(valid_host_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "GPU", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!valid_host_name(bad), "{bad}");
        }
    }

    #[test]
    fn values_are_checked() {
        assert!(FleetConfig::default().validate().is_ok());
        let bad = FleetConfig { host_name: "My Host".into(), ..FleetConfig::default() };
        assert!(bad.validate().unwrap_err().contains("fleet.host_name"));
        let bad = FleetConfig { probe_interval_s: 0, ..FleetConfig::default() };
        assert!(bad.validate().unwrap_err().contains("probe_interval_s"));
        let bad = FleetConfig { probe_interval_s: 10, fail_after_s: 5, ..FleetConfig::default() };
        assert!(bad.validate().unwrap_err().contains("fail_after_s"));
        let cfg: FleetConfig = toml::from_str("placement = \"spread\"\nhost_name = \"gpu-1\"").expect("toml");
        assert_eq!(cfg.placement, Placement::Spread);
        assert_eq!("pack".parse::<Placement>(), Ok(Placement::Pack));
        assert!("random".parse::<Placement>().is_err());
    }
}
