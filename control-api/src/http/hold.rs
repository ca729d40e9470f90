//! `POST /api/v1/environments/{id}/hold`: its owner holds a running workspace awake for a
//! while (the idle stop waits for the hold's end), or releases the hold.

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;

use super::environment_views::{view, EnvironmentView};
use super::extract::{Body, Caller, IdPath};
use crate::error::{ok, ApiResult, Envelope, ErrorEnvelope};
use crate::lifecycle;
use crate::state::AppState;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/environments/{id}/hold", post(hold_environment))
}

/// Body of `POST /api/v1/environments/{id}/hold`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"seconds": 7200}))]
pub struct HoldEnvironment {
    /// Hold it awake this many seconds from now, replacing any earlier hold; 0 releases the
    /// hold. At most the deployment's `idle.max_hold_s` (default 86400), and never over 30 days.
    #[schema(maximum = 2592000)]
    pub seconds: u64,
}

#[utoipa::path(
    post,
    path = "/api/v1/environments/{id}/hold",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    request_body = HoldEnvironment,
    responses(
        (status = 200, description = "The environment; `idle.held_until` shows the hold (null once released), `idle.stop_at` when the idle stop comes after it.", body = Envelope<EnvironmentView>),
        (status = 400, description = "Malformed JSON or wrong content type (code 1001).", body = ErrorEnvelope),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
        (status = 409, description = "Not running (code 1006).", body = ErrorEnvelope),
        (status = 413, description = "Request body over 2 MiB (code 1013).", body = ErrorEnvelope),
        (status = 422, description = "`seconds` missing, not a whole number of seconds, or over the deployment's longest hold (code 1002).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/environments/{id}/hold` (owner only): `{"seconds": N}` keeps the idle stop
/// away until N seconds from now; `{"seconds": 0}` releases the hold.
async fn hold_environment(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    Body(req): Body<HoldEnvironment>,
) -> ApiResult<EnvironmentView> {
    let env = lifecycle::hold::set(&st, &caller.0, &id, req.seconds).await?;
    Ok(ok(view(&st, env, None).await?))
}
