//! Live sessions of a running environment: closing them on request, the idle limit, and the
//! idle stop.

use std::time::Duration;

use gpugate_routes::EnvId;
use serde::Serialize;

use crate::db::envs::{self, EnvRow, Status};
use crate::db::{close_requests, routes, users::User};
use crate::error::ApiError;
use crate::state::State;

/// `data` of `POST /api/v1/environments/{id}/sessions/close`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionsClosed {
    pub environment_id: String,
    /// The ports whose open sessions are being closed.
    pub ports: Vec<u16>,
    /// The services whose sessions by name are being closed.
    pub names: Vec<String>,
    /// Every fresh gateway applied the request within the route wait: nginx closes every
    /// session that was open at the request within its flush interval
    /// (`gpugate_flush_interval`, 1 s by default). False if some had not; each still will
    /// when its publisher runs (a gateway that was down applies what it missed when back).
    pub applied: bool,
    /// How many of the registered, fresh gateways applied it.
    pub gateways: CloseProgress,
}

/// How far a close request got across the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CloseProgress {
    /// Fresh gateways that applied the request to their table.
    pub applied: i64,
    /// Fresh gateways registered (a stale one applies it when it comes back).
    pub registered: i64,
}

/// The environment `id` as `user` may act on it: their own, or any for an admin.
async fn find(st: &State, user: &User, id: &str) -> Result<EnvRow, ApiError> {
    if id.parse::<EnvId>().is_err() {
        return Err(ApiError::env_not_found(id));
    }
    let owner = (!user.is_admin).then_some(user.id);
    envs::get(st.db.pool(), id, owner).await?.ok_or_else(|| ApiError::env_not_found(id))
}

/// Closes every session open now on a running environment's ports and names, on every
/// gateway, without stopping it: new connections still work. The request is recorded once
/// in the database; each gateway's publisher applies it to its own table exactly once,
/// relative to that table's own revoke epochs ([`crate::revokes`]).
pub async fn close(st: &State, user: &User, id: &str) -> Result<SessionsClosed, ApiError> {
    let env = find(st, user, id).await?;
    if env.status != Status::Running {
        return Err(ApiError::Conflict(format!(
            "environment {id} is {}: only a running environment has sessions to close",
            env.status
        )));
    }
    let ports: Vec<(u16, i64)> = routes::of_env(st.db.pool(), &env.id)
        .await?
        .iter()
        .filter(|r| r.active)
        .filter_map(|r| Some((u16::try_from(r.port).ok().filter(|p| *p != 0)?, r.generation)))
        .collect();
    let names: Vec<(String, i64)> = routes::names_of_env(st.db.pool(), &env.id)
        .await?
        .into_iter()
        .filter(|r| r.active)
        .map(|r| (r.service, r.generation))
        .collect();
    let request = close_requests::record(&st.db, &env.id, &ports, &names).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(st.cfg.route_wait_ms);
    let progress = loop {
        let (registered, applied) = close_requests::progress(&st.db, request).await?;
        let p = CloseProgress { applied, registered };
        if applied >= registered || tokio::time::Instant::now() >= deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let applied = progress.registered > 0 && progress.applied >= progress.registered;
    let ports: Vec<u16> = ports.iter().map(|(p, _)| *p).collect();
    let names: Vec<String> = names.into_iter().map(|(s, _)| s).collect();
    st.metrics.sessions_closed.with_label_values(&[if applied { "applied" } else { "pending" }]).inc();
    st.db
        .event(
            Some(&env.id),
            "sessions_closed",
            serde_json::json!({
                "ports": ports, "names": names, "applied": applied, "request": request,
                "gateways": { "applied": progress.applied, "registered": progress.registered }, "by": user.name,
            }),
        )
        .await?;
    tracing::info!(env_id = %env.id, ?ports, ?names, applied, request, "sessions closed on request");
    Ok(SessionsClosed { environment_id: env.id, ports, names, applied, gateways: progress })
}

/// Sets an environment's idle limit (validated against the deployment's maximum).
pub async fn set_idle_limit(st: &State, user: &User, id: &str, secs: u64) -> Result<EnvRow, ApiError> {
    st.cfg.idle.check(secs).map_err(|e| ApiError::Validation(format!("idle_stop_after_s: {e}")))?;
    if id.parse::<EnvId>().is_err() || !envs::set_idle_stop_after(&st.db, id, Some(user.id), secs).await? {
        return Err(ApiError::env_not_found(id));
    }
    st.db.event(Some(id), "idle_limit_set", serde_json::json!({ "idle_stop_after_s": secs })).await?;
    envs::get(st.db.pool(), id, Some(user.id)).await?.ok_or_else(|| ApiError::env_not_found(id))
}

/// Stops an environment found idle for `idle_s` seconds (and warned); false if it was no
/// longer running, another operation held it, or its owner put a hold on it since the check
/// (nothing to do then).
pub async fn stop_idle(st: &State, id: &str, idle_s: u64) -> Result<bool, ApiError> {
    let Some(env) = crate::db::idle::claim_stop(&st.db, id, st.instance).await? else {
        return Ok(false);
    };
    let policy = st.cfg.idle.policy.as_str();
    let reason = format!("idle for {idle_s} s (policy {policy})");
    super::stop_start::stop_env(st, &env, "idle", Some(&reason))
        .await
        .map_err(|e| ApiError::internal("idle stop", format!("{e:#}")))?;
    st.metrics.idle_stops.inc();
    st.db
        .event(
            Some(id),
            "idle_stopped",
            serde_json::json!({ "idle_seconds": idle_s, "policy": policy, "limit_s": env.idle_stop_after_s }),
        )
        .await?;
    tracing::info!(env_id = %id, idle_s, policy, "idle environment stopped");
    Ok(true)
}
