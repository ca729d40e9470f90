//! What `/api/v1/environments` answers: an environment's view, its access information (by
//! port and by name), and the parts read beside its row (activity, idle clock, readiness,
//! which gateways have its routes).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use gpugate_routes::Service;
use serde::Serialize;

use crate::activity::{Activity, ServiceActivity};
use crate::config::AccessMode;
use crate::db::envs::{EnvRow, Status};
use crate::db::{gateways as gateway_rows, gpus, ports, readiness};
use crate::error::ApiError;
use crate::idle_clock::{self, IdleView};
use crate::lifecycle;
use crate::readiness::ServiceReadiness;
use crate::ssh_identity;
use crate::state::State as AppInner;

/// SSH access: by pool port (`port`, `command`) and/or by name through TLS (`tls`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SshAccess {
    pub host: String,
    /// The pool port (absent when SSH is reached by name only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub username: String,
    pub password: String,
    /// `ssh -p <port> user@host` (with a pool port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// SSH by name, inside TLS to the gateway's TLS port (when reached by name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<SshOverTls>,
    /// One known_hosts line that trusts every workspace of this deployment: its SSH host CA,
    /// which certifies each workspace's host key for its SSH host name. With it in
    /// known_hosts, `StrictHostKeyChecking=yes` logs in without a prompt from the first time,
    /// after every start, and whichever workspace a pool port belongs to.
    pub cert_authority: String,
    /// The workspace's own host key (`ssh-ed25519 AAAA...`), the same for its whole life;
    /// absent until its first container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// known_hosts lines for this workspace alone, for clients without certificate support:
    /// its host name, and `[host]:port` with a pool port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known_hosts: Option<String>,
}

/// SSH inside TLS: the gateway routes by the TLS server name, OpenSSL's `s_client` (stock on
/// Debian and macOS) carries the SSH connection.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SshOverTls {
    /// The gateway's TLS port.
    pub port: u16,
    /// One line to log in.
    pub command: String,
    /// A `~/.ssh/config` block for every workspace of this deployment (then `ssh <host>`).
    pub ssh_config: String,
}

/// Jupyter access. `url` is the name URL (`https://<id>.jupyter.<domain>/`) when Jupyter is
/// reached by name, else the pool port's (plain HTTP: the gateway does not terminate TLS on
/// pool ports); `port_url` is the latter when both exist.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JupyterAccess {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_url: Option<String>,
    pub token: String,
}

/// code-server access (`url` and `port_url` as for Jupyter).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CodeAccess {
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_url: Option<String>,
    pub password: String,
}

/// RDP access.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RdpAccess {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
}

/// Every endpoint of an environment (only the services it has).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccessInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshAccess>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jupyter: Option<JupyterAccess>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code_server: Option<CodeAccess>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rdp: Option<RdpAccess>,
}

/// `data` of the access endpoint, the seed's shape (the example is a real answer).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "environment_id": "l05fh80rhpiwa1uf",
    "access_info": {
        "ssh": {
            "host": "l05fh80rhpiwa1uf.ssh.x-gpu.com",
            "port": 24000,
            "username": "remotegpu",
            "password": "FnGdnrCFdr7H0qXEhSTeMQ2S",
            "command": "ssh -p 24000 remotegpu@l05fh80rhpiwa1uf.ssh.x-gpu.com",
            "cert_authority": "@cert-authority *.ssh.x-gpu.com,[*.ssh.x-gpu.com]:* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMBaWaU+MyOwM2QD4ez8j8mzqDT0emTzgXF3jVW21gcL",
            "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJmxbxLo6KKlKNhRAjAH00KLDtrKI95Ip9Tps0H8gcg2",
            "known_hosts": "l05fh80rhpiwa1uf.ssh.x-gpu.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJmxbxLo6KKlKNhRAjAH00KLDtrKI95Ip9Tps0H8gcg2\n[l05fh80rhpiwa1uf.ssh.x-gpu.com]:24000 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJmxbxLo6KKlKNhRAjAH00KLDtrKI95Ip9Tps0H8gcg2\n"
        },
        "jupyter": {"url": "http://l05fh80rhpiwa1uf.jupyter.x-gpu.com:24200/", "token": "h1z5NDL0LT5NymVnSD1q05it"},
        "code_server": {"url": "http://l05fh80rhpiwa1uf.code.x-gpu.com:24400/", "password": "FnGdnrCFdr7H0qXEhSTeMQ2S"}
    }
}))]
pub struct Access {
    pub environment_id: String,
    pub access_info: AccessInfo,
}

/// A GPU an environment holds.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GpuDeviceView {
    pub index: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Model name (empty for a GPU listed by index in configuration).
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<i64>,
}

