//! The HTTP face of `gpugate-api publish` (a gateway host without an API): `/healthz`,
//! `/readyz` (is this process the table's writer, and is it keeping the table current) and
//! `/metrics`, in the same envelope as the API's probes. Nothing else: no user tokens, no
//! database query per request.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Serialize;

use super::health::get_healthz;
use crate::config::Config;
use crate::error::{ok, ApiError, Envelope};
use crate::metrics::Metrics;
use crate::publisher_status::PublisherStatus;
use crate::ready_log::ReadyLog;

/// How old the table's heartbeat may be: the writer renews it every second, so three missed
/// beats mean it is not writing (the API's `/readyz` uses the same bound).
const HEARTBEAT_MAX_AGE_MS: u64 = 3_000;

/// What the probes of a publish-only process read.
#[derive(Clone)]
pub struct PublishState {
    /// The configuration (gateway name, re-sync interval, metrics token).
    pub cfg: Arc<Config>,
    /// The publisher's state in this process.
    pub status: Arc<PublisherStatus>,
    /// Metrics of this process.
    pub metrics: Metrics,
    /// What `/readyz` last logged per check (each failure is logged once per change).
    pub ready_log: Arc<ReadyLog>,
}

/// The probe routes; `/metrics` too unless it has an address of its own (`metrics.listen`).
pub fn router(state: PublishState) -> Router {
    let mut r = Router::new().route("/healthz", get(get_healthz)).route("/readyz", get(get_readyz));
    if state.cfg.metrics.listen.is_none() {
        r = r.route("/metrics", get(get_metrics));
    }
    finish(r, state)
}

/// The routes of the separate metrics address: `/metrics` and `/healthz` only.
pub fn metrics_router(state: PublishState) -> Router {
    finish(Router::new().route("/healthz", get(get_healthz)).route("/metrics", get(get_metrics)), state)
}

fn finish(r: Router<PublishState>, state: PublishState) -> Router {
    let app = r
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError::MethodNotAllowed("this endpoint does not accept that method".into())
        })
        .with_state(state);
    super::requests::layer(app)
}

/// `data` of a publisher's `/readyz`.
#[derive(Debug, Serialize)]
pub struct PublisherReadiness {
    /// This gateway's name in the registry (`gateway_name`).
    pub gateway: String,
    /// This process holds the table's writer lock and has synced the table (a standby, or a
    /// writer re-opening the table after an error, does not).
    pub active: bool,
    /// Seconds since the last whole-table sync (`null`: none yet).
    pub last_sync_age_s: Option<f64>,
    /// Seconds since the writer last renewed the table's heartbeat (`null`: never).
    pub heartbeat_age_s: Option<f64>,
    /// The route generation the table is known to hold (0: none confirmed yet).
    pub applied_generation: i64,
    /// Whether the last write to the gateway registry succeeded. Not a readiness condition:
    /// the table does not depend on the registry.
    pub registered: bool,
    /// For each check that fails, why, as a fixed short reason.
    pub reasons: BTreeMap<&'static str, &'static str>,
}

/// Seconds since `at_ms` (unix ms), `None` when it never happened.
fn age_s(at_ms: u64, now_ms: u64) -> Option<f64> {
    (at_ms > 0).then(|| now_ms.saturating_sub(at_ms) as f64 / 1000.0)
}

/// The verdict from the publisher's state at `now_ms`; pure, for the unit test.
pub fn readiness(cfg: &Config, status: &PublisherStatus, now_ms: u64) -> PublisherReadiness {
    let active = status.active.load(Ordering::Relaxed);
    let last_sync_ms = status.last_sync_ms.load(Ordering::Relaxed);
    let heartbeat_ms = status.last_heartbeat_ms.load(Ordering::Relaxed);
    let mut reasons = BTreeMap::new();
    if !active {
        reasons.insert("publisher", "not the writer");
    } else {
        // A whole sync runs every reconcile_interval_s; two missed ones mean it is stuck.
        let sync_max_ms = cfg.reconcile_interval_s.saturating_mul(2_000).saturating_add(5_000);
        if last_sync_ms == 0 {
            reasons.insert("sync", "never synced");
        } else if now_ms.saturating_sub(last_sync_ms) > sync_max_ms {
            reasons.insert("sync", "last sync too old");
        }
        if heartbeat_ms == 0 || now_ms.saturating_sub(heartbeat_ms) > HEARTBEAT_MAX_AGE_MS {
            reasons.insert("table", "no heartbeat");
        }
    }
    PublisherReadiness {
        gateway: cfg.gateway_name.clone(),
        active,
        last_sync_age_s: age_s(last_sync_ms, now_ms),
        heartbeat_age_s: age_s(heartbeat_ms, now_ms),
        applied_generation: status.applied_generation.load(Ordering::Relaxed),
        registered: status.registered.load(Ordering::Relaxed),
        reasons,
    }
}

/// `GET /readyz` of a publisher: 200 while it holds the table, has synced it recently and
/// beats; 503 in the envelope (code 1010) naming what fails otherwise.
async fn get_readyz(State(st): State<PublishState>) -> Response {
    let r = readiness(&st.cfg, &st.status, gpugate_routes::now_ms());
    for check in ["publisher", "sync", "table"] {
        st.ready_log.note(check, r.reasons.get(check).map(|why| why.to_string()));
    }
    if r.reasons.is_empty() {
        return ok(r).into_response();
    }
    let down: Vec<String> = r.reasons.iter().map(|(check, why)| format!("{check} {why}")).collect();
    let message = format!("not ready: {}", down.join("; "));
    let body = Envelope { code: ApiError::Unavailable(String::new()).code(), message, data: Some(r) };
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format of this process, from memory.
async fn get_metrics(State(st): State<PublishState>, headers: HeaderMap) -> Response {
    super::health::metrics_response(&st.cfg, &st.metrics, &headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_writing_a_fresh_table() {
        let cfg = Config { reconcile_interval_s: 30, ..Config::default() };
        let status = PublisherStatus::default();
        let now = 1_000_000_000;
        let r = readiness(&cfg, &status, now);
        assert_eq!(r.reasons.get("publisher"), Some(&"not the writer"), "{r:?}");
        assert_eq!((r.last_sync_age_s, r.heartbeat_age_s), (None, None));

        status.active.store(true, Ordering::Relaxed);
        status.last_sync_ms.store(now - 1_000, Ordering::Relaxed);
        status.last_heartbeat_ms.store(now - 500, Ordering::Relaxed);
        let r = readiness(&cfg, &status, now);
        assert!(r.reasons.is_empty(), "{r:?}");
        assert_eq!(r.last_sync_age_s, Some(1.0));

        status.last_heartbeat_ms.store(now - 4_000, Ordering::Relaxed);
        assert_eq!(readiness(&cfg, &status, now).reasons.get("table"), Some(&"no heartbeat"));
        status.last_heartbeat_ms.store(now, Ordering::Relaxed);
        status.last_sync_ms.store(now - 66_000, Ordering::Relaxed);
        assert_eq!(readiness(&cfg, &status, now).reasons.get("sync"), Some(&"last sync too old"));
    }
}
