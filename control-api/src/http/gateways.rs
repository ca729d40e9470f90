//! `/api/v1/admin/gateways` (admin): the gateway registry, each gateway's applied route
//! generation beside the newest one, how far it lags and whether it still beats.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use super::Admin;
use crate::db::gateways::{self, GatewayRow};
use crate::error::{ok, ApiResult, Envelope, ErrorEnvelope};
use crate::state::AppState;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/admin/gateways", get(list_gateways))
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
