//! Routing by name: whether the gateway serves `<env-id>.<service>.<domain>` on a TLS port,
//! and how each service is reached unless a create says otherwise.

use std::collections::BTreeMap;

use gpugate_routes::Service;
use serde::{Deserialize, Serialize};

/// How a service of a workspace is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// A pool port on the gateway (`ssh -p 20417 ...`, `http://<id>.jupyter.<domain>:30112/`).
    Ports,
    /// Its name on the gateway's TLS port (`https://<id>.jupyter.<domain>/`); no pool port.
    Hostname,
    /// Both.
    Both,
}

impl AccessMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            AccessMode::Ports => "ports",
            AccessMode::Hostname => "hostname",
            AccessMode::Both => "both",
        }
    }

    /// Whether the service holds a pool port.
    pub const fn by_port(self) -> bool {
        matches!(self, AccessMode::Ports | AccessMode::Both)
    }

    /// Whether the service has a name route.
    pub const fn by_name(self) -> bool {
        matches!(self, AccessMode::Hostname | AccessMode::Both)
    }
}

impl std::str::FromStr for AccessMode {
    type Err = String;
    fn from_str(s: &str) -> Result<AccessMode, String> {
        match s {
            "ports" => Ok(AccessMode::Ports),
            "hostname" => Ok(AccessMode::Hostname),
            "both" => Ok(AccessMode::Both),
            other => Err(format!("access \"{other}\" is not one of ports, hostname, both")),
        }
    }
}

/// The `[names]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NamesConfig {
    /// The gateway's TLS port serving names (443 in production). Unset: the gateway serves
    /// no names, every service is reached by its pool port (and `access` may not ask for
    /// names).
    pub tls_port: Option<u16>,
    /// How each service is reached when a create does not say (with `tls_port` set; without
    /// it, every service is `ports`). Default: ssh both, jupyter and code hostname, rdp ports.
    pub access: BTreeMap<String, AccessMode>,
    /// Hostname slots of the route table the publisher creates (a power of two from 1024 to
    /// 4194304; about 2.5 times the name routes it must hold keeps lookups short).
    pub table_slots: u32,
}

impl Default for NamesConfig {
    fn default() -> Self {
        NamesConfig {
            tls_port: None,
            access: BTreeMap::from([
                ("ssh".into(), AccessMode::Both),
                ("jupyter".into(), AccessMode::Hostname),
                ("code".into(), AccessMode::Hostname),
                ("rdp".into(), AccessMode::Ports),
            ]),
            table_slots: gpugate_routes::DEFAULT_HOST_SLOTS,
        }
    }
}

impl NamesConfig {
    /// How `service` is reached when a create does not say.
    pub fn default_access(&self, service: Service) -> AccessMode {
        if self.tls_port.is_none() {
            return AccessMode::Ports;
        }
        self.access.get(service.as_str()).copied().unwrap_or(AccessMode::Ports)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), String> {
        if self.tls_port == Some(0) {
            return Err("names.tls_port 0 is not a port".into());
        }
        for name in self.access.keys() {
            match name.parse::<Service>() {
                Ok(Service::Other) | Err(_) => {
                    return Err(format!("names.access names \"{name}\"; services are ssh, jupyter, code, rdp"))
                }
                Ok(Service::Rdp) if self.access[name].by_name() => {
                    return Err("names.access.rdp must be \"ports\": RDP starts in clear text, it cannot be routed by name".into())
                }
                Ok(_) => {}
            }
        }
        gpugate_routes::layout::check_host_slots(self.table_slots)
            .map(|_| ())
            .map_err(|e| format!("names.table_slots: {e}"))?;
        if self.table_slots == 0 {
            return Err("names.table_slots must be at least 1024".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_tls_port_every_service_is_reached_by_port() {
        let d = NamesConfig::default();
        assert!(d.validate().is_ok());
        assert_eq!(d.default_access(Service::Jupyter), AccessMode::Ports);
        let on = NamesConfig { tls_port: Some(443), ..d.clone() };
        assert_eq!(on.default_access(Service::Ssh), AccessMode::Both);
        assert_eq!(on.default_access(Service::Jupyter), AccessMode::Hostname);
        assert_eq!(on.default_access(Service::Rdp), AccessMode::Ports);
        let cfg: NamesConfig = toml::from_str("tls_port = 8443\n[access]\nrdp = \"both\"").unwrap();
        assert_eq!(cfg.default_access(Service::Rdp), AccessMode::Both);
        assert!(toml::from_str::<NamesConfig>("[access]\nssh = \"sometimes\"").is_err());
        let bad = NamesConfig { table_slots: 1000, ..d.clone() };
        assert!(bad.validate().unwrap_err().contains("names.table_slots"));
        let bad = NamesConfig { access: BTreeMap::from([("ftp".into(), AccessMode::Both)]), ..d };
        assert!(bad.validate().unwrap_err().contains("\"ftp\""));
    }
}
