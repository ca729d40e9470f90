//! The per-token request rate limit on `/api/v1/*`: a token bucket per bearer token
//! (`tower_governor`), answering 429 in the envelope with `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request};
use axum::response::IntoResponse;
use axum::Router;
use sha2::{Digest, Sha256};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

use crate::config::RateLimitConfig;
use crate::error::ApiError;
use crate::state::AppState;

/// Keys requests by the digest of their bearer token (requests without one share a bucket;
/// they are refused with a 401 anyway). The scheme's spelling does not matter.
#[derive(Clone, Copy, Debug)]
pub struct TokenKey;

impl KeyExtractor for TokenKey {
    type Key = [u8; 32];

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
        let value = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()).unwrap_or_default();
        let token = value.splitn(2, |b| *b == b' ').nth(1).unwrap_or(value);
        Ok(Sha256::digest(token.trim_ascii()).into())
    }
}

/// `router` behind the limit of `cfg` (unchanged when the limit is off). Spawns a task that
/// forgets idle tokens' buckets every minute, so the limiter's memory stays bounded.
pub fn apply(router: Router<AppState>, cfg: &RateLimitConfig) -> Router<AppState> {
    if cfg.per_second <= 0.0 {
        return router;
    }
    let config = GovernorConfigBuilder::default()
        .key_extractor(TokenKey)
        .period(Duration::from_secs_f64(1.0 / cfg.per_second))
        .burst_size(cfg.burst.max(1))
        .finish();
    let Some(config) = config else {
        tracing::error!("rate limit configuration refused by the limiter; running without a rate limit");
        return router;
    };
    let config = Arc::new(config);
    let limiter = config.limiter().clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            limiter.retain_recent();
        }
    });
    let layer: GovernorLayer<TokenKey, _, Body> = GovernorLayer::new(config).error_handler(|e| match e {
        GovernorError::TooManyRequests { wait_time, .. } => ApiError::RateLimited(wait_time).into_response(),
        other => ApiError::internal("rate limiter", other).into_response(),
    });
    router.layer(layer)
}
