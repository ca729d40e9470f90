//! Stop and start. A stop disables the routes, stops the container and gives the GPUs back to
//! the inventory; a start takes as many GPUs again (or answers 409 naming how many are free),
//! re-creates the container on the same home volume with the new devices, and brings the
//! routes back on the same ports. Ports, addresses, credentials and the home directory's files
//! survive; the rest of the container's filesystem does not. A start also recovers a `failed`
//! environment (its container vanished, or its host was lost and is back): the same steps, over
//! the same home.
//!
//! Both are visible while they run (`stopping`, `starting`), and both count as running for
//! quotas. Every write after the claim is fenced by the claim's epoch.

use std::time::Duration;

use super::quota;
use super::steps::{
    account_login, begin_fenced, claim, claim_lost, commit_routes, docker_error, gpus_unavailable, host_error, host_identity,
    name_services, remove_containers, start_and_read, step_error, still_held, wait_cut_off, ClaimLost, Outcome, Wanted,
};
use crate::db::envs::{self, EnvRow, Status};
use crate::db::{self, gpus, hosts, ports, quotas, readiness, routes, users::User};
use crate::docker::{DockerClient, Limits, WorkspaceSpec};
use crate::error::ApiError;
use crate::gpu::GpuRef;
use crate::state::State;

/// Stops an environment of `user` (the HTTP stop): see [`stop_env`].
pub async fn stop(st: &State, user: &User, id: &str) -> Result<Outcome, ApiError> {
    let env = claim(st, user, id, &[Status::Running], Status::Stopping, "stop").await?;
    if let Err(e) = stop_env(st, &env, "requested", None).await {
        return Err(step_error("stop", e));
    }
    let env = envs::get(st.db.pool(), id, None).await?.ok_or_else(|| ApiError::env_not_found(id))?;
    Ok(Outcome { env, routes_live: false, timings: vec![], replayed: false })
}

/// The stop steps after the claim (`env` claimed by this process, from `running` to
/// `stopping`, its `op_epoch` the claim's; the reconciler finishes an interrupted stop the
/// same way); every stop ends here, by hand or automatic, and `reason` goes into its
/// `stopped` event (`status_reason`, if any, becomes the environment's). Routes are disabled
/// first (new connections are refused; the publisher revokes them, so nginx closes the open
/// sessions within its flush interval, and the stop waits for that: clients see a close from
/// the gateway, not a workspace dying under them), then the container stops, then one
/// transaction gives the environment's GPUs back to the inventory and settles it `stopped`.
/// Ports, addresses and the home volume are kept.
///
/// If a step fails the environment stays `stopping`, released to the reconciler, and keeps its
/// GPUs: its container may still be running with their devices, and a GPU is never handed out
/// while that can be. The reconciler finishes the stop.
pub async fn stop_env(st: &State, env: &EnvRow, reason: &str, status_reason: Option<&str>) -> anyhow::Result<()> {
    let epoch = env.op_epoch.unwrap_or_default();
    let result: anyhow::Result<()> = async {
        let mut tx = begin_fenced(st, &env.id, epoch).await?;
        routes::deactivate(&mut *tx, &env.id).await?;
        tx.commit().await?;
        let held: Vec<u16> = ports::env_ports(st.db.pool(), &env.id).await?.into_iter().map(|(p, _)| p).collect();
        wait_cut_off(st, &env.id, &held, &name_services(env), "stopping").await;
        if st.fail_point("docker_stop") {
            anyhow::bail!("fault injection: docker_stop");
        }
        let dk = st.fleet.client(&env.host).await?;
        for c in dk.list_managed().await?.into_iter().filter(|c| c.env_id == env.id && c.running) {
            dk.stop(&c.id).await?;
        }
        if let Some(c) = &env.container_id {
            dk.stop(c).await?;
        }
        let mut tx = begin_fenced(st, &env.id, epoch).await?;
        let released = gpus::release_env(&mut *tx, &env.id).await?;
        envs::set_gpus(&mut tx, &env.id, &[]).await?;
        readiness::clear(&mut *tx, &env.id).await?;
        envs::settle(&mut *tx, &env.id, epoch, Status::Stopped, status_reason, None).await?;
        let detail = serde_json::json!({"reason": reason, "gpus_released": env.gpus});
        db::event(&mut *tx, Some(&env.id), "stopped", detail).await?;
        tx.commit().await?;
        tracing::info!(env_id = %env.id, reason, gpus_released = released, "environment stopped");
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        if claim_lost(e) {
            tracing::warn!(env_id = %env.id, error = %e, "stop fenced off; the new owner finishes it");
        } else {
            tracing::warn!(env_id = %env.id, error = %format!("{e:#}"), "stop incomplete; the reconciler finishes it");
            let _ = envs::release_claim(&st.db, &env.id, st.instance).await;
        }
    }
    result
}

