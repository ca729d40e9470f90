//! `/api/v1/admin/gateways` (admin): the gateway registry, each gateway's applied route
//! generation beside the newest one, how far it lags and whether it still beats.

use axum::extract::{Path, State};
use axum::routing::{delete, get};
use axum::Router;
use serde::Serialize;

use super::extract::Admin;
use crate::db::gateways::{self, GatewayRow, Removal};
use crate::error::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::state::AppState;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/admin/gateways", get(list_gateways))
        .route("/api/v1/admin/gateways/{name}", delete(remove_gateway))
}

/// `data` of `GET /api/v1/admin/gateways`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GatewayList {
    /// The newest route generation handed out (`route_generation_seq`'s last value), which
    /// each gateway's `lag_generations` is measured against.
    pub current_generation: i64,
    /// A gateway is stale after this many of its heartbeat intervals without a beat.
    pub stale_after_heartbeats: i32,
    /// Every gateway that ever registered, by name; a retired one stays, stale.
    pub gateways: Vec<GatewayRow>,
}

#[utoipa::path(
    get,
    path = "/api/v1/admin/gateways",
    tag = "admin",
    responses(
        (status = 200, description = "Every registered gateway: the route generation its table holds, its lag behind the newest one, its heartbeat's age and whether it is stale.", body = Envelope<GatewayList>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
    ),
)]
/// `GET /api/v1/admin/gateways` (admin).
pub(super) async fn list_gateways(State(st): State<AppState>, _admin: Admin) -> ApiResult<GatewayList> {
    let gateways = gateways::list(&st.db).await?;
    // Every row carries it; an empty registry needs a read of its own.
    let current_generation = match gateways.first() {
        Some(g) => g.current_generation,
        None => gateways::current_generation(&st.db).await?,
    };
    Ok(ok(GatewayList { current_generation, stale_after_heartbeats: gateways::STALE_AFTER_BEATS, gateways }))
}

/// `data` of `DELETE /api/v1/admin/gateways/{name}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GatewayRemoved {
    /// The gateway removed from the registry, with its activity reports.
    pub name: String,
}

#[utoipa::path(
    delete,
    path = "/api/v1/admin/gateways/{name}",
    tag = "admin",
    params(("name" = String, Path, description = "The gateway's name (`gateway_name`).")),
    responses(
        (status = 200, description = "Removed from the registry with its activity reports: the idle task no longer waits for it.", body = Envelope<GatewayRemoved>),
        (status = 403, description = "Needs an admin token (code 1004).", body = ErrorEnvelope),
        (status = 404, description = "No such gateway (code 1005).", body = ErrorEnvelope),
        (status = 409, description = "The gateway is not stale: its publisher still beats (code 1006).", body = ErrorEnvelope),
    ),
)]
/// `DELETE /api/v1/admin/gateways/{name}` (admin): for a gateway gone for good, whose stale
/// row would keep the idle task waiting.
pub(super) async fn remove_gateway(State(st): State<AppState>, _admin: Admin, Path(name): Path<String>) -> ApiResult<GatewayRemoved> {
    match gateways::remove(&st.db, &name).await? {
        Removal::Done => {
            tracing::info!(gateway = %name, "gateway removed from the registry");
            Ok(ok(GatewayRemoved { name }))
        }
        Removal::NotFound => Err(ApiError::NotFound(format!("gateway {name} not found"))),
        Removal::Fresh(age) => Err(ApiError::Conflict(format!(
            "gateway {name} is alive (heartbeat {age:.1} s ago): stop its publisher and remove it once it is stale"
        ))),
    }
}
