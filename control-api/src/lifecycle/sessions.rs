//! Live sessions of a running environment: closing them on request, the idle limit, and the
//! idle stop.

use std::time::Duration;

use gpugate_routes::{EnvId, HostKey, Service};
use serde::Serialize;

use crate::db::envs::{self, status, EnvRow};
use crate::db::{routes, users::User};
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
    /// The gateway's table has the revoke: nginx closes every session that was open at the
    /// request within its flush interval (`gpugate_flush_interval`, 1 s by default). False
    /// if the publisher did not apply it within the route wait; it still will when it runs.
    pub applied: bool,
}

/// The environment `id` as `user` may act on it: their own, or any for an admin.
async fn find(st: &State, user: &User, id: &str) -> Result<EnvRow, ApiError> {
    if id.parse::<EnvId>().is_err() {
        return Err(ApiError::env_not_found(id));
    }
    let owner = (!user.is_admin).then_some(user.id);
    envs::get(st.db.pool(), id, owner).await?.ok_or_else(|| ApiError::env_not_found(id))
}

/// Closes every session open now on a running environment's ports, without stopping it:
/// new connections still work. The request is recorded in the database (the publisher may
/// be another process) as "this port's revoke epoch must reach the one seen now plus one".
pub async fn close(st: &State, user: &User, id: &str) -> Result<SessionsClosed, ApiError> {
    let env = find(st, user, id).await?;
    if env.status != status::RUNNING {
        return Err(ApiError::Conflict(format!(
            "environment {id} is {}: only a running environment has sessions to close",
            env.status
        )));
    }
    let table = st.table.get().map_err(|e| {
        tracing::warn!(error = %e, "sessions/close: route table unavailable");
        ApiError::Unavailable("the route table is unavailable".into())
    })?;
    let ports: Vec<u16> = routes::of_env(st.db.pool(), &env.id)
        .await?
        .iter()
        .filter(|r| r.active)
        .filter_map(|r| u16::try_from(r.port).ok())
        .collect();
    let targets: Vec<(u16, u64)> = ports.iter().map(|&p| (p, table.revoke_epoch(p).saturating_add(1))).collect();
    let asked = routes::request_revoke(&st.db, &env.id, &targets).await?;
    let targets: Vec<(u16, u64)> = targets.into_iter().filter(|(p, _)| asked.contains(p)).collect();
    // Sessions that came in by name: the same request on each name route's slot.
    let env_key: EnvId = env.id.parse().map_err(|e| ApiError::internal("environment id", e))?;
    let name_targets: Vec<(Service, u64)> = super::name_services(&env)
        .into_iter()
        .filter_map(|svc| {
            let slot = table.host_slot(HostKey::new(env_key, svc))?;
            Some((svc, table.revoke_epoch(slot).saturating_add(1)))
        })
        .collect();
    let asked_names = routes::request_name_revoke(&st.db, &env.id, &name_targets).await?;
    let name_targets: Vec<(Service, u64)> =
        name_targets.into_iter().filter(|(s, _)| asked_names.iter().any(|a| a == s.as_str())).collect();
    let wait = Duration::from_millis(st.cfg.route_wait_ms);
    let applied = st.table.wait_revoked(&targets, wait).await
        && st.table.wait_names_revoked(env_key, &name_targets, wait).await;
    let ports: Vec<u16> = targets.iter().map(|(p, _)| *p).collect();
    let names: Vec<String> = name_targets.iter().map(|(s, _)| s.as_str().to_string()).collect();
    st.metrics.sessions_closed.with_label_values(&[if applied { "applied" } else { "pending" }]).inc();
    st.db
        .event(
            Some(&env.id),
            "sessions_closed",
            serde_json::json!({ "ports": ports, "names": names, "applied": applied, "by": user.name }),
        )
        .await?;
    tracing::info!(env_id = %env.id, ?ports, ?names, applied, "sessions closed on request");
    Ok(SessionsClosed { environment_id: env.id, ports, names, applied })
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

/// Stops an environment found idle for `idle_s` seconds; false if it was no longer running
/// or another operation held it (nothing to do then).
pub async fn stop_idle(st: &State, id: &str, idle_s: u64) -> Result<bool, ApiError> {
    let Some(env) = envs::claim(&st.db, id, None, &[status::RUNNING], status::STOPPED, st.instance).await? else {
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
