//! `/healthz`, `/readyz` and `/metrics`: for probes and scrapers, without user tokens.
//!
//! `/readyz` names each dependency that is down with a fixed short reason and never echoes an
//! error's text (which can carry addresses, paths and user names); the raw error goes to the
//! log at warn, once per change. `/metrics` renders what the gauge task refreshed last, so a
//! scrape runs no query; `metrics.token` puts it behind a bearer token, and `metrics.listen`
//! moves it to an address of its own.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::docker::DockerError;
use crate::error::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope};
use crate::state::AppState;

/// How long the Docker ping of `/readyz` may take.
const DOCKER_PING: Duration = Duration::from_secs(2);

/// The probe routes; `/metrics` too unless it has an address of its own (`metrics.listen`).
pub fn router(serve_metrics: bool) -> Router<AppState> {
    let r = Router::new().route("/healthz", get(get_healthz)).route("/readyz", get(get_readyz));
    if serve_metrics {
        r.route("/metrics", get(get_metrics))
    } else {
        r
    }
}

/// The routes of the separate metrics address: `/metrics` and `/healthz` only.
pub fn metrics_router() -> Router<AppState> {
    Router::new().route("/healthz", get(get_healthz)).route("/metrics", get(get_metrics))
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "probes",
    security(()),
    responses((status = 200, description = "The process serves requests; `data` is `\"ok\"`.", body = Envelope<String>)),
)]
/// `GET /healthz`: the process serves requests.
pub(super) async fn get_healthz() -> ApiResult<&'static str> {
    Ok(ok("ok"))
}

/// `data` of `/readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// PostgreSQL answers.
    pub database: bool,
    /// The Docker engine answers.
    pub docker: bool,
    /// The table exists, is valid and a publisher (here or in another process) beats.
    pub table: bool,
    /// This process holds its database liveness lock, without which it starts no operation
    /// (creates and the like answer 503 until it is back).
    pub operating: bool,
    /// This process holds the table's writer lock.
    pub publisher_active_here: bool,
    /// For each dependency that is down, why, as a fixed short reason (see the README).
    #[schema(value_type = BTreeMap<String, String>)]
    pub reasons: BTreeMap<&'static str, &'static str>,
}

/// The fixed reason for a database error (never its text).
pub fn database_reason(e: &sqlx::Error) -> &'static str {
    match e {
        sqlx::Error::PoolTimedOut => "timeout",
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolClosed => "unreachable",
        sqlx::Error::Database(d) => match d.code().as_deref() {
            Some("57P03") => "starting up",
            Some("57P01" | "57P02") => "shutting down",
            Some("53300") => "no connection slots",
            Some(c) if c.starts_with("28") => "login refused",
            Some("3D000") => "no such database",
            Some("55000") => "not accepting connections",
            _ => "error",
        },
        _ => "error",
    }
}

/// The fixed reason for a Docker error.
pub fn docker_reason(e: &DockerError) -> &'static str {
    match e {
        DockerError::Timeout(_) => "timeout",
        DockerError::Connect(_) => "unreachable",
        DockerError::Busy(_) => "busy",
        _ => "error",
    }
}

