//! `/api/v1/ports/stats`: pool figures per service.

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use super::extract::Caller;
use crate::db::ports::{self, PoolStats};
use crate::error::{ok, ApiResult, Envelope};
use crate::state::AppState;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/ports/stats", get(get_port_stats))
}

#[utoipa::path(
    get,
    path = "/api/v1/ports/stats",
    tag = "ports",
    responses((status = 200, description = "Figures for every service that has a pool.", body = Envelope<Vec<PoolStats>>)),
)]
/// `GET /api/v1/ports/stats` → per service: total, allocated, quarantined, available,
/// reserved, utilisation.
async fn get_port_stats(State(st): State<AppState>, _caller: Caller) -> ApiResult<Vec<PoolStats>> {
    Ok(ok(ports::stats(&st.db).await?))
}
