//! The baseline we replace: the same nginx build without the module, one config file per port
//! included from nginx.conf, and every change applied by `nginx -t` then `nginx -s reload`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gpugate_tests::{dist, Nginx};

use crate::load::first_success;
use crate::nginx_config;

/// An nginx routing by per-port config files.
pub struct ReloadGateway {
    pub nginx: Nginx,
    ports_dir: PathBuf,
}

fn port_conf(port: u16, upstream: SocketAddr) -> String {
    format!("server {{ listen 127.0.0.1:{port}; proxy_pass {upstream}; }}\n")
}

impl ReloadGateway {
    /// Writes one file per port of `ports`, all to `upstream`, and starts nginx on them.
    pub fn start(root: &Path, ports: impl Iterator<Item = u16>, upstream: SocketAddr) -> ReloadGateway {
        let ports_dir = root.join("nginx/ports");
        std::fs::create_dir_all(&ports_dir).expect("create ports dir");
        for port in ports {
            std::fs::write(ports_dir.join(format!("{port}.conf")), port_conf(port, upstream))
                .expect("write port conf");
        }
        let nginx = Nginx::start(root, &nginx_config(false, "    include ports/*.conf;"));
        ReloadGateway { nginx, ports_dir }
    }

    fn nginx_cmd(&self) -> Command {
        let mut cmd = Command::new(dist().join("sbin/nginx"));
        cmd.arg("-p").arg(&self.nginx.prefix).arg("-c").arg(&self.nginx.conf);
        cmd
    }

    /// The whole change as an operator script does it: write the port's file, `nginx -t`,
    /// `nginx -s reload`, then poll every millisecond until a round trip through the new port
    /// succeeds. Returns the time from the file write to that first success.
    pub fn activate(&self, port: u16, upstream: SocketAddr) -> Result<Duration, String> {
        let start = Instant::now();
        std::fs::write(self.ports_dir.join(format!("{port}.conf")), port_conf(port, upstream))
            .map_err(|e| format!("write port conf: {e}"))?;
        let test = self.nginx_cmd().arg("-t").output().map_err(|e| format!("nginx -t: {e}"))?;
        if !test.status.success() {
            return Err(format!("nginx -t failed: {}", String::from_utf8_lossy(&test.stderr)));
        }
        let reload =
            self.nginx_cmd().args(["-s", "reload"]).output().map_err(|e| format!("reload: {e}"))?;
        if !reload.status.success() {
            return Err(format!("nginx -s reload failed: {}", String::from_utf8_lossy(&reload.stderr)));
        }
        first_success(port, start, Duration::from_millis(1), Duration::from_secs(60))
            .map(|(t, _)| t)
            .ok_or_else(|| format!("port {port} never answered after the reload"))
    }
}
