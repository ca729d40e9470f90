//! `/api/v1/admin/hosts` (admin): the fleet's GPU hosts — list, add, drain, undrain, remove.
//! The same operations as `gpugate-api host ...`, for operators who drive the fleet over HTTP.

use std::net::IpAddr;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use super::extract::{Admin, Body};
use crate::db::hosts::{self, HostRow, NewHost, Removed};
use crate::error::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope, Success};
use crate::state::AppState;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/admin/hosts", get(list_hosts).post(add_host))
        .route("/api/v1/admin/hosts/{name}", delete(remove_host))
        .route("/api/v1/admin/hosts/{name}/drain", post(drain_host))
        .route("/api/v1/admin/hosts/{name}/undrain", post(undrain_host))
}

/// `data` of `GET /api/v1/admin/hosts`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HostList {
    /// How creates choose among hosts: `pack` or `spread` (`fleet.placement`).
    pub placement: &'static str,
    /// This API's own host (`fleet.host_name`).
    pub local_host: String,
    /// Every host, by name.
    pub hosts: Vec<HostRow>,
}

/// Body of `POST /api/v1/admin/hosts`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddHost {
    /// 1 to 63 of `a-z 0-9 -`; environments name their host by it.
    pub name: String,
    /// `unix:///path`, `tcp://host:2376` or `https://host:2376` (with `tls_dir`), or
    /// `http://host:port` (no TLS: a trusted lab network only).
    pub docker_endpoint: String,
    /// Absolute path, on every API host, of a directory with `ca.pem`, `cert.pem`, `key.pem`.
    pub tls_dir: Option<String>,
    /// The address the host's containers publish on; gateways dial routes there.
    #[schema(value_type = String, example = "10.0.0.2")]
    pub upstream_address: IpAddr,
    /// The host's GPU indexes (its inventory).
    #[serde(default)]
    pub gpus: Vec<u32>,
    /// The GPUs' model label, matched by a create's `gpu_model`.
    #[serde(default)]
    pub gpu_model: String,
    /// Most environments at once (creating, running or unreachable); omitted: no limit.
    pub max_environments: Option<u32>,
}

#[utoipa::path(
    get,
    path = "/api/v1/admin/hosts",
    tag = "admin",
    responses(
        (status = 200, description = "Every GPU host with its state, health and counts, and the placement policy.", body = Envelope<HostList>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
    ),
)]
/// `GET /api/v1/admin/hosts` (admin).
pub(super) async fn list_hosts(State(st): State<AppState>, _admin: Admin) -> ApiResult<HostList> {
    Ok(ok(HostList {
        placement: st.cfg.fleet.placement.as_str(),
        local_host: st.cfg.fleet.host_name.clone(),
        hosts: hosts::list(&st.db).await?,
    }))
}

#[utoipa::path(
    post,
    path = "/api/v1/admin/hosts",
    tag = "admin",
    request_body = AddHost,
    responses(
        (status = 201, description = "Added, `active`; the probes check its engine within `fleet.probe_interval_s` (health `unknown` until then).", body = Envelope<HostRow>),
        (status = 400, description = "Malformed JSON (code 1001).", body = ErrorEnvelope),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
        (status = 409, description = "A host of that name exists (code 1006).", body = ErrorEnvelope),
        (status = 422, description = "A field missing or invalid; the message names it (code 1002).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/admin/hosts` (admin) → 201 with the host.
pub(super) async fn add_host(State(st): State<AppState>, _admin: Admin, Body(req): Body<AddHost>) -> Result<Success<HostRow>, ApiError> {
    let new = NewHost {
        name: req.name.trim().to_string(),
        docker_endpoint: req.docker_endpoint.trim().to_string(),
        tls_dir: req.tls_dir.map(|d| d.trim().to_string()).filter(|d| !d.is_empty()),
        upstream_address: req.upstream_address,
        gpu_model: req.gpu_model.trim().to_string(),
        max_environments: req.max_environments,
        gpus: req.gpus,
    };
    crate::fleet::check_new_host(&new).map_err(ApiError::Validation)?;
    match hosts::add(&st.db, &new).await? {
        Some(row) => {
            tracing::info!(host = %row.name, endpoint = %row.docker_endpoint, gpus = row.gpus_total, "host added");
            Ok(Success(StatusCode::CREATED, row))
        }
        None => Err(ApiError::Conflict(format!("host {} exists", new.name))),
    }
}

async fn set_state(st: &AppState, name: &str, to: &str) -> ApiResult<HostRow> {
    match hosts::set_state(&st.db, name, to).await? {
        Some(row) => {
            tracing::info!(host = %name, state = to, "host state set");
            Ok(ok(row))
        }
        None => Err(ApiError::NotFound(format!("host {name} not found"))),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/admin/hosts/{name}/drain",
    tag = "admin",
    params(("name" = String, Path, description = "The host's name.")),
    responses(
        (status = 200, description = "Draining: no new placement there; its environments keep running, stopping and starting.", body = Envelope<HostRow>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
        (status = 404, description = "No such host (code 1005).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/admin/hosts/{name}/drain` (admin).
pub(super) async fn drain_host(State(st): State<AppState>, _admin: Admin, Path(name): Path<String>) -> ApiResult<HostRow> {
    set_state(&st, &name, hosts::state::DRAINING).await
}

#[utoipa::path(
    post,
    path = "/api/v1/admin/hosts/{name}/undrain",
    tag = "admin",
    params(("name" = String, Path, description = "The host's name.")),
    responses(
        (status = 200, description = "Active again: placements land there.", body = Envelope<HostRow>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
        (status = 404, description = "No such host (code 1005).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/admin/hosts/{name}/undrain` (admin).
pub(super) async fn undrain_host(State(st): State<AppState>, _admin: Admin, Path(name): Path<String>) -> ApiResult<HostRow> {
    set_state(&st, &name, hosts::state::ACTIVE).await
}

/// `data` of `DELETE /api/v1/admin/hosts/{name}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct HostRemoved {
    /// The host removed, with its GPU rows.
    pub name: String,
}

#[utoipa::path(
    delete,
    path = "/api/v1/admin/hosts/{name}",
    tag = "admin",
    params(("name" = String, Path, description = "The host's name.")),
    responses(
        (status = 200, description = "Removed, with its GPU rows.", body = Envelope<HostRemoved>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
        (status = 404, description = "No such host (code 1005).", body = ErrorEnvelope),
        (status = 409, description = "Environments still live there, or it is this API's own host (code 1006).", body = ErrorEnvelope),
    ),
)]
/// `DELETE /api/v1/admin/hosts/{name}` (admin).
pub(super) async fn remove_host(State(st): State<AppState>, _admin: Admin, Path(name): Path<String>) -> ApiResult<HostRemoved> {
    if name == st.cfg.fleet.host_name {
        return Err(ApiError::Conflict(format!(
            "host {name} is this API's own engine (fleet.host_name); disable it with drain instead"
        )));
    }
    match hosts::remove(&st.db, &name).await? {
        Removed::Done => {
            tracing::info!(host = %name, "host removed");
            Ok(ok(HostRemoved { name }))
        }
        Removed::NotFound => Err(ApiError::NotFound(format!("host {name} not found"))),
        Removed::InUse(n) => Err(ApiError::Conflict(format!(
            "host {name} still has {n} environments (any status but deleted); drain it and delete or wait for them first"
        ))),
    }
}