/// Starts a stopped or failed environment of `user`: on its own host (which must be up), its
/// containers stopped first (GPUs go back only once nothing that had them runs), GPUs
/// again (quota and inventory checked in one transaction), a new container on the same home
/// volume, the routes back on the same ports with a new generation and the new container's
/// published addresses. A start that fails leaves the environment stopped, holding no GPU and
/// no container; one refused before anything changed leaves it as it was.
pub async fn start(st: &State, user: &User, id: &str) -> Result<Outcome, ApiError> {
    let (env, was) = match claim(st, user, id, &[Status::Stopped], Status::Starting, "start").await {
        Ok(env) => (env, Status::Stopped),
        Err(ApiError::Conflict(_)) => {
            (claim(st, user, id, &[Status::Failed], Status::Starting, "start").await?, Status::Failed)
        }
        Err(e) => return Err(e),
    };
    let epoch = env.op_epoch.unwrap_or_default();
    let dk = match prepare_start(st, &env).await {
        Ok(dk) => dk,
        Err(e) => {
            // Nothing changed: back to what it was (with its reason), unless taken over.
            let mut tx = begin_fenced(st, id, epoch).await?;
            envs::settle(&mut *tx, id, epoch, was, env.status_reason.as_deref(), None).await?;
            tx.commit().await?;
            return Err(e);
        }
    };
    let gpu_list = match take_gpus(st, user, &env, epoch).await {
        Ok(l) => l,
        Err(e) => {
            // Refused (quota, GPUs): nothing changed, and no container of it runs, so it is
            // stopped (a failed one too: start it again once GPUs are free).
            if let Ok(mut tx) = begin_fenced(st, id, epoch).await {
                if envs::settle(&mut *tx, id, epoch, Status::Stopped, env.status_reason.as_deref(), None).await.is_ok() {
                    let _ = tx.commit().await;
                }
            }
            return Err(e);
        }
    };

    // From here on a failure gives the GPUs back and removes what was made.
    let mut made: Option<String> = None;
    let rest: Result<Wanted, ApiError> = async {
        // Ports held, and port 0 for a service reached by name only.
        let held = ports::env_endpoints(st.db.pool(), &env.id, &env.services).await?;
        let limits = limits_of(st, &dk, &env).await;
        // The old container goes (its device nodes are the old GPUs'); the files of the home
        // stay in the volume.
        remove_containers(&dk, &env.id, env.container_id.as_deref()).await.map_err(docker_error)?;
        dk.ensure_volume(&env.id).await.map_err(docker_error)?;
        let identity = host_identity(st, &env.id).await?;
        let account = account_login(st, env.owner_id).await?;
        let ws = WorkspaceSpec {
            env_id: &env.id,
            image: &env.image,
            services: &held,
            gpus: &gpu_list,
            username: &env.username,
            password: &env.password,
            jupyter_token: &env.jupyter_token,
            ssh_public_keys: &env.ssh_public_keys,
            ssh_host_key: &identity.private_key,
            ssh_host_cert: &identity.certificate,
            account: &account,
            limits,
        };
        let c = dk.create(&ws).await.map_err(docker_error)?;
        made = Some(c.clone());
        if !envs::set_container(st.db.pool(), &env.id, epoch, &c).await? {
            return Err(ClaimLost(env.id.clone()).into());
        }
        let upstreams = start_and_read(&dk, &c, &held).await?;
        commit_routes(st, &env.id, epoch, &c, &upstreams, &name_services(&env)).await
    }
    .await;
    let wanted = match rest {
        Ok(w) => w,
        Err(e) => {
            if !still_held(st, &env.id, epoch).await {
                tracing::warn!(env_id = %env.id, error = %e, "start failed after its claim was taken over; leaving the undo to the new owner");
                if let Some(c) = &made {
                    let _ = dk.remove(c).await;
                }
                return Err(e);
            }
            let reason = format!("start failed: {e}");
            if let Err(u) = undo_start(st, &dk, &env.id, epoch, &reason).await {
                tracing::error!(env_id = %env.id, error = %format!("{u:#}"), "undo of a failed start failed; the reconciler finishes it");
                let _ = envs::release_claim(&st.db, &env.id, st.instance).await;
            }
            return Err(e);
        }
    };
    let live = st.table.wait_live(&wanted.ports, &wanted.names, Duration::from_millis(st.cfg.route_wait_ms)).await;
    let env = envs::get(st.db.pool(), id, None).await?.ok_or_else(|| ApiError::env_not_found(id))?;
    tracing::info!(env_id = %env.id, gpus = ?gpu_list, recovered = (was == Status::Failed), "environment started");
    Ok(Outcome { env, routes_live: live, timings: vec![], replayed: false })
}