/// An environment as the API shows it (the example is taken from a real answer to a create).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "id": "l05fh80rhpiwa1uf",
    "name": "train",
    "image": "gpugate-test/tiny:1",
    "status": "running",
    "services": ["ssh", "jupyter", "code"],
    "ports": {"code": 24400, "jupyter": 24200, "ssh": 24000},
    "access": {"code": "ports", "jupyter": "ports", "ssh": "ports"},
    "gpus": [0],
    "gpu_count": 1,
    "gpu_devices": [{"index": 0, "uuid": "GPU-6f2b9a41-0c1d-4e2f-9a3b-5c6d7e8f9012", "name": "NVIDIA A100-SXM4-80GB", "memory_mib": 81920}],
    "activity": {
        "ssh": {"port": 24000, "connections_active": 0, "connections_total": 0, "connections_revoked": 0, "bytes_in": 0, "bytes_out": 0}
    },
    "idle_seconds": 0,
    "idle_stop_after_s": 3600,
    "idle": {
        "stop_at": null,
        "waiting_because": "gpu_busy",
        "held_until": null,
        "warned_at": null,
        "gpu_utilization": [{"gpu": "GPU-6f2b9a41-0c1d-4e2f-9a3b-5c6d7e8f9012", "percent": 87, "sampled_at": "2026-11-29T18:00:15.210334Z", "fresh": true, "busy": true}]
    },
    "routes_live": true,
    "ready": true,
    "readiness": {
        "ssh": {"ready": true, "ready_at": "2026-11-29T17:59:48.102311Z"},
        "jupyter": {"ready": true, "ready_at": "2026-11-29T18:00:01.877012Z"},
        "code": {"ready": true, "ready_at": "2026-11-29T17:59:49.530040Z"}
    },
    "created_at": "2026-11-29T17:59:46.758936Z",
    "updated_at": "2026-11-29T17:59:47.347777Z",
    "access_info": {
        "ssh": {
            "host": "l05fh80rhpiwa1uf.ssh.x-gpu.com",
            "port": 24000,
            "username": "remotegpu",
            "password": "FnGdnrCFdr7H0qXEhSTeMQ2S",
            "command": "ssh -p 24000 remotegpu@l05fh80rhpiwa1uf.ssh.x-gpu.com",
            "cert_authority": "@cert-authority *.ssh.x-gpu.com,[*.ssh.x-gpu.com]:* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMBaWaU+MyOwM2QD4ez8j8mzqDT0emTzgXF3jVW21gcL",
            "host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJmxbxLo6KKlKNhRAjAH00KLDtrKI95Ip9Tps0H8gcg2",
            "known_hosts": "l05fh80rhpiwa1uf.ssh.x-gpu.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJmxbxLo6KKlKNhRAjAH00KLDtrKI95Ip9Tps0H8gcg2\n[l05fh80rhpiwa1uf.ssh.x-gpu.com]:24000 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJmxbxLo6KKlKNhRAjAH00KLDtrKI95Ip9Tps0H8gcg2\n"
        },
        "jupyter": {"url": "http://l05fh80rhpiwa1uf.jupyter.x-gpu.com:24200/", "token": "h1z5NDL0LT5NymVnSD1q05it"},
        "code_server": {"url": "http://l05fh80rhpiwa1uf.code.x-gpu.com:24400/", "password": "FnGdnrCFdr7H0qXEhSTeMQ2S"}
    }
}))]
pub struct EnvironmentView {
    pub id: String,
    pub name: String,
    pub image: String,
    pub status: Status,
    /// Why it is in that status, when there is something to say (a failure, an idle stop).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub services: Vec<String>,
    /// The GPU host it lives on (its container and home volume are there).
    pub host: String,
    /// Public pool port per service (services reached by name only have none).
    pub ports: BTreeMap<String, u16>,
    /// How each service is reached: `ports`, `hostname` or `both`.
    #[schema(value_type = BTreeMap<String, AccessMode>)]
    pub access: BTreeMap<String, AccessMode>,
    /// GPUs held now (none while stopped).
    pub gpus: Vec<i32>,
    /// GPUs the environment asked for; each start allocates this many.
    pub gpu_count: i32,
    /// The GPU model it asked for (each start takes that model again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// The GPUs held now: index, UUID (when discovered), model name and memory.
    pub gpu_devices: Vec<GpuDeviceView>,
    /// Per service: sessions and bytes through the gateways since the last start, summed over
    /// every fresh gateway (live: nginx flushes open sessions every `gpugate_flush_interval`,
    /// and each gateway reports every `gateway_activity_report_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity: Option<BTreeMap<String, ServiceActivity>>,
    /// Seconds the environment has been idle by the deployment's idle policy (running only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_seconds: Option<u64>,
    /// Seconds of idleness after which it is stopped (0: never).
    pub idle_stop_after_s: i64,
    /// Running only: when the idle stop comes and why not yet (open sessions, busy GPUs, a
    /// hold), with its GPUs' last utilisation samples.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleView>,
    /// Whether the routes were seen live in the route table (create/start responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes_live: Option<bool>,
    /// Create/start responses: how many registered gateways had applied its routes when the
    /// answer was made, of how many are registered and fresh (`GET /api/v1/admin/gateways`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateways: Option<GatewaysApplied>,
    /// Whether every service answers like itself at its address since the last start (a
    /// login works); false while any is starting or gave up, and whenever not running.
    pub ready: bool,
    /// Per service: `ready`, `ready_at`, and `not_ready_reason` while it is not.
    pub readiness: BTreeMap<String, ServiceReadiness>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub access_info: AccessInfo,
}

