//! Readiness probes: how long each service of a started workspace may take to answer like the
//! service it is, and how the API probes it meanwhile.

use gpugate_routes::Service;
use serde::Deserialize;

/// The `[readiness]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ReadinessConfig {
    /// Seconds after the container starts within which SSH must send its banner.
    pub ssh_deadline_s: u64,
    /// Seconds within which Jupyter must answer an HTTP request.
    pub jupyter_deadline_s: u64,
    /// Seconds within which the code editor must answer an HTTP request.
    pub code_deadline_s: u64,
    /// Seconds within which RDP must confirm a connection request.
    pub rdp_deadline_s: u64,
    /// Milliseconds one probe may take (connect and answer).
    pub probe_timeout_ms: u64,
    /// The longest pause between two probes of one service; pauses start at 100 ms and
    /// double up to this.
    pub max_backoff_ms: u64,
}

impl Default for ReadinessConfig {
    fn default() -> Self {
        ReadinessConfig {
            ssh_deadline_s: 60,
            jupyter_deadline_s: 180,
            code_deadline_s: 180,
            rdp_deadline_s: 120,
            probe_timeout_ms: 2000,
            max_backoff_ms: 2000,
        }
    }
}

impl ReadinessConfig {
    /// The deadline of `service` in seconds.
    pub fn deadline_s(&self, service: Service) -> u64 {
        match service {
            Service::Ssh => self.ssh_deadline_s,
            Service::Jupyter => self.jupyter_deadline_s,
            Service::Code => self.code_deadline_s,
            Service::Rdp | Service::Other => self.rdp_deadline_s,
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("ssh_deadline_s", self.ssh_deadline_s),
            ("jupyter_deadline_s", self.jupyter_deadline_s),
            ("code_deadline_s", self.code_deadline_s),
            ("rdp_deadline_s", self.rdp_deadline_s),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(format!("readiness.{name} {v} must be 1 to 3600"));
            }
        }
        if !(100..=30_000).contains(&self.probe_timeout_ms) {
            return Err(format!("readiness.probe_timeout_ms {} must be 100 to 30000", self.probe_timeout_ms));
        }
        if !(100..=60_000).contains(&self.max_backoff_ms) {
            return Err(format!("readiness.max_backoff_ms {} must be 100 to 60000", self.max_backoff_ms));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bounds_are_enforced() {
        let d = ReadinessConfig::default();
        assert!(d.validate().is_ok());
        assert_eq!(d.deadline_s(Service::Ssh), 60);
        assert_eq!(d.deadline_s(Service::Jupyter), 180);
        let bad = ReadinessConfig { jupyter_deadline_s: 0, ..d.clone() };
        assert!(bad.validate().unwrap_err().contains("readiness.jupyter_deadline_s"));
        let bad = ReadinessConfig { probe_timeout_ms: 50, ..d.clone() };
        assert!(bad.validate().unwrap_err().contains("probe_timeout_ms"));
        let cfg: ReadinessConfig = toml::from_str("code_deadline_s = 5").expect("toml");
        assert_eq!(cfg.code_deadline_s, 5);
        assert_eq!(cfg.ssh_deadline_s, 60);
        assert!(toml::from_str::<ReadinessConfig>("ssh_deadline = 5").is_err());
    }
}