/// What a start checks and ensures before it takes GPUs: its host is up (a host that is down
/// or never seen may still run the old container with the old GPUs), the image is there, and
/// no container of the environment runs (their devices are the old GPUs', which go back in
/// the next step: a stop that failed half-way may have left one running).
async fn prepare_start(st: &State, env: &EnvRow) -> Result<DockerClient, ApiError> {
    let host = hosts::get(st.db.pool(), &env.host).await?;
    match host {
        Some(h) if h.health == hosts::health::UP && h.state != hosts::state::DISABLED => {}
        Some(h) => {
            return Err(ApiError::Conflict(format!(
                "cannot start environment {}: its host {} is {} ({}); its home volume is there, so it starts once the host is up",
                env.id,
                env.host,
                h.health,
                h.state
            )))
        }
        None => return Err(ApiError::Conflict(format!("cannot start environment {}: its host {} is not in the fleet", env.id, env.host))),
    }
    let dk = st.fleet.client(&env.host).await.map_err(|e| host_error(&env.host, e))?;
    dk.image_exists(&env.image).await.map_err(|e| host_error(&env.host, e))?;
    if st.fail_point("docker_stop") {
        return Err(ApiError::internal("Docker error", "fault injection: docker_stop"));
    }
    let all = dk.list_managed().await.map_err(docker_error)?;
    for c in all.iter().filter(|c| c.env_id == env.id && c.running) {
        dk.stop(&c.id).await.map_err(docker_error)?;
    }
    Ok(dk)
}

