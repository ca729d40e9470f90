//! `/api/v1/gpus` (admin): the host's GPU inventory, how GPUs are passed, where the
//! inventory comes from, and which environment holds each GPU.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use super::extract::Admin;
use crate::db::gpus::{self, GpuRow};
use crate::error::{ok, ApiResult, Envelope, ErrorEnvelope};
use crate::state::AppState;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/gpus", get(list_gpus))
}

/// `data` of `GET /api/v1/gpus`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GpuInventory {
    /// How GPUs reach containers on this host: `nvidia`, `cdi` or `nodes` (after `auto` was
    /// resolved against the engine).
    pub mode: &'static str,
    /// Where the inventory comes from: `nvidia-smi`, `config` or `none`.
    pub source: &'static str,
    /// Every GPU known: those on the host first. A GPU that disappeared while an environment
    /// held it shows `in_inventory: false` with that environment until it is released.
    pub gpus: Vec<GpuRow>,
}

#[utoipa::path(
    get,
    path = "/api/v1/gpus",
    tag = "admin",
    responses(
        (status = 200, description = "How GPUs are passed, where the inventory comes from, and every GPU known with its holder.", body = Envelope<GpuInventory>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
    ),
)]
/// `GET /api/v1/gpus` (admin).
pub(super) async fn list_gpus(State(st): State<AppState>, _admin: Admin) -> ApiResult<GpuInventory> {
    let backend = st.fleet.local().gpu();
    Ok(ok(GpuInventory {
        mode: backend.passing.mode().as_str(),
        source: backend.source.describe(),
        gpus: gpus::list(&st.db).await?,
    }))
}
