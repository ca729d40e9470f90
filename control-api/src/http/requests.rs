//! Every request gets an id (`x-request-id`: the client's if it sent a sane one, else a new
//! random one), echoed in the response, and one log line when it is answered (method, path,
//! status, latency, request id), through tower-http's middleware.

use axum::http::{HeaderValue, Request};
use axum::Router;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

/// Draws request ids from the operating system's RNG.
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomId;

impl MakeRequestId for RandomId {
    fn make_request_id<B>(&mut self, _req: &Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&crate::ids::env_id()).ok().map(RequestId::new)
    }
}

/// `app` with request ids and the request log.
pub fn layer(app: Router) -> Router {
    let trace = TraceLayer::new_for_http()
        .make_span_with(|req: &Request<_>| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
        })
        .on_request(())
        .on_response(DefaultOnResponse::new().level(Level::INFO));
    // Outermost first: set the id, then log with it, then copy it to the response.
    app.layer(PropagateRequestIdLayer::x_request_id())
        .layer(trace)
        .layer(SetRequestIdLayer::x_request_id(RandomId))
}