fn host(st: &AppInner, id: &str, service: Service) -> String {
    format!("{id}.{}.{}", service.as_str(), st.cfg.domain)
}

/// The URLs of a web service: (preferred, the port URL when there is also a name URL).
fn web_urls(st: &AppInner, h: &str, port: u16, by_name: bool) -> (String, Option<String>) {
    let port_url = (port != 0).then(|| format!("http://{h}:{port}/"));
    match (by_name, st.cfg.names.tls_port) {
        (true, Some(tls)) => {
            let name_url = if tls == 443 { format!("https://{h}/") } else { format!("https://{h}:{tls}/") };
            (name_url, port_url)
        }
        _ => (port_url.unwrap_or_default(), None),
    }
}

fn access_info(st: &AppInner, env: &EnvRow, held: &[(u16, Service)]) -> AccessInfo {
    let mut info = AccessInfo { ssh: None, jupyter: None, code_server: None, rdp: None };
    let names = lifecycle::name_services(env);
    for &(port, service) in held {
        let h = host(st, &env.id, service);
        let by_name = names.contains(&service);
        match service {
            Service::Ssh => {
                let tls = st.cfg.names.tls_port.filter(|_| by_name).map(|tls| {
                    let proxy = format!("openssl s_client -quiet -verify_return_error -servername %h -connect %h:{tls}");
                    SshOverTls {
                        port: tls,
                        command: format!("ssh -o ProxyCommand='{proxy}' {}@{h}", env.username),
                        ssh_config: format!(
                            "Host *.ssh.{domain}\n    User {user}\n    ProxyCommand {proxy}\n",
                            domain = st.cfg.domain,
                            user = env.username
                        ),
                    }
                });
                let host_key = env.ssh_host_key.as_deref().and_then(ssh_identity::public_of);
                let known_hosts = host_key.as_ref().map(|key| {
                    let mut lines = format!("{h} {key}\n");
                    if port != 0 {
                        lines.push_str(&format!("[{h}]:{port} {key}\n"));
                    }
                    lines
                });
                info.ssh = Some(SshAccess {
                    command: (port != 0).then(|| format!("ssh -p {port} {}@{h}", env.username)),
                    port: (port != 0).then_some(port),
                    host: h,
                    username: env.username.clone(),
                    password: env.password.clone(),
                    tls,
                    cert_authority: st.host_ca.known_hosts_line(&st.cfg.domain),
                    host_key,
                    known_hosts,
                })
            }
            Service::Jupyter => {
                let (url, port_url) = web_urls(st, &h, port, by_name);
                info.jupyter = Some(JupyterAccess { url, port_url, token: env.jupyter_token.clone() })
            }
            Service::Code => {
                let (url, port_url) = web_urls(st, &h, port, by_name);
                info.code_server = Some(CodeAccess { url, port_url, password: env.password.clone() })
            }
            Service::Rdp if port != 0 => {
                info.rdp = Some(RdpAccess { host: h, port, username: env.username.clone(), password: env.password.clone() })
            }
            Service::Rdp | Service::Other => {}
        }
    }
    info
}

/// `gateways` of a create or start answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GatewaysApplied {
    /// Fresh gateways whose applied generation reached the environment's routes.
    pub applied: i64,
    /// Fresh gateways registered.
    pub registered: i64,
}

