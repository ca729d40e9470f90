//! `/api/v1/environments`: create, list, show, access, stop, start, delete.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use gpugate_routes::Service;
use serde::{Deserialize, Serialize};

use super::extract::{Body, Caller, IdPath, OptionalBody, QueryOf};
use crate::activity::{Activity, ServiceActivity};
use crate::config::AccessMode;
use crate::db::envs::{self, EnvRow};
use crate::db::{gateways as gateway_rows, gpus, ports, readiness};
use crate::error::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope, Success};
use crate::idle_clock::{self, IdleView};
use crate::readiness::ServiceReadiness;
use crate::ssh_identity;
use crate::lifecycle::{self, CreateSpec, IdempotencyKey};
use sha2::{Digest, Sha256};
use crate::state::{AppState, State as AppInner};

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/environments", post(create_environment).get(list_environments))
        .route(
            "/api/v1/environments/{id}",
            get(get_environment).patch(patch_environment).delete(delete_environment),
        )
        .route("/api/v1/environments/{id}/access", get(get_access))
        .route("/api/v1/environments/{id}/stop", post(stop_environment))
        .route("/api/v1/environments/{id}/start", post(start_environment))
        .route("/api/v1/environments/{id}/sessions/close", post(close_sessions))
}

/// Body of `POST /api/v1/environments`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "train", "gpus": 1, "services": ["ssh", "jupyter"]}))]
pub struct CreateEnvironment {
    /// Display name, 1 to 64 characters (no control, bidirectional or zero-width characters).
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    /// Image (must be present on the Docker host and on the deployment's allow-list);
    /// default from configuration.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 255)]
    pub image: Option<String>,
    /// Number of GPUs (default 0; at most what the host has).
    #[serde(default)]
    pub gpus: Option<u32>,
    /// Part of the GPU model name the GPUs must have, e.g. `"A100"` (case-insensitive).
    /// Absent from the idempotency digest when not given, like before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 128)]
    pub gpu_model: Option<String>,
    /// Services, each at most once; default from configuration.
    #[serde(default)]
    #[schema(value_type = Option<Vec<ServiceName>>, min_items = 1, max_items = 4)]
    pub services: Option<Vec<String>>,
    /// OpenSSH public keys to authorise (single-line, at most 32).
    #[serde(default)]
    #[schema(max_items = 32)]
    pub ssh_public_keys: Option<Vec<String>>,
    /// Memory limit in MiB, at least 32 (default and maximum: `docker.limits`).
    #[serde(default)]
    #[schema(minimum = 32)]
    pub memory_mb: Option<u64>,
    /// CPU limit in cores, at least 0.01 (default and maximum: `docker.limits`).
    #[serde(default)]
    #[schema(minimum = 0.01)]
    pub cpus: Option<f64>,
    /// Process (pids) limit, at least 16 (default and maximum: `docker.limits`).
    #[serde(default)]
    #[schema(minimum = 16)]
    pub pids: Option<u32>,
    /// Seconds without activity after which the workspace is stopped (0: never), at most 30
    /// days; default and maximum from configuration (`idle`).
    #[serde(default)]
    #[schema(maximum = 2592000)]
    pub idle_stop_after_s: Option<u64>,
    /// How each service is reached: `ports` (a pool port), `hostname` (its name on the
    /// gateway's TLS port, no pool port) or `both`; services left out take the deployment's
    /// default (`[names]`). Names need the gateway's TLS port configured; RDP is by port only.
    /// Absent from the idempotency digest when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BTreeMap<String, AccessMode>>)]
    pub access: Option<BTreeMap<String, AccessMode>>,
    /// When to answer: `routes` (default) or `ready` (also `?wait=`). Not part of what the
    /// request asks for, so not of its idempotency digest: a retry may wait differently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Wait>,
}

/// When a create or start answers.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Wait {
    /// Once the routes are live in the route table (or the route wait passed): the services
    /// inside may still be starting; `ready` in the answer says.
    #[default]
    Routes,
    /// Once every service answered like itself or its readiness deadline passed; the answer
    /// shows each service's readiness either way.
    Ready,
}

