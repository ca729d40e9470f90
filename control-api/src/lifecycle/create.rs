//! Create: one transaction allocates everything (row, ports, placement, GPUs, quota), then the
//! home volume, the container, its start and its routes; any later failure undoes the earlier
//! steps in reverse. An `Idempotency-Key` answers a repeat with the environment it made.

use std::time::{Duration, Instant};

use gpugate_routes::Service;

use super::quota;
use super::steps::{
    account_login, begin_fenced, commit_routes, docker_error, gpus_unavailable, host_error, host_identity, remove_containers,
    start_and_read, still_held, ClaimLost, Outcome, Wanted,
};
use super::validate::{self, CreateSpec, IdempotencyKey};
use crate::db::envs::{self, NewEnv, Status};
use crate::db::{self, gpus, idempotency, ports, quotas, routes, users::User};
use crate::docker::{DockerClient, DockerError, WorkspaceSpec};
use crate::error::ApiError;
use crate::state::State;

/// Creates an environment: allocate ports and GPUs, create and start the container, commit
/// the routes, wait until they are live. With an idempotency key already used by this user,
/// answers with the environment that key made instead.
pub async fn create(st: &State, user: &User, spec: CreateSpec) -> Result<Outcome, ApiError> {
    let started = Instant::now();
    let mut timings: Vec<(&'static str, f64)> = vec![];
    let mut step = |name: &'static str, t: Instant| {
        let secs = t.elapsed().as_secs_f64();
        st.metrics.create_step_seconds.with_label_values(&[name]).observe(secs);
        timings.push((name, secs));
    };
    let retention_s = st.cfg.idempotency_retention_s;
    if let Some(k) = &spec.idempotency {
        if let Some(used) = idempotency::find(&st.db, user.id, &k.key, retention_s).await? {
            return replay(st, user, k, used).await;
        }
    }
    let validate::Valid { image, services, access, limits, idle_stop_after_s } = validate::validate(st, &spec)?;
    let gpu_model = spec.gpu_model.as_deref().map(str::trim);
    if spec.gpus > 0 {
        let total = gpus::largest_inventory(&st.db).await?;
        if i64::from(spec.gpus) > total {
            return Err(ApiError::Validation(format!(
                "{} GPUs requested, the largest host has {total}",
                spec.gpus
            )));
        }
    }

    let id = spec.id.clone();
    let password = crate::ids::secret();
    let token = crate::ids::secret();
    let service_names: Vec<String> = services.iter().map(|s| s.as_str().to_string()).collect();
    let name_services: Vec<Service> =
        services.iter().zip(&access).filter(|(_, a)| a.by_name()).map(|(s, _)| *s).collect();
    let name_service_names: Vec<String> = name_services.iter().map(|s| s.as_str().to_string()).collect();

    // Step 1: one transaction allocates everything, or nothing (one of this user's at a time
    // in this process: see `Operations::user_turn`).
    let t = Instant::now();
    let turn = st.ops.user_turn(user.id).await;
    let mut tx = st.db.begin().await?;
    // The user's row stays locked to the commit: their creates check and take quota one at a time.
    let usage = quotas::lock_usage(&mut tx, user.id).await?;
    let overrides = quotas::overrides(&mut tx, user.id).await?;
    let adds = quota::Adds { environments: 1, gpus: spec.gpus, running: 1 };
    if let Err(e) = quota::check(&user.name, &st.cfg.quotas, overrides, usage, adds) {
        st.metrics.creates.with_label_values(&["quota"]).inc();
        return Err(e);
    }
    let epoch = envs::insert_creating(
        &mut tx,
        &NewEnv {
            id: &id,
            owner_id: user.id,
            name: spec.name.trim(),
            image: &image,
            services: &service_names,
            name_services: &name_service_names,
            username: &st.cfg.docker.username,
            password: &password,
            jupyter_token: &token,
            ssh_public_keys: &spec.ssh_public_keys,
            gpu_count: spec.gpus,
            gpu_model,
            memory_mb: limits.memory_mb,
            cpus: limits.cpus,
            pids: limits.pids,
            idle_stop_after_s,
            instance: st.instance,
            // Set again below once placement has taken the GPUs.
            host: st.fleet.local_name(),
        },
    )
    .await?;
    if let Some(k) = &spec.idempotency {
        // A concurrent attempt with the same key that committed first makes this insert wait
        // for it and then find the key taken: answer with its environment.
        if !idempotency::record(&mut tx, user.id, &k.key, &k.request, &id, retention_s).await? {
            tx.rollback().await?;
            let used = idempotency::find(&st.db, user.id, &k.key, retention_s)
                .await?
                .ok_or_else(|| ApiError::Conflict("Idempotency-Key is in use by another request; try again".into()))?;
            return replay(st, user, k, used).await;
        }
    }
    // A service reached by name only holds no pool port (port 0 below).
    let mut allocated: Vec<(u16, Service)> = vec![];
    for (svc, how) in services.iter().zip(&access) {
        if !how.by_port() {
            allocated.push((0, *svc));
            continue;
        }
        match ports::allocate(&mut tx, *svc, &id).await? {
            Some(port) => allocated.push((port, *svc)),
            None => {
                tx.rollback().await?;
                st.metrics.allocation_failures.with_label_values(&[svc.as_str()]).inc();
                st.metrics.creates.with_label_values(&["pool_exhausted"]).inc();
                return Err(ApiError::PoolExhausted(*svc));
            }
        }
    }
    // Placement: the best host by policy whose GPUs can be taken now (rows another create
    // holds are skipped, so the next host is tried rather than waited for).
    let Some((host, gpu_list)) = crate::fleet::place(&mut tx, &id, spec.gpus, gpu_model, st.cfg.fleet.placement).await? else {
        tx.rollback().await?;
        if spec.gpus == 0 {
            st.metrics.creates.with_label_values(&["no_host"]).inc();
            return Err(ApiError::Unavailable(
                "no host can take a new environment now (every host is draining, disabled, down or full)".into(),
            ));
        }
        st.metrics.creates.with_label_values(&["gpus_unavailable"]).inc();
        let free = usize::try_from(gpus::most_free_on_a_host(&st.db, gpu_model).await.unwrap_or(0)).unwrap_or(0);
        let of = gpu_model.map(|m| format!(" of model \"{m}\"")).unwrap_or_default();
        let what = format!("{} GPUs{of} requested, {free} free on any one host", spec.gpus);
        return Err(gpus_unavailable(st, what, free, spec.gpus, gpu_model).await);
    };
    envs::set_host(&mut tx, &id, &host).await?;
    envs::set_gpus(&mut tx, &id, &gpu_list).await?;
    let detail = serde_json::json!({
        "ports": allocated.iter().filter(|(p, _)| *p != 0).map(|(p, s)| serde_json::json!({"port": p, "service": s.as_str()})).collect::<Vec<_>>(),
        "names": name_service_names,
        "gpus": gpu_list.iter().map(|g| g.request_id()).collect::<Vec<_>>(),
        "host": host,
        "image": image,
        "owner": user.name,
    });
    db::event(&mut *tx, Some(&id), "created", detail).await?;
    tx.commit().await?;
    drop(turn);
    step("database", t);
    st.metrics.placements.with_label_values(&[&host]).inc();
    tracing::info!(env_id = %id, host = %host, ports = ?allocated, gpus = ?gpu_list, "environment allocated");
    st.crash_point("after_allocate");

    // The host's engine and the image there, checked outside any transaction (a host that
    // hangs holds no database connection and no lock): an image that is not on that host is
    // a 422 naming it, and the allocation is given back.
    let dk = match host_with_image(st, &host, &image).await {
        Ok(dk) => dk,
        Err(e) => {
            st.metrics.creates.with_label_values(&["failed"]).inc();
            let reason = format!("create refused: {e}");
            if let Err(u) = forget_create(st, &id, epoch, false, &reason).await {
                tracing::error!(env_id = %id, error = %format!("{u:#}"), "giving back a refused create failed; the reconciler will");
                let _ = envs::release_claim(&st.db, &id, st.instance).await;
            }
            return Err(e);
        }
    };

    // From here on every failure, including an early `?`, undoes the steps before it.
    let mut container: Option<String> = None;
    let mut routed = false;
    let rest: Result<Wanted, ApiError> = async {
        // Step 2: the home volume, then Docker create.
        let t = Instant::now();
        dk.ensure_volume(&id).await.map_err(docker_error)?;
        let identity = host_identity(st, &id).await?;
        let account = account_login(st, user.id).await?;
        let ws = WorkspaceSpec {
            env_id: &id,
            image: &image,
            services: &allocated,
            gpus: &gpu_list,
            username: &st.cfg.docker.username,
            password: &password,
            jupyter_token: &token,
            ssh_public_keys: &spec.ssh_public_keys,
            ssh_host_key: &identity.private_key,
            ssh_host_cert: &identity.certificate,
            account: &account,
            limits,
        };
        let created = if st.fail_point("docker_create") {
            Err(DockerError::Create("fault injection: docker_create".into()))
        } else {
            dk.create(&ws).await
        };
        let c = created.map_err(docker_error)?;
        container = Some(c.clone());
        if !envs::set_container(st.db.pool(), &id, epoch, &c).await? {
            return Err(ClaimLost(id.clone()).into());
        }
        step("docker_create", t);
        st.crash_point("after_docker_create");

        // Step 3: Docker start, and read the published addresses back.
        let t = Instant::now();
        let upstreams = start_and_read(&dk, &c, &allocated).await?;
        step("docker_start", t);
        st.crash_point("after_docker_start");

        // Step 4: commit the routes and the running state; the publisher writes the slots.
        routed = true;
        commit_routes(st, &id, epoch, &c, &upstreams, &name_services).await
    }
    .await;
    let wanted = match rest {
        Ok(w) => w,
        Err(e) => return Err(fail_create(st, &dk, &id, epoch, container.as_deref(), routed, e).await),
    };
    let container = container.unwrap_or_default();
    let t = Instant::now();
    st.crash_point("after_routes_commit");
    let live = st.table.wait_live(&wanted.ports, &wanted.names, Duration::from_millis(st.cfg.route_wait_ms)).await;
    step("route_write", t);
    if !live {
        tracing::warn!(env_id = %id, "routes not live in the table within {} ms", st.cfg.route_wait_ms);
        let _ = st.db.event(Some(&id), "routes_not_live", serde_json::json!({"wait_ms": st.cfg.route_wait_ms})).await;
    }
    step("total", started);
    st.metrics.creates.with_label_values(&["ok"]).inc();
    let env = envs::get(st.db.pool(), &id, None).await?.ok_or_else(|| ApiError::env_not_found(&id))?;
    tracing::info!(env_id = %id, container = %container, "environment running");
    Ok(Outcome { env, routes_live: live, timings, replayed: false })
}

