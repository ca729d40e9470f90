//! `/healthz`, `/readyz` and `/metrics` (no auth: for probes and scrapers on the operator's
//! network).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use crate::db::{envs, ports};
use crate::error::{ok, ApiError, ApiResult};
use crate::state::AppState;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(get_healthz))
        .route("/readyz", get(get_readyz))
        .route("/metrics", get(get_metrics))
}

/// `GET /healthz`: the process serves requests.
async fn get_healthz() -> ApiResult<&'static str> {
    Ok(ok("ok"))
}

/// `data` of `/readyz`.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub database: bool,
    pub docker: bool,
    /// The table exists, is valid and a publisher (here or in another process) beats.
    pub table: bool,
    pub publisher_active_here: bool,
    pub errors: Vec<String>,
}

/// `GET /readyz`: database, Docker and the route table; 503 in the envelope when any fails.
async fn get_readyz(State(st): State<AppState>) -> Response {
    let mut errors = vec![];
    let database = match st.db.ping().await {
        Ok(()) => true,
        Err(e) => {
            errors.push(format!("database: {e}"));
            false
        }
    };
    let ping = tokio::time::timeout(std::time::Duration::from_secs(2), st.docker.ping()).await;
    let docker = match ping.unwrap_or(Err(crate::docker::DockerError::Timeout("ping"))) {
        Ok(()) => true,
        Err(e) => {
            errors.push(format!("docker: {e}"));
            false
        }
    };
    let table = match st.table.get() {
        Ok(t) => {
            let age = gpugate_routes::now_ms().saturating_sub(t.header_info().heartbeat_ms);
            // The publisher beats every second; three missed beats mean nobody writes.
            if age > 3_000 {
                errors.push(format!("route table: no publisher heartbeat for {age} ms"));
                false
            } else {
                true
            }
        }
        Err(e) => {
            errors.push(format!("route table: {e}"));
            false
        }
    };
    let r = Readiness {
        database,
        docker,
        table,
        publisher_active_here: st.publisher.active.load(Ordering::Relaxed),
        errors,
    };
    if r.errors.is_empty() {
        ok(r).into_response()
    } else {
        let msg = r.errors.join("; ");
        let body = crate::error::Envelope { code: ApiError::Unavailable(String::new()).code(), message: msg, data: Some(r) };
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    }
}

/// `GET /metrics`: Prometheus text format.
async fn get_metrics(State(st): State<AppState>) -> Response {
    let m = &st.metrics;
    if let Ok(stats) = ports::stats(&st.db).await {
        m.ports.reset();
        for s in stats {
            for (state, n) in [
                ("allocated", s.allocated),
                ("quarantined", s.quarantined),
                ("available", s.available),
                ("reserved", s.reserved),
            ] {
                m.ports.with_label_values(&[&s.service, state]).set(n as f64);
            }
        }
    }
    if let Ok(counts) = envs::count_by_status(&st.db).await {
        m.environments.reset();
        for (status, n) in counts {
            m.environments.with_label_values(&[&status]).set(n as f64);
        }
    }
    if let Ok(t) = st.table.get() {
        m.env_connections.reset();
        m.env_connections_active.reset();
        m.env_bytes.reset();
        for (port, r) in t.routes() {
            let c = t.counters(port);
            let (env, svc) = (r.env_id.to_string(), r.service.to_string());
            m.env_connections.with_label_values(&[&env, &svc, "accepted"]).add(c.connections_total as f64);
            m.env_connections.with_label_values(&[&env, &svc, "refused"]).add(c.refused_total as f64);
            m.env_connections_active.with_label_values(&[&env, &svc]).add(c.connections_active as f64);
            m.env_bytes.with_label_values(&[&env, &svc, "in"]).add(c.bytes_in as f64);
            m.env_bytes.with_label_values(&[&env, &svc, "out"]).add(c.bytes_out as f64);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()).into_response()
}
