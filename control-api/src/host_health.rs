//! Host health: every `fleet.probe_interval_s` one API process (the holder of the prober's
//! advisory lock) pings every host's Docker engine that is not disabled.
//!
//! A host that does not answer is `down`: its running environments become `unreachable`
//! (routes kept: the workspaces may well still serve, only their control path is cut). Down
//! for `fleet.fail_after_s`, they become `failed`: routes removed, GPUs released, container
//! forgotten. A host that answers again is reconciled before it is marked `up` (and so before
//! placement uses its GPUs again): containers of environments that are not its own, or that no
//! longer own them, are removed; its `unreachable` environments are `running` again. A host
//! that answers has the GPUs that no API process samples sampled from inside their workspaces
//! ([`crate::gpu_activity::WorkspaceSampler`]), and its workspaces that lack their owner's
//! current account keys brought up to date ([`crate::key_sync`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::db::{self, envs, hosts, readiness, routes, Db};
use crate::gpu_activity::WorkspaceSampler;
use crate::key_sync;
use crate::state::State;

/// Runs the probe loop until `shutdown`.
pub async fn run(st: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let interval = Duration::from_secs(st.cfg.fleet.probe_interval_s);
    let mut lock: Option<sqlx::PgConnection> = None;
    let mut sampler = WorkspaceSampler::default();
    loop {
        if lock.is_none() {
            lock = take_lock(&st.db).await;
        } else if let Some(conn) = lock.as_mut() {
            // A lost connection lost the lock with it.
            if Db::ping_conn(conn).await.is_err() {
                lock = None;
            }
        }
        if lock.is_some() {
            if let Err(e) = pass(&st, &mut sampler).await {
                tracing::error!(error = %format!("{e:#}"), "host probe pass failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The prober's lock on a dedicated connection (held while the connection lives), if free.
async fn take_lock(db: &Db) -> Option<sqlx::PgConnection> {
    let mut conn = db.dedicated().await.ok()?;
    match db::try_prober_lock(&mut conn).await {
        Ok(true) => {
            tracing::info!("this process probes the fleet's hosts");
            Some(conn)
        }
        _ => None,
    }
}

/// Probes every host once and applies what it saw; samples the GPUs of those that answer.
pub async fn pass(st: &State, sampler: &mut WorkspaceSampler) -> anyhow::Result<()> {
    for host in hosts::probed(&st.db).await? {
        let timeout = Duration::from_secs(st.cfg.docker.call_timeout_s.max(1));
        let reached = tokio::time::timeout(timeout, async {
            let client = st.fleet.client(&host.name).await?;
            client.ping().await?;
            Ok::<_, crate::docker::DockerError>(client)
        })
        .await;
        let client = match reached {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                down(st, &host.name, &e.to_string()).await?;
                continue;
            }
            Err(_) => {
                down(st, &host.name, &format!("no answer within {} s", timeout.as_secs())).await?;
                continue;
            }
        };
        st.metrics.host_up.with_label_values(&[&host.name]).set(1.0);
        if host.health != hosts::health::UP {
            // Back (or first seen): its unreachable workspaces are running again, then its
            // containers are matched to the database (a workspace whose container died
            // meanwhile fails, strays go) before placement may use its GPUs again.
            let back = envs::host_back(&st.db, &host.name).await?;
            if !back.is_empty() {
                tracing::info!(host = %host.name, environments = back.len(), "environments reachable again");
            }
            // Its workspace network may be gone (a rebuilt host): made again before any create.
            if let Err(e) = client.clone().ensure_network().await {
                down(st, &host.name, &format!("workspace network: {e}")).await?;
                continue;
            }
            if host.health == hosts::health::DOWN {
                let removed = crate::reconcile::host_strays(st, &host.name, &client).await?;
                tracing::info!(host = %host.name, containers_removed = removed, "host reachable again; reconciled");
            }
            hosts::mark_up(&st.db, &host.name).await?;
        } else {
            hosts::mark_up(&st.db, &host.name).await?;
        }
        if let Err(e) = sampler.sample_host(st, &host.name, &client).await {
            tracing::warn!(host = %host.name, error = %format!("{e:#}"), "sampling the GPUs of the host's workspaces failed");
        }
        if let Err(e) = key_sync::sync_host(st, &host.name, &client).await {
            tracing::warn!(host = %host.name, error = %format!("{e:#}"), "bringing the host's workspaces to their account keys failed");
        }
    }
    Ok(())
}

/// A failed probe of `host`.
async fn down(st: &State, host: &str, reason: &str) -> anyhow::Result<()> {
    st.metrics.host_up.with_label_values(&[host]).set(0.0);
    let secs = hosts::mark_down(&st.db, host, reason).await?;
    let why = format!("host {host} unreachable: {reason}");
    let now = envs::host_unreachable(&st.db, host, &why).await?;
    if !now.is_empty() {
        tracing::warn!(host, environments = now.len(), reason, "host unreachable; its environments keep their routes for now");
    }
    if secs < st.cfg.fleet.fail_after_s as f64 {
        return Ok(());
    }
    let mut tx = st.db.begin().await?;
    let why = format!("host {host} unreachable for over {} s", st.cfg.fleet.fail_after_s);
    let lost = envs::host_lost(&mut tx, host, &why).await?;
    for id in &lost {
        routes::delete_env(&mut *tx, id).await?;
        // Its GPUs stay held: the container may still run there (a host cut off from this
        // prober only). They go back once the host answers again and none of the
        // environment's containers runs (the reconciler), and a start recovers it then.
        readiness::clear(&mut *tx, id).await?;
        db::event(&mut *tx, Some(id), "host_lost", serde_json::json!({ "host": host, "reason": why })).await?;
    }
    tx.commit().await?;
    if !lost.is_empty() {
        st.metrics.repaired("environment_failed", lost.len() as u64);
        tracing::error!(host, environments = lost.len(), "host down too long; its environments failed and their routes are gone");
    }
    Ok(())
}