// By hand, not derived: a derived enum makes serde_json call a number or object where the name
// belongs a syntax error (400, "expected value"); it is a well-formed body with a bad value (422).
impl<'de> Deserialize<'de> for Wait {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, Unexpected};
        let name = String::deserialize(d)?;
        match name.as_str() {
            "routes" => Ok(Wait::Routes),
            "ready" => Ok(Wait::Ready),
            other => Err(D::Error::invalid_value(Unexpected::Str(other), &"\"routes\" or \"ready\"")),
        }
    }
}

/// Query of create and start: `?wait=ready`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// When to answer: `routes` (default) or `ready` (see the environment's `readiness`).
    #[serde(default)]
    pub wait: Option<Wait>,
}

/// Optional body of `POST /api/v1/environments/{id}/start`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartEnvironment {
    /// When to answer: `routes` (default) or `ready`.
    #[serde(default)]
    pub wait: Option<Wait>,
}

/// The one `wait` of a request that may name it in its query and its body.
fn wait_of(query: Option<Wait>, body: Option<Wait>) -> Result<Wait, ApiError> {
    match (query, body) {
        (Some(q), Some(b)) if q != b => {
            Err(ApiError::Validation("wait is given in the query and the body with different values".into()))
        }
        (q, b) => Ok(q.or(b).unwrap_or_default()),
    }
}

/// A service a workspace can offer (each needs a port pool in the deployment).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceName {
    /// OpenSSH.
    Ssh,
    /// JupyterLab.
    Jupyter,
    /// code-server.
    Code,
    /// Remote desktop.
    Rdp,
}

/// Body of `PATCH /api/v1/environments/{id}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchEnvironment {
    /// New idle limit in seconds (0: never, where the deployment allows it), at most 30 days
    /// and the deployment's maximum.
    #[schema(maximum = 2592000)]
    pub idle_stop_after_s: u64,
}

/// What the API reports as an environment's `status`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[allow(dead_code, reason = "named by the OpenAPI document only; a test holds it equal to db::envs::status")]
#[serde(rename_all = "lowercase")]
pub enum EnvironmentStatus {
    /// Ports allocated, container being made.
    Creating,
    /// Container running, routes live.
    Running,
    /// Being stopped: routes disabled, sessions being closed, container stopping; still holds
    /// its GPUs and counts as running for quotas.
    Stopping,
    /// Container stopped, routes disabled; ports and home volume kept, GPUs given back.
    Stopped,
    /// Being started (from `stopped` or `failed`): a new container over the same home; counts
    /// as running for quotas.
    Starting,
    /// Routes and container being removed.
    Deleting,
    /// The container vanished or its host was lost; routes removed, ports and home volume
    /// kept. A start recovers it (a new container over the same home).
    Failed,
    /// Gone; ports released.
    Deleted,
    /// Its host stopped answering: routes kept for a grace period (`fleet.fail_after_s`),
    /// then `failed`; back to `running` if the host answers again first.
    Unreachable,
}

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
    /// `creating`, `running`, `stopped`, `deleting`, `failed`, `deleted` or `unreachable`.
    #[schema(value_type = EnvironmentStatus)]
    pub status: String,
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
    let unknown = env.status == envs::status::RUNNING && crate::idle::activity_unknown(st).await?;
    view_knowing(st, env, routes_live, unknown).await
}

