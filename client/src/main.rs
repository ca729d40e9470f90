//! `gpugate`: the command-line client of a gpugate deployment. Workspaces (`ls`, `create`,
//! `start`, `stop`, `rm`), SSH into them by name through the gateway's TLS port with nothing
//! but OpenSSH and this binary (`ssh`, `proxy`, `port-forward`, `config-ssh`), and the caller's
//! account keys (`keys`). Exit codes: 0 done, 1 the API refused (its message is printed), 2
//! bad usage, 3 not logged in or a local file that cannot be used, 4 the API or the gateway
//! could not be reached, 5 no such workspace.

mod api;
mod config;
mod exit;
mod proxy;
mod ssh_config;

use std::io::{IsTerminal, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use api::Api;
use config::Config;
use exit::Failure;
use ssh_config::HostEntry;

#[derive(Parser)]
#[command(name = "gpugate", version, about = "The gpugate client: GPU workspaces and SSH to them through the gateway")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stores the API's address and a token (from --token, GPUGATE_TOKEN or standard input),
    /// after checking that the API takes it.
    Login {
        /// The API's base URL, e.g. https://api.gpu.example.com
        api: String,
        #[arg(long, env = "GPUGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Where the gateway's names lead when DNS does not say (an address or host name).
        #[arg(long)]
        gateway: Option<String>,
        /// A PEM file of the CA that signed the API's and the gateway's certificates.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Lists your workspaces.
    Ls {
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Creates a workspace.
    Create {
        name: String,
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        /// Answer once its services are ready, not only routed.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Starts a stopped workspace.
    Start {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// Stops a workspace (its home stays).
    Stop { name: String },
    /// Deletes a workspace and its home.
    Rm { name: String },
    /// Logs in to a workspace over SSH (strict host checking against the deployment's CA).
    Ssh {
        name: String,
        /// A command to run instead of a shell (after --).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// An OpenSSH ProxyCommand: carries standard input and output to HOST through the gateway
    /// (TLS with HOST as the server name, or plain TCP with --tcp).
    Proxy {
        host: String,
        #[arg(long, default_value_t = 443)]
        port: u16,
        #[arg(long)]
        tcp: bool,
        /// Where HOST leads (default: the stored gateway, else HOST itself).
        #[arg(long)]
        gateway: Option<String>,
        /// The CA (PEM) of the gateway's certificate (default: the stored one, else Mozilla's roots).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Writes one managed block in ~/.ssh/config (then `ssh NAME`) and the deployment's CA
    /// line in gpugate's own known_hosts file.
    ConfigSsh {
        /// Show what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The file to manage (default ~/.ssh/config).
        #[arg(long)]
        ssh_config: Option<PathBuf>,
    },
    /// Forwards LOCAL (a port, or ADDRESS:PORT) to the workspace's own port REMOTE.
    PortForward {
        name: String,
        /// LOCAL:REMOTE, e.g. 8888:8888
        spec: String,
    },
    /// Your account keys: every workspace of yours accepts them.
    Keys {
        #[command(subcommand)]
        command: KeysCmd,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Adds a public key (default ~/.ssh/id_ed25519.pub).
    Add {
        file: Option<PathBuf>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Lists them.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Removes one by id.
    Rm { id: i64 },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli.command) {
        eprintln!("gpugate: {e}");
        std::process::exit(e.code());
    }
}

fn run(cmd: Cmd) -> Result<(), Failure> {
    match cmd {
        Cmd::Login { api, token, gateway, ca } => login(api, token, gateway, ca),
        Cmd::Ls { json } => ls(json),
        Cmd::Create { name, gpus, wait, json } => {
            let mut body = json!({"name": name, "gpus": gpus});
            if wait {
                body["wait"] = json!("ready");
            }
            let env = client()?.1.call("POST", "/api/v1/environments", Some(&body))?;
            if json {
                print_json(&env);
            } else {
                println!("created {} ({}), {}", env["name"].as_str().unwrap_or(""), text(&env, "id"), text(&env, "status"));
                println!("log in: gpugate ssh {}", env["name"].as_str().unwrap_or(""));
            }
            Ok(())
        }
        Cmd::Start { name, wait } => operate(&name, "start", if wait { Some(json!({"wait": "ready"})) } else { None }),
        Cmd::Stop { name } => operate(&name, "stop", None),
        Cmd::Rm { name } => {
            let (_, api) = client()?;
            let env = api.find(&name)?;
            api.call("DELETE", &format!("/api/v1/environments/{}", text(&env, "id")), None)?;
            println!("deleted {name}");
            Ok(())
        }
        Cmd::Ssh { name, command } => {
            let (cfg, api) = client()?;
            let env = api.find(&name)?;
            let mut ssh = ssh_to(&cfg, &env, &[])?;
            ssh.args(&command);
            Err(Failure::Other(format!("running ssh: {}", ssh.exec())))
        }
        Cmd::Proxy { host, port, tcp, gateway, ca } => {
            // What is not given comes from a stored configuration, if there is one.
            let stored = config::load().ok();
            let ca_file = ca.or_else(|| stored.as_ref().and_then(|c| c.ca_file.clone()));
            let roots = api::ca_certificates(ca_file.as_deref())?;
            let connect_to = gateway.or_else(|| stored.and_then(|c| c.gateway));
            proxy::run(proxy::Target { host, port, connect_to, tcp, roots })
        }
        Cmd::ConfigSsh { dry_run, ssh_config } => config_ssh(dry_run, ssh_config),
        Cmd::PortForward { name, spec } => {
            let (local, remote) = forward_spec(&spec)?;
            let (cfg, api) = client()?;
            let env = api.find(&name)?;
            let forward = format!("{local}:127.0.0.1:{remote}");
            let mut ssh = ssh_to(&cfg, &env, &["-N", "-o", "ExitOnForwardFailure=yes", "-L", &forward])?;
            eprintln!("forwarding {local} to port {remote} of {name}; Ctrl-C ends it");
            Err(Failure::Other(format!("running ssh: {}", ssh.exec())))
        }
        Cmd::Keys { command } => keys(command),
    }
}

fn client() -> Result<(Config, Api), Failure> {
    let cfg = config::load()?;
    let api = Api::new(&cfg)?;
    Ok((cfg, api))
}

fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or("")
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn login(api_url: String, token: Option<String>, gateway: Option<String>, ca: Option<PathBuf>) -> Result<(), Failure> {
    let token = match token {
        Some(t) => t,
        None if !std::io::stdin().is_terminal() => {
            let mut t = String::new();
            std::io::stdin().read_to_string(&mut t).map_err(|e| Failure::Other(format!("reading the token: {e}")))?;
            t
        }
        None => return Err(Failure::Config("no token: pass --token, set GPUGATE_TOKEN, or pipe it in".into())),
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(Failure::Config("the token is empty".into()));
    }
    if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
        return Err(Failure::Config(format!("{api_url:?} is not an http:// or https:// URL")));
    }
    let ca_file = ca.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    let cfg = Config { api: api_url, token, gateway, ca_file };
    // Checked before it is stored: a wrong token or address fails here, not at the next command.
    Api::new(&cfg)?.call("GET", "/api/v1/users/me/ssh-keys", None)?;
    let path = config::save(&cfg)?;
    println!("logged in to {}; saved in {}", cfg.api, path.display());
    Ok(())
}

fn ls(as_json: bool) -> Result<(), Failure> {
    let envs = client()?.1.environments()?;
    if as_json {
        print_json(&Value::Array(envs));
        return Ok(());
    }
    let rows: Vec<[String; 5]> = envs
        .iter()
        .map(|e| {
            let ssh = &e["access_info"]["ssh"];
            let reach = match (ssh["tls"]["port"].as_u64(), ssh["port"].as_u64()) {
                (Some(_), _) => format!("{} (by name)", text(ssh, "host")),
                (None, Some(p)) => format!("{}:{p}", text(ssh, "host")),
                _ => "-".into(),
            };
            [text(e, "name").into(), text(e, "id").into(), text(e, "status").into(), e["gpu_count"].to_string(), reach]
        })
        .collect();
    let header = ["NAME", "ID", "STATUS", "GPUS", "SSH"].map(String::from);
    let widths: Vec<usize> =
        (0..5).map(|c| rows.iter().chain(std::iter::once(&header)).map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

fn operate(name: &str, verb: &str, body: Option<Value>) -> Result<(), Failure> {
    let (_, api) = client()?;
    let env = api.find(name)?;
    let after = api.call("POST", &format!("/api/v1/environments/{}/{verb}", text(&env, "id")), body.as_ref())?;
    println!("{name}: {}", text(&after, "status"));
    Ok(())
}

/// How `ssh` reaches `env`: by name over TLS when it has it, else by its pool port.
fn entry_of(env: &Value) -> Option<HostEntry> {
    let ssh = &env["access_info"]["ssh"];
    let host_name = ssh["host"].as_str()?.to_string();
    let user = ssh["username"].as_str()?.to_string();
    let (port, tcp) = match (ssh["tls"]["port"].as_u64(), ssh["port"].as_u64()) {
        (Some(p), _) => (p, false),
        (None, Some(p)) => (p, true),
        _ => return None,
    };
    let aliases = vec![text(env, "name").to_string(), text(env, "id").to_string()];
    Some(HostEntry { aliases, host_name, user, port: u16::try_from(port).ok()?, tcp })
}

/// The options every ProxyCommand gets from the stored configuration: where the gateway is
/// and which CA signed its certificate (so the command works whatever ssh's environment).
fn proxy_options(cfg: &Config) -> String {
    let mut out = String::new();
    if let Some(g) = &cfg.gateway {
        out.push_str(&format!(" --gateway {g}"));
    }
    if let Some(ca) = &cfg.ca_file {
        out.push_str(&format!(" --ca {}", ssh_config::quoted(ca)));
    }
    out
}

fn exe() -> Result<PathBuf, Failure> {
    std::env::current_exe().map_err(|e| Failure::Other(format!("where this program is: {e}")))
}

/// The deployment's CA lines of `envs`, one each, as gpugate's known_hosts holds them.
fn known_hosts_of(envs: &[Value]) -> String {
    let mut lines: Vec<&str> = envs.iter().filter_map(|e| e["access_info"]["ssh"]["cert_authority"].as_str()).collect();
    lines.sort_unstable();
    lines.dedup();
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// Makes sure gpugate's known_hosts trusts the CA of `env`'s deployment (adds its line).
fn trust(env: &Value) -> Result<PathBuf, Failure> {
    let path = config::known_hosts_path()?;
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if let Some(line) = env["access_info"]["ssh"]["cert_authority"].as_str() {
        if !have.lines().any(|l| l == line) {
            config::write_private(&path, &format!("{have}{line}\n"))?;
        }
    }
    Ok(path)
}

/// `ssh` to `env`, strict, through `gpugate proxy`, with `extra` options before the target.
fn ssh_to(cfg: &Config, env: &Value, extra: &[&str]) -> Result<Command, Failure> {
    let e = entry_of(env).ok_or_else(|| Failure::Other(format!("{} has no SSH access", text(env, "name"))))?;
    let known_hosts = trust(env)?;
    let proxy = format!(
        "{} proxy %h --port %p{}{}",
        ssh_config::quoted(&exe()?),
        if e.tcp { " --tcp" } else { "" },
        proxy_options(cfg)
    );
    let mut cmd = Command::new("ssh");
    cmd.args(["-o", &format!("ProxyCommand={proxy}")])
        .args(["-o", &format!("UserKnownHostsFile={}", known_hosts.display())])
        .args(["-o", "StrictHostKeyChecking=yes", "-p", &e.port.to_string()])
        .args(extra)
        .arg(format!("{}@{}", e.user, e.host_name));
    Ok(cmd)
}

fn forward_spec(spec: &str) -> Result<(String, u16), Failure> {
    let usage = || Failure::Other(format!("{spec:?} is not LOCAL:REMOTE (e.g. 8888:8888 or 127.0.0.1:8888:8888)"));
    let (local, remote) = spec.rsplit_once(':').ok_or_else(usage)?;
    let remote: u16 = remote.parse().ok().filter(|p| *p != 0).ok_or_else(usage)?;
    let port = local.rsplit_once(':').map_or(local, |(_, p)| p);
    port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(usage)?;
    Ok((local.to_string(), remote))
}

fn config_ssh(dry_run: bool, path: Option<PathBuf>) -> Result<(), Failure> {
    let (cfg, api) = client()?;
    let envs = api.environments()?;
    let path = match path {
        Some(p) => p,
        None => config::home()?.join(".ssh").join("config"),
    };
    let known_hosts = config::known_hosts_path()?;
    let entries: Vec<HostEntry> = envs.iter().filter_map(entry_of).collect();
    let block = ssh_config::render(&entries, &exe()?, &proxy_options(&cfg), &known_hosts);
    let old = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Failure::Config(format!("reading {}: {e}", path.display()))),
    };
    let new = ssh_config::merge(&old, &block).map_err(|e| Failure::Config(format!("{}: {e}", path.display())))?;
    let old_kh = std::fs::read_to_string(&known_hosts).unwrap_or_default();
    let new_kh = known_hosts_of(&envs);
    let changes = [(path.as_path(), &old, &new), (known_hosts.as_path(), &old_kh, &new_kh)];
    if dry_run {
        let mut any = false;
        for (p, o, n) in changes {
            let d = ssh_config::diff(o, n);
            if !d.is_empty() {
                any = true;
                println!("--- {}\n+++ {} (after gpugate config-ssh)\n{d}", p.display(), p.display());
            }
        }
        if !any {
            println!("no changes");
        }
        return Ok(());
    }
    let mut wrote = 0;
    for (p, o, n) in changes {
        if o != n {
            config::write_private(p, n)?;
            wrote += 1;
        }
    }
    let names: Vec<&str> = entries.iter().filter_map(|e| e.aliases.first().map(String::as_str)).collect();
    if wrote == 0 {
        println!("{} is up to date ({} workspaces)", path.display(), names.len());
    } else {
        println!("{}: {} workspaces; `ssh {}` logs in", path.display(), names.len(), names.first().copied().unwrap_or("NAME"));
    }
    Ok(())
}

fn keys(cmd: KeysCmd) -> Result<(), Failure> {
    let (_, api) = client()?;
    match cmd {
        KeysCmd::Add { file, name } => {
            let file = match file {
                Some(f) => f,
                None => config::home()?.join(".ssh").join("id_ed25519.pub"),
            };
            let public_key = std::fs::read_to_string(&file).map_err(|e| Failure::Config(format!("{}: {e}", file.display())))?;
            let mut body = json!({"public_key": public_key.trim()});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let key = api.call("POST", "/api/v1/users/me/ssh-keys", Some(&body))?;
            println!("{} {} {}", key["id"], text(&key, "fingerprint"), text(&key, "name"));
        }
        KeysCmd::Ls { json } => {
            let data = api.call("GET", "/api/v1/users/me/ssh-keys", None)?;
            if json {
                print_json(&data);
            } else {
                for k in data["keys"].as_array().into_iter().flatten() {
                    println!("{} {} {}", k["id"], text(k, "fingerprint"), text(k, "name"));
                }
            }
        }
        KeysCmd::Rm { id } => {
            let key = api.call("DELETE", &format!("/api/v1/users/me/ssh-keys/{id}"), None)?;
            println!("removed {} {}", key["id"], text(&key, "fingerprint"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs_need_two_ports() {
        assert_eq!(forward_spec("8888:8888").map_err(|e| e.to_string()), Ok(("8888".into(), 8888)));
        assert_eq!(forward_spec("127.0.0.1:9000:80").map_err(|e| e.to_string()), Ok(("127.0.0.1:9000".into(), 80)));
        for bad in ["8888", "x:80", "80:x", "0:80", "80:0", "70000:80"] {
            assert!(forward_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_workspace_by_name_goes_over_tls_one_by_port_over_tcp() {
        let by_name = json!({"id": "abc", "name": "train", "access_info": {"ssh": {"host": "abc.ssh.x.test", "username": "u", "tls": {"port": 8443}, "port": 20001}}});
        let e = entry_of(&by_name).expect("entry");
        assert_eq!((e.port, e.tcp, e.aliases.clone()), (8443, false, vec!["train".to_string(), "abc".to_string()]));
        let by_port = json!({"id": "abd", "name": "eval", "access_info": {"ssh": {"host": "abd.ssh.x.test", "username": "u", "port": 20002}}});
        assert_eq!(entry_of(&by_port).map(|e| (e.port, e.tcp)), Some((20002, true)));
        assert!(entry_of(&json!({"id": "x", "name": "y", "access_info": {}})).is_none());
    }
}