/// After a create or start: waits briefly (up to 500 ms, or `route_wait_ms` if shorter) for
/// every registered gateway to report the environment's generation, then counts them. A
/// gateway applies a change within milliseconds; its registry row follows a moment later.
/// How to reach each of `env`'s endpoints: every one, name-only services too (as the
/// environment's own view reads them).
pub(super) async fn access(st: &AppInner, env: EnvRow) -> Result<Access, ApiError> {
    let held = ports::env_endpoints(st.db.pool(), &env.id, &env.services).await?;
    Ok(Access { access_info: access_info(st, &env, &held), environment_id: env.id })
}

async fn gateways_applied(st: &AppInner, generation: i64) -> Result<GatewaysApplied, ApiError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(st.cfg.route_wait_ms.min(500));
    loop {
        let registered = gateway_rows::count_fresh(&st.db).await?;
        let applied = gateway_rows::count_applied(&st.db, generation).await?;
        if applied >= registered || std::time::Instant::now() >= deadline {
            return Ok(GatewaysApplied { applied, registered });
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The idle clock of a running environment: its idle seconds (0 while something keeps it
/// awake) and its `idle` object. `unknown`: some gateway's activity is unknown.
async fn idle_view(st: &AppInner, env: &EnvRow, seen: &Activity, unknown: bool) -> Result<(u64, IdleView), ApiError> {
    let (clock, gpu_utilization) = crate::idle::clock_of(st, env, seen, unknown).await?;
    // Without a limit nothing stops it, and nothing needs to keep it awake.
    let limited = env.idle_stop_after_s > 0;
    let view = IdleView {
        stop_at: clock.stop_at_ms.filter(|_| limited).and_then(idle_clock::at),
        waiting_because: clock.waiting.filter(|_| limited),
        held_until: env.hold_until.filter(|t| *t > Utc::now()),
        warned_at: clock.warned_ms.filter(|_| limited).and_then(idle_clock::at),
        gpu_utilization,
    };
    Ok((clock.idle_ms / 1000, view))
}

pub(super) async fn view(st: &AppInner, env: EnvRow, routes_live: Option<bool>) -> Result<EnvironmentView, ApiError> {
    let unknown = env.status == Status::Running && crate::idle::activity_unknown(st).await?;
    view_knowing(st, env, routes_live, unknown).await
}

/// [`view`] with whether some gateway's activity is unknown already read (a fleet-wide fact:
/// a list reads it once for all its environments).
pub(super) async fn view_knowing(
    st: &AppInner,
    env: EnvRow,
    routes_live: Option<bool>,
    activity_unknown: bool,
) -> Result<EnvironmentView, ApiError> {
    let (held, activity) = Activity::of_env(&st.db, &env).await?;
    let access_info = access_info(st, &env, &held);
    let rows = if env.status == Status::Running { readiness::of_env(st.db.pool(), &env.id).await? } else { vec![] };
    let (ready, readiness) = crate::readiness::view(env.status, &env.services, &rows);
    let gpu_devices = gpus::of_env(st.db.pool(), &env.id)
        .await?
        .into_iter()
        .map(|g| GpuDeviceView { index: g.index, uuid: g.uuid, name: g.name, memory_mib: g.memory_mib })
        .collect();
    let gateways = match routes_live {
        Some(true) if env.status == Status::Running => Some(gateways_applied(st, env.route_generation).await?),
        _ => None,
    };
    let (idle_seconds, idle) = if env.status == Status::Running {
        let (secs, idle) = idle_view(st, &env, &activity, activity_unknown).await?;
        (Some(secs), Some(idle))
    } else {
        (None, None)
    };
    Ok(EnvironmentView {
        activity: Some(activity.services),
        idle_seconds,
        idle,
        idle_stop_after_s: env.idle_stop_after_s,
        ports: held.iter().filter(|(p, _)| *p != 0).map(|(p, s)| (s.as_str().to_string(), *p)).collect(),
        access: held
            .iter()
            .map(|(p, s)| {
                let by_name = env.name_services.iter().any(|n| n == s.as_str());
                let a = match (*p != 0, by_name) {
                    (true, true) => AccessMode::Both,
                    (false, true) => AccessMode::Hostname,
                    _ => AccessMode::Ports,
                };
                (s.as_str().to_string(), a)
            })
            .collect(),
        access_info,
        id: env.id,
        name: env.name,
        image: env.image,
        status: env.status,
        status_reason: env.status_reason,
        services: env.services,
        host: env.host,
        gpus: env.gpus,
        gpu_count: env.gpu_count,
        gpu_model: env.gpu_model,
        gpu_devices,
        gateways,
        routes_live,
        ready,
        readiness,
        created_at: env.created_at,
        updated_at: env.updated_at,
    })
}

/// `data` of a delete.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Deleted {
    /// The environment's id.
    pub id: String,
    /// `deleted`.
    pub status: Status,
}