/// One transaction, while the claim of epoch `epoch` holds the row: the user's quota (their
/// row locked, as in a create; the GPUs are already counted, a stopped environment keeps its
/// share, and this one counts as running already, being `starting`) and the environment's GPUs,
/// `gpu_count` of them, taken like a create takes them (`FOR UPDATE SKIP LOCKED`). Too few
/// free: 409 naming how many are free and needed, and nothing changes. Called only once no
/// container of the environment runs.
async fn take_gpus(st: &State, user: &User, env: &EnvRow, epoch: i64) -> Result<Vec<GpuRef>, ApiError> {
    let needed = u32::try_from(env.gpu_count).unwrap_or(0);
    let _turn = st.ops.user_turn(user.id).await;
    let mut tx = begin_fenced(st, &env.id, epoch).await?;
    // GPUs it still holds (a failed environment, one stopped before stops gave them back): no
    // container that had them runs any more, so they go back first rather than being kept on
    // top.
    gpus::release_env(&mut *tx, &env.id).await?;
    envs::set_gpus(&mut tx, &env.id, &[]).await?;
    let usage = quotas::lock_usage(&mut tx, user.id).await?;
    let usage = quotas::Usage { running: usage.running.saturating_sub(1), ..usage };
    let overrides = quotas::overrides(&mut tx, user.id).await?;
    let adds = quota::Adds { environments: 0, gpus: 0, running: 1 };
    quota::check(&user.name, &st.cfg.quotas, overrides, usage, adds)?;
    let model = env.gpu_model.as_deref();
    // On its own host: its home volume is there.
    let list = gpus::allocate(&mut tx, &env.host, &env.id, needed, model).await?;
    if list.len() < needed as usize {
        tx.rollback().await?;
        let free = list.len();
        let of = model.map(|m| format!(" of model \"{m}\"")).unwrap_or_default();
        let what = format!(
            "not enough free GPUs{of} on host {} (where its home volume is) to start environment {}: {free} free, {needed} needed",
            env.host, env.id
        );
        return Err(gpus_unavailable(st, what, free, needed, model).await);
    }
    envs::set_gpus(&mut tx, &env.id, &list).await?;
    let ids: Vec<String> = list.iter().map(GpuRef::request_id).collect();
    db::event(&mut *tx, Some(&env.id), "gpus_allocated", serde_json::json!({ "gpus": ids })).await?;
    tx.commit().await?;
    Ok(list)
}

/// The limits the re-created container gets: those recorded at create; for an environment
/// made before they were recorded, those of its old container; else the deployment's defaults.
async fn limits_of(st: &State, dk: &DockerClient, env: &EnvRow) -> Limits {
    let recorded = (|| {
        Some(Limits {
            memory_mb: u64::try_from(env.memory_mb?).ok()?,
            cpus: env.cpus?,
            pids: u32::try_from(env.pids?).ok()?,
        })
    })();
    if let Some(l) = recorded {
        return l;
    }
    if let Some(c) = &env.container_id {
        if let Ok(Some(old)) = dk.inspect(c).await {
            if let Some(l) = old.limits {
                return l;
            }
        }
    }
    let d = &st.cfg.docker.limits;
    tracing::warn!(env_id = %env.id, "no recorded limits; the container gets the deployment's defaults");
    Limits { memory_mb: d.memory_mb, cpus: d.cpus, pids: d.pids }
}

/// Undoes a failed start (also the reconciler's, for a start interrupted by a crash): removes
/// the environment's containers, then gives the GPUs back, forgets the container and settles
/// the environment `stopped` with `reason`, while the claim of epoch `epoch` holds the row.
pub async fn undo_start(st: &State, dk: &DockerClient, id: &str, epoch: i64, reason: &str) -> anyhow::Result<()> {
    remove_containers(dk, id, None).await?;
    let mut tx = begin_fenced(st, id, epoch).await?;
    routes::deactivate(&mut *tx, id).await?;
    gpus::release_env(&mut *tx, id).await?;
    envs::set_gpus(&mut tx, id, &[]).await?;
    envs::clear_container(&mut *tx, id).await?;
    readiness::clear(&mut *tx, id).await?;
    envs::settle(&mut *tx, id, epoch, Status::Stopped, Some(reason), None).await?;
    db::event(&mut *tx, Some(id), "start_undone", serde_json::json!({ "reason": reason })).await?;
    tx.commit().await?;
    Ok(())
}
