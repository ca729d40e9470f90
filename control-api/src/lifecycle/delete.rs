//! Delete: routes first (waited for until no gateway routes them), then the container, then
//! the home volume, then the ports into quarantine.

use std::time::Instant;

use super::steps::{begin_fenced, claim, name_services, remove_containers, step_error, wait_cut_off};
use crate::db::envs::{self, EnvRow, Status};
use crate::db::{self, gpus, hosts, ports, readiness, routes, users::User};
use crate::error::ApiError;
use crate::state::State;

/// Deletes an environment: routes first, then the container, then its home volume, then
/// ports into quarantine.
pub async fn delete(st: &State, user: &User, id: &str) -> Result<EnvRow, ApiError> {
    let started = Instant::now();
    let from = [Status::Running, Status::Stopped, Status::Failed, Status::Creating, Status::Unreachable, Status::Stopping];
    let env = match claim(st, user, id, &from, Status::Deleting, "delete").await {
        Ok(env) => env,
        Err(e) => {
            st.metrics.deletes.with_label_values(&["refused"]).inc();
            return Err(e);
        }
    };
    match finish_delete(st, &env).await {
        Ok(()) => {
            st.metrics.deletes.with_label_values(&["ok"]).inc();
            st.metrics.port_release_seconds.with_label_values(&["delete"]).observe(started.elapsed().as_secs_f64());
            let mut env = env;
            env.status = Status::Deleted;
            Ok(env)
        }
        Err(e) => {
            st.metrics.deletes.with_label_values(&["failed"]).inc();
            // Leave it in `deleting` without an operator: the reconciler finishes it.
            let _ = envs::release_claim(&st.db, id, st.instance).await;
            Err(step_error("delete", e))
        }
    }
}

/// The delete steps after the claim (`env` as claimed, its `op_epoch` the claim's; also used
/// by the reconciler).
pub async fn finish_delete(st: &State, env: &EnvRow) -> anyhow::Result<()> {
    let epoch = env.op_epoch.unwrap_or_default();
    let held: Vec<u16> = ports::env_ports(st.db.pool(), &env.id).await?.into_iter().map(|(p, _)| p).collect();
    let mut tx = begin_fenced(st, &env.id, epoch).await?;
    routes::delete_env(&mut *tx, &env.id).await?;
    tx.commit().await?;
    wait_cut_off(st, &env.id, &held, &name_services(env), "removing").await;
    // A host that is down keeps what it had: the reconciler removes the container and the
    // home volume (no environment owns them any more) when the host is back, and only then
    // are its GPUs given back (its container may still be running with them).
    let host_down = hosts::get(st.db.pool(), &env.host).await?.is_some_and(|h| h.health == hosts::health::DOWN);
    if host_down {
        tracing::warn!(env_id = %env.id, host = %env.host, "host is down; its container, home volume and GPUs are freed when it is back");
    } else {
        let dk = st.fleet.client(&env.host).await?;
        remove_containers(&dk, &env.id, env.container_id.as_deref()).await?;
        st.crash_point("after_container_removed");
        dk.remove_volume(&env.id).await?;
    }
    let mut tx = begin_fenced(st, &env.id, epoch).await?;
    let released = ports::release_env(&mut *tx, &env.id, st.cfg.quarantine_s).await?;
    if !host_down {
        gpus::release_env(&mut *tx, &env.id).await?;
    }
    readiness::clear(&mut *tx, &env.id).await?;
    envs::settle(&mut *tx, &env.id, epoch, Status::Deleted, None, None).await?;
    db::event(&mut *tx, Some(&env.id), "deleted", serde_json::json!({"ports_quarantined": released, "container": env.container_id})).await?;
    tx.commit().await?;
    tracing::info!(env_id = %env.id, ports = ?released, "environment deleted");
    Ok(())
}