/// The fixed reason for a route table that cannot be read.
pub fn table_reason(e: &gpugate_routes::Error) -> &'static str {
    match e {
        gpugate_routes::Error::Missing { .. } => "missing",
        gpugate_routes::Error::Io { .. } => "unreadable",
        _ => "invalid",
    }
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    security(()),
    responses(
        (status = 200, description = "Database, Docker and the route table are usable.", body = Envelope<Readiness>),
        (status = 503, description = "Something is down (code 1010); the message and `data.reasons` name it.", body = Envelope<Readiness>),
    ),
)]
/// `GET /readyz`: database, Docker and the route table; 503 in the envelope naming what is
/// down when any fails.
async fn get_readyz(State(st): State<AppState>) -> Response {
    let mut reasons = BTreeMap::new();
    // The pool's acquire time-out bounds a down database; this bounds a hung one.
    let bound = Duration::from_millis(st.cfg.database_acquire_timeout_ms) + Duration::from_secs(1);
    let (database, error) = match tokio::time::timeout(bound, st.db.ping()).await {
        Ok(Ok(())) => (true, None),
        Ok(Err(e)) => {
            reasons.insert("database", database_reason(&e));
            (false, Some(e.to_string()))
        }
        Err(_) => {
            reasons.insert("database", "timeout");
            (false, Some(format!("ping: no answer within {bound:?}")))
        }
    };
    st.ready_log.note("database", error);
    let ping = tokio::time::timeout(DOCKER_PING, st.fleet.local().ping()).await;
    let (docker, error) = match ping.unwrap_or(Err(DockerError::Timeout("ping"))) {
        Ok(()) => (true, None),
        Err(e) => {
            reasons.insert("docker", docker_reason(&e));
            (false, Some(e.to_string()))
        }
    };
    st.ready_log.note("docker", error);
    let (table, error) = match st.table.get() {
        Ok(t) => {
            let age = gpugate_routes::now_ms().saturating_sub(t.header_info().heartbeat_ms);
            // The publisher beats every second; three missed beats mean nobody writes.
            if age > 3_000 {
                reasons.insert("table", "no publisher heartbeat");
                (false, Some("no publisher heartbeat for over 3 s".to_string()))
            } else {
                (true, None)
            }
        }
        Err(e) => {
            reasons.insert("table", table_reason(&e));
            (false, Some(e.to_string()))
        }
    };
    st.ready_log.note("table", error);
    let operating = st.liveness.holding();
    if !operating {
        reasons.insert("operating", "liveness lock not held");
    }
    let r = Readiness {
        database,
        docker,
        table,
        operating,
        publisher_active_here: st.publisher.active.load(Ordering::Relaxed),
        reasons,
    };
    if r.reasons.is_empty() {
        return ok(r).into_response();
    }
    let down: Vec<String> = r.reasons.iter().map(|(dep, why)| format!("{dep} {why}")).collect();
    let message = format!("not ready: {}", down.join("; "));
    let body = crate::error::Envelope { code: ApiError::Unavailable(String::new()).code(), message, data: Some(r) };
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
}

/// Whether `headers` carry `Authorization: Bearer <want>` (scheme case-insensitive; the
/// token compared in constant time, through its digest).
pub(super) fn bearer_matches(headers: &HeaderMap, want: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else { return false };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return false;
    }
    let (a, b) = (Sha256::digest(token.trim().as_bytes()), Sha256::digest(want.as_bytes()));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    security((), ("metrics_token" = [])),
    responses(
        (status = 200, description = "Prometheus text format.", content_type = "text/plain", body = String),
        (status = 401, description = "`metrics.token` is set and the request does not carry it (code 1003).", body = ErrorEnvelope),
    ),
)]
/// `GET /metrics`: Prometheus text format, from memory (no query).
async fn get_metrics(State(st): State<AppState>, headers: HeaderMap) -> Response {
    metrics_response(&st.cfg, &st.metrics, &headers)
}

/// `/metrics` of any process: the text format from memory, behind `metrics.token` when set.
pub(super) fn metrics_response(cfg: &crate::config::Config, metrics: &crate::metrics::Metrics, headers: &HeaderMap) -> Response {
    let token = &cfg.metrics.token;
    if !token.is_empty() && !bearer_matches(headers, token.expose()) {
        return ApiError::Unauthorized.into_response();
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_token_is_matched_exactly_with_any_scheme_case() {
        let mut h = HeaderMap::new();
        assert!(!bearer_matches(&h, "scrape-secret-0123456789"));
        for (value, want) in [
            ("Bearer scrape-secret-0123456789", true),
            ("bearer scrape-secret-0123456789", true),
            ("Bearer scrape-secret-012345678", false),
            ("Bearer scrape-secret-01234567890", false),
            ("Basic scrape-secret-0123456789", false),
            ("scrape-secret-0123456789", false),
        ] {
            h.insert(header::AUTHORIZATION, value.parse().expect("header"));
            assert_eq!(bearer_matches(&h, "scrape-secret-0123456789"), want, "{value}");
        }
    }

    #[test]
    fn readiness_reasons_are_fixed_words() {
        assert_eq!(database_reason(&sqlx::Error::PoolTimedOut), "timeout");
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        assert_eq!(database_reason(&sqlx::Error::Io(io)), "unreachable");
        assert_eq!(docker_reason(&DockerError::Connect("socket /var/run/docker.sock".into())), "unreachable");
        let missing = gpugate_routes::Error::Missing { path: "/dev/shm/x/routes".into() };
        assert_eq!(table_reason(&missing), "missing");
    }
}