/// [`view`] with whether some gateway's activity is unknown already read (a fleet-wide fact:
/// a list reads it once for all its environments).
async fn view_knowing(
    st: &AppInner,
    env: EnvRow,
    routes_live: Option<bool>,
    activity_unknown: bool,
) -> Result<EnvironmentView, ApiError> {
    let (held, activity) = Activity::of_env(&st.db, &env).await?;
    let access_info = access_info(st, &env, &held);
    let rows = if env.status == envs::status::RUNNING { readiness::of_env(st.db.pool(), &env.id).await? } else { vec![] };
    let (ready, readiness) = crate::readiness::view(&env.status, &env.services, &rows);
    let gpu_devices = gpus::of_env(st.db.pool(), &env.id)
        .await?
        .into_iter()
        .map(|g| GpuDeviceView { index: g.index, uuid: g.uuid, name: g.name, memory_mib: g.memory_mib })
        .collect();
    let gateways = match routes_live {
        Some(true) if env.status == envs::status::RUNNING => Some(gateways_applied(st, env.route_generation).await?),
        _ => None,
    };
    let (idle_seconds, idle) = if env.status == envs::status::RUNNING {
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

async fn find(st: &AppInner, caller: &Caller, id: &str) -> Result<EnvRow, ApiError> {
    if id.parse::<gpugate_routes::EnvId>().is_err() {
        return Err(ApiError::env_not_found(id));
    }
    envs::get(st.db.pool(), id, Some(caller.0.id)).await?.ok_or_else(|| ApiError::env_not_found(id))
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap, req: &CreateEnvironment) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::Validation("Idempotency-Key must be 1 to 255 visible ASCII characters".into())
        })?;
    let body = serde_json::to_vec(req).map_err(|e| ApiError::internal("request digest", e))?;
    Ok(Some(IdempotencyKey { key: key.to_string(), request: Sha256::digest(&body).to_vec() }))
}

#[utoipa::path(
    post,
    path = "/api/v1/environments",
    tag = "environments",
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = "^[!-~]{1,255}$",
        description = "1 to 255 visible ASCII characters; a retry with the same key and body answers with the environment the first request made"),
        WaitQuery,
    ),
    request_body = CreateEnvironment,
    responses(
        (status = 201, description = "Created (or replayed: header `Idempotent-Replayed: true`); the environment with its ports and access information.",
            body = Envelope<EnvironmentView>,
            headers(("Idempotent-Replayed" = String, description = "`true` when the answer replays an earlier create with the same `Idempotency-Key`"))),
        (status = 400, description = "Malformed JSON or wrong content type (code 1001).", body = ErrorEnvelope),
        (status = 409, description = "More GPUs than are free (code 1008, `data` says how many), a quota (code 1011), or an `Idempotency-Key` whose environment was deleted (code 1006).", body = ErrorEnvelope),
        (status = 413, description = "Request body over 2 MiB (code 1013).", body = ErrorEnvelope),
        (status = 422, description = "A field missing, unknown or invalid, or an `Idempotency-Key` reused with another body (code 1002); the image not on the Docker host (code 1007).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/environments` → 201 with the environment and its access information. With
/// an `Idempotency-Key` already used by this caller: the environment that key created (same
/// id and ports), with `Idempotent-Replayed: true`. The create runs to completion even if the
/// client goes away.
async fn create_environment(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    QueryOf(query): QueryOf<WaitQuery>,
    Body(mut req): Body<CreateEnvironment>,
) -> Result<Response, ApiError> {
    // Taken out before the idempotency digest is made.
    let wait = wait_of(query.wait, req.wait.take())?;
    let idempotency = idempotency_key(&headers, &req)?;
    let spec = CreateSpec {
        id: crate::ids::env_id(),
        idempotency,
        name: req.name,
        image: req.image,
        gpus: req.gpus.unwrap_or(0),
        gpu_model: req.gpu_model,
        services: req.services,
        ssh_public_keys: req.ssh_public_keys.unwrap_or_default(),
        memory_mb: req.memory_mb,
        cpus: req.cpus,
        pids: req.pids,
        idle_stop_after_s: req.idle_stop_after_s,
        access: req.access,
    };
    let (st2, user, id) = (st.clone(), caller.0.clone(), spec.id.clone());
    let out = st.ops.run(&id, async move { lifecycle::create(&st2, &user, spec).await }).await?;
    let replayed = out.replayed;
    let env = settle_wait(&st, out.env, wait).await?;
    let body = Success(StatusCode::CREATED, view(&st, env, Some(out.routes_live)).await?);
    let mut resp = body.into_response();
    if replayed {
        resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[utoipa::path(
    get,
    path = "/api/v1/environments",
    tag = "environments",
    responses((status = 200, description = "The caller's environments (deleted ones excluded).", body = Envelope<Vec<EnvironmentView>>)),
)]
/// `GET /api/v1/environments` → the caller's environments.
async fn list_environments(State(st): State<AppState>, caller: Caller) -> ApiResult<Vec<EnvironmentView>> {
    let listed = envs::list(&st.db, caller.0.id).await?;
    let running = listed.iter().any(|e| e.status == envs::status::RUNNING);
    let unknown = running && crate::idle::activity_unknown(&st).await?;
    let mut out = vec![];
    for env in listed {
        out.push(view_knowing(&st, env, None, unknown).await?);
    }
    Ok(ok(out))
}

#[utoipa::path(
    get,
    path = "/api/v1/environments/{id}",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "The environment, with `activity` and `idle_seconds`.", body = Envelope<EnvironmentView>),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
    ),
)]
/// `GET /api/v1/environments/{id}`.
async fn get_environment(State(st): State<AppState>, caller: Caller, IdPath(id): IdPath) -> ApiResult<EnvironmentView> {
    let env = find(&st, &caller, &id).await?;
    Ok(ok(view(&st, env, None).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/environments/{id}/access",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "How to reach each of the environment's services.", body = Envelope<Access>),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
    ),
)]
/// `GET /api/v1/environments/{id}/access` → the seed's access shape.
async fn get_access(State(st): State<AppState>, caller: Caller, IdPath(id): IdPath) -> ApiResult<Access> {
    let env = find(&st, &caller, &id).await?;
    // Every endpoint, name-only services too (as the environment's own view reads them).
    let held = ports::env_endpoints(st.db.pool(), &env.id, &env.services).await?;
    Ok(ok(Access { access_info: access_info(&st, &env, &held), environment_id: env.id }))
}