/// The answer to a create whose idempotency key was already used: the environment it made
/// (once that create has settled), or why there is none.
async fn replay(st: &State, user: &User, key: &IdempotencyKey, used: idempotency::Used) -> Result<Outcome, ApiError> {
    if used.request != key.request {
        return Err(ApiError::Validation(format!(
            "Idempotency-Key \"{}\" was used for a different request; use a new key",
            key.key
        )));
    }
    // A first attempt still in flight (here or in another process): wait for it to settle.
    let deadline = Instant::now() + Duration::from_secs(st.cfg.docker.call_timeout_s.max(1) * 3);
    loop {
        let env = envs::get(st.db.pool(), &used.env_id, Some(user.id)).await?.ok_or_else(|| {
            ApiError::Conflict(format!(
                "Idempotency-Key \"{}\" created environment {}, which has been deleted; use a new key",
                key.key, used.env_id
            ))
        })?;
        if env.status != Status::Creating || Instant::now() >= deadline {
            let routes_live = env.status == Status::Running;
            return Ok(Outcome { env, routes_live, timings: vec![], replayed: true });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The client of `host`'s engine, if `image` is there.
async fn host_with_image(st: &State, host: &str, image: &str) -> Result<DockerClient, ApiError> {
    let dk = st.fleet.client(host).await.map_err(|e| host_error(host, e))?;
    dk.image_exists(image).await.map_err(|e| host_error(host, e))?;
    Ok(dk)
}

/// Undoes a failed create in reverse and returns the error to report. If the undo itself
/// fails, the environment is left in `creating` without an operating instance, and the
/// reconciler finishes the undo.
async fn fail_create(
    st: &State,
    dk: &DockerClient,
    id: &str,
    epoch: i64,
    container: Option<&str>,
    routed: bool,
    err: ApiError,
) -> ApiError {
    st.metrics.creates.with_label_values(&["failed"]).inc();
    if !still_held(st, id, epoch).await {
        // Another process took the row over and undoes the create itself; what this one
        // made that nobody recorded is its own to remove (the container it created).
        tracing::warn!(env_id = %id, error = %err, "create failed after its claim was taken over; leaving the undo to the new owner");
        if let Some(c) = container {
            if let Err(e) = dk.remove(c).await {
                tracing::warn!(env_id = %id, container = %c, error = %e, "removing the fenced-off create's container failed; the reconciler will");
            }
        }
        return err;
    }
    tracing::warn!(env_id = %id, error = %err, "create failed; undoing");
    let reason = format!("create failed: {err}");
    if let Err(e) = undo_create(st, dk, id, epoch, container, routed, &reason).await {
        tracing::error!(env_id = %id, error = %format!("{e:#}"), "undo of a failed create failed; the reconciler will finish it");
        let _ = envs::release_claim(&st.db, id, st.instance).await;
    }
    err
}

/// Removes routes, then the container and the home volume, then releases ports (into
/// quarantine if routes were ever committed) and GPUs, and marks the environment deleted with
/// `reason`; every database step only while the claim of epoch `epoch` holds the row.
pub async fn undo_create(
    st: &State,
    dk: &DockerClient,
    id: &str,
    epoch: i64,
    container: Option<&str>,
    routed: bool,
    reason: &str,
) -> anyhow::Result<()> {
    let held = ports::env_ports(st.db.pool(), id).await?;
    let mut tx = begin_fenced(st, id, epoch).await?;
    let deleted = routes::delete_env(&mut *tx, id).await?;
    tx.commit().await?;
    let routed = routed || deleted > 0;
    if routed {
        let ports: Vec<u16> = held.iter().map(|(p, _)| *p).collect();
        st.table.wait_gone(&ports, id, Duration::from_millis(st.cfg.route_wait_ms)).await;
    }
    remove_containers(dk, id, container).await?;
    dk.remove_volume(id).await?;
    forget_create(st, id, epoch, routed, reason).await
}

/// The database half of undoing a create (nothing of it exists in Docker any more): releases
/// its ports (into quarantine if it was ever routed) and GPUs, forgets its idempotency key and
/// marks it deleted with `reason`, while the claim of epoch `epoch` holds the row.
async fn forget_create(st: &State, id: &str, epoch: i64, routed: bool, reason: &str) -> anyhow::Result<()> {
    let mut tx = begin_fenced(st, id, epoch).await?;
    let q = if routed { st.cfg.quarantine_s } else { 0 };
    let released = ports::release_env(&mut *tx, id, q).await?;
    gpus::release_env(&mut *tx, id).await?;
    idempotency::forget_env(&mut *tx, id).await?;
    envs::settle(&mut *tx, id, epoch, Status::Deleted, Some(reason), None).await?;
    db::event(&mut *tx, Some(id), "create_undone", serde_json::json!({"ports_released": released, "reason": reason})).await?;
    tx.commit().await?;
    Ok(())
}
