//! The HTTP API: one router per resource, merged here; the extractors every handler shares
//! (bearer-token auth, JSON bodies whose errors use the envelope) are in `extract`. The
//! OpenAPI document (`openapi`) describes every route; a test holds the two equal.

mod debug;
pub use debug::reload_pools_from_config as reload_pools;
mod environment_requests;
mod environment_views;
mod environments;
mod extract;
mod gateways;
mod gpus;
mod health;
mod hold;
mod hosts;
pub use health::Readiness;
pub mod openapi;
mod ports;
pub mod publisher;
mod ratelimit;
mod requests;
mod ssh_keys;

use axum::routing::get;
use axum::Router;

use crate::error::ApiError;
use crate::state::AppState;

/// The whole API.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .merge(environments::router())
        .merge(hold::router())
        .merge(ssh_keys::router())
        .merge(ports::router())
        .merge(gpus::router())
        .merge(hosts::router())
        .merge(gateways::router())
        .merge(debug::router());
    let api = ratelimit::apply(api, state.clone(), &state.cfg.rate_limit);
    let app = Router::new()
        .merge(api)
        .merge(health::router(state.cfg.metrics.listen.is_none()))
        .route(openapi::PATH, get(openapi::get_openapi))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not accept that method".into())
        })
        .with_state(state);
    requests::layer(app)
}

/// The separate metrics address (`metrics.listen`): `/metrics` and `/healthz`, nothing else.
pub fn metrics_router(state: AppState) -> Router {
    let app = health::metrics_router()
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not accept that method".into())
        })
        .with_state(state);
    requests::layer(app)
}