#[utoipa::path(
    post,
    path = "/api/v1/environments/{id}/stop",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "Stopped: routes disabled, container stopped, GPUs given back; ports and home volume kept.", body = Envelope<EnvironmentView>),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
        (status = 409, description = "Not running, or another operation on it is in progress (code 1006).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/environments/{id}/stop`.
async fn stop_environment(State(st): State<AppState>, caller: Caller, IdPath(id): IdPath) -> ApiResult<EnvironmentView> {
    // Ownership first: another user's id is a 404, never a "busy" that tells it exists (or
    // that blocks its owner's own operation while the refusal runs).
    find(&st, &caller, &id).await?;
    let (st2, user, id2) = (st.clone(), caller.0.clone(), id.clone());
    let out = st.ops.run(&id, async move { lifecycle::stop(&st2, &user, &id2).await }).await?;
    Ok(ok(view(&st, out.env, None).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/environments/{id}/start",
    tag = "environments",
    params(
        ("id" = String, Path, description = "The environment's id (another user's is unknown: 404)."),
        WaitQuery,
    ),
    request_body(content = Option<StartEnvironment>, description = "Optional: `{\"wait\": \"ready\"}`, like `?wait=ready`."),
    responses(
        (status = 200, description = "Running again: GPUs allocated, a new container on the same home volume, same ports.", body = Envelope<EnvironmentView>),
        (status = 400, description = "A body that is not JSON, or has the wrong content type (code 1001).", body = ErrorEnvelope),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
        (status = 413, description = "Request body over 2 MiB (code 1013).", body = ErrorEnvelope),
        (status = 422, description = "An unknown `wait`, or different values in query and body (code 1002).", body = ErrorEnvelope),
        (status = 409, description = "Not stopped or busy (code 1006), too few free GPUs (code 1008, `data` says how many), or a quota (code 1011).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/environments/{id}/start` (`?wait=ready`, or an optional body
/// `{"wait": "ready"}`).
async fn start_environment(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    QueryOf(query): QueryOf<WaitQuery>,
    OptionalBody(body): OptionalBody<StartEnvironment>,
) -> ApiResult<EnvironmentView> {
    let wait = wait_of(query.wait, body.and_then(|b| b.wait))?;
    // Ownership first: another user's id is a 404, never a "busy" that tells it exists (or
    // that blocks its owner's own operation while the refusal runs).
    find(&st, &caller, &id).await?;
    let (st2, user, id2) = (st.clone(), caller.0.clone(), id.clone());
    let out = st.ops.run(&id, async move { lifecycle::start(&st2, &user, &id2).await }).await?;
    let env = settle_wait(&st, out.env, wait).await?;
    Ok(ok(view(&st, env, Some(out.routes_live)).await?))
}

/// For `wait: ready`: waits until every service of a running `env` is ready or past its
/// deadline, and returns the environment as it is then; otherwise `env` as it is.
async fn settle_wait(st: &AppInner, env: EnvRow, wait: Wait) -> Result<EnvRow, ApiError> {
    if wait != Wait::Ready || env.status != envs::status::RUNNING {
        return Ok(env);
    }
    let limit = st.readiness.wait_limit(&env.services);
    st.readiness.wait_decided(&env.id, limit).await?;
    Ok(envs::get(st.db.pool(), &env.id, None).await?.unwrap_or(env))
}

/// `data` of a delete.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Deleted {
    /// The environment's id.
    pub id: String,
    /// `deleted`.
    #[schema(value_type = EnvironmentStatus)]
    pub status: String,
}

#[utoipa::path(
    delete,
    path = "/api/v1/environments/{id}",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "Deleted: routes, container and home volume removed, ports in quarantine.", body = Envelope<Deleted>),
        (status = 404, description = "Unknown environment, or deleted already (code 1005).", body = ErrorEnvelope),
        (status = 409, description = "Another operation on it is in progress (code 1006).", body = ErrorEnvelope),
    ),
)]
/// `DELETE /api/v1/environments/{id}` → the environment, status `deleted`.
async fn delete_environment(State(st): State<AppState>, caller: Caller, IdPath(id): IdPath) -> ApiResult<Deleted> {
    // Ownership first: another user's id is a 404, never a "busy" that tells it exists (or
    // that blocks its owner's own operation while the refusal runs).
    find(&st, &caller, &id).await?;
    let (st2, user, id2) = (st.clone(), caller.0.clone(), id.clone());
    let env = st.ops.run(&id, async move { lifecycle::delete(&st2, &user, &id2).await }).await?;
    Ok(ok(Deleted { id: env.id, status: env.status }))
}

#[utoipa::path(
    patch,
    path = "/api/v1/environments/{id}",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    request_body = PatchEnvironment,
    responses(
        (status = 200, description = "The environment with its new idle limit.", body = Envelope<EnvironmentView>),
        (status = 400, description = "Malformed JSON or wrong content type (code 1001).", body = ErrorEnvelope),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
        (status = 413, description = "Request body over 2 MiB (code 1013).", body = ErrorEnvelope),
        (status = 422, description = "A field missing, unknown or invalid; a limit over the deployment's maximum (code 1002).", body = ErrorEnvelope),
    ),
)]
/// `PATCH /api/v1/environments/{id}`: changes the idle limit.
async fn patch_environment(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    Body(req): Body<PatchEnvironment>,
) -> ApiResult<EnvironmentView> {
    let env = lifecycle::sessions::set_idle_limit(&st, &caller.0, &id, req.idle_stop_after_s).await?;
    Ok(ok(view(&st, env, None).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/environments/{id}/sessions/close",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "The close is recorded once for the fleet; `gateways` says how many fresh gateways applied it to their table, `applied` whether all did.", body = Envelope<lifecycle::sessions::SessionsClosed>),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
        (status = 409, description = "Not running (code 1006).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/environments/{id}/sessions/close` (owner or admin): closes every session
/// open now through the gateway; the environment keeps running and new sessions work.
async fn close_sessions(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
) -> ApiResult<lifecycle::sessions::SessionsClosed> {
    Ok(ok(lifecycle::sessions::close(&st, &caller.0, &id).await?))
}
