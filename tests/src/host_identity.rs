//! A workspace's SSH host identity as a strict OpenSSH client meets it: `StrictHostKeyChecking=yes`
//! with a known_hosts file of the caller's (the deployment's `@cert-authority` line, or a
//! workspace's own lines) and nothing else, by pool port (the real host name, reached through
//! a `nc` ProxyCommand so that no DNS is needed) and by name over TLS. `BatchMode` turns any
//! prompt into a failure, so a login that passes had nothing to ask.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::stack::run;

/// The options of a strict client: only `known_hosts`, no global file, no prompt, key login.
fn strict(key: &Path, known_hosts: &Path) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(["-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "-i"])
        .arg(key)
        .stdin(Stdio::null());
    cmd
}

fn outcome(cmd: &mut Command) -> Result<String, String> {
    let out = run(cmd);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// `ssh -p PORT USER@HOST REMOTE` as a user types it (`HOST` the workspace's SSH name, looked
/// up in known_hosts as `[HOST]:PORT`), the TCP connection made to the gateway on loopback.
pub fn by_port(port: u16, user_at_host: &str, key: &Path, known_hosts: &Path, remote: &str) -> Result<String, String> {
    outcome(
        strict(key, known_hosts)
            .args(["-o", "ProxyCommand=nc 127.0.0.1 %p", "-p", &port.to_string()])
            .arg(user_at_host)
            .arg(remote),
    )
}

/// `ssh -F CONFIG HOST REMOTE`: by name inside TLS (the config block's ProxyCommand).
pub fn by_name(config: &Path, host: &str, key: &Path, known_hosts: &Path, remote: &str) -> Result<String, String> {
    outcome(strict(key, known_hosts).arg("-F").arg(config).arg(host).arg(remote))
}

/// The plain Ed25519 host key (`ssh-ed25519 AAAA...`) the server on the gateway's `port`
/// offers, as `ssh-keyscan` reads it.
pub fn scanned_key(port: u16) -> String {
    let out = run(Command::new("ssh-keyscan").args(["-T", "5", "-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"]));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| !l.starts_with('#')).unwrap_or_else(|| panic!("ssh-keyscan on port {port} found no key"));
    line.split_whitespace().skip(1).take(2).collect::<Vec<_>>().join(" ")
}

/// A `@cert-authority` line like the deployment's but for a CA of the test's own (made with
/// `ssh-keygen` in `dir`): a client that trusts only it must refuse every workspace.
pub fn foreign_ca_line(dir: &Path, domain: &str) -> String {
    let key = dir.join("foreign_ca");
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(dir.join("foreign_ca.pub"));
    let out = run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key));
    assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let public = std::fs::read_to_string(dir.join("foreign_ca.pub")).expect("foreign CA");
    let public: Vec<&str> = public.split_whitespace().take(2).collect();
    format!("@cert-authority *.ssh.{domain},[*.ssh.{domain}]:* {}", public.join(" "))
}
