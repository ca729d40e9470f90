//! Environment lifecycle: create, stop, start, delete. Each step is undone in reverse when a
//! later one fails; routes are removed before a container is stopped or removed; released
//! ports go into quarantine. Every environment has a home volume, made before its first
//! container and removed after its last.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gpugate_routes::{EnvId, Route, Service};

pub mod hold;
mod quota;
pub mod sessions;
mod stop_start;
mod validate;

pub use stop_start::{start, stop, stop_env, undo_start};

use crate::db::envs::{self, status, EnvRow, NewEnv};
use crate::db::{self, account_keys, gpus, hosts, idempotency, ports, quotas, readiness, routes, users::User, Tx};
use crate::docker::{AccountLogin, DockerClient, DockerError, WorkspaceSpec};
use crate::error::ApiError;
use crate::ssh_identity;
use crate::state::State;

/// An operation's claim on its environment row was taken over by another process (its
/// liveness lock was lost meanwhile): the operation changes nothing more.
#[derive(Debug, thiserror::Error)]
#[error("environment {0} was taken over by another process while this operation ran; this operation changed nothing more")]
pub struct ClaimLost(pub String);

impl From<ClaimLost> for ApiError {
    fn from(e: ClaimLost) -> Self {
        tracing::warn!(error = %e, "operation fenced off");
        ApiError::Unavailable(e.to_string())
    }
}

/// Why a fenced transaction could not begin: the claim is gone, or the database did not
/// answer. Kept apart so that an operation can tell a take-over from an outage.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FenceError {
    #[error(transparent)]
    Lost(#[from] ClaimLost),
    #[error("the database is unavailable: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<FenceError> for ApiError {
    fn from(e: FenceError) -> Self {
        match e {
            FenceError::Lost(lost) => lost.into(),
            FenceError::Db(db) => db.into(),
        }
    }
}

/// Whether `e` (from an operation's steps) says its claim was taken over.
pub(crate) fn claim_lost(e: &anyhow::Error) -> bool {
    e.is::<ClaimLost>() || matches!(e.downcast_ref::<FenceError>(), Some(FenceError::Lost(_)))
}

/// Starts a transaction that holds the row of environment `id` while the claim of epoch
/// `epoch` is still its claim (see `envs::hold`); every write an operation makes after its
/// claim goes through one.
pub(crate) async fn begin_fenced(st: &State, id: &str, epoch: i64) -> Result<Tx<'static>, FenceError> {
    let mut tx = st.db.begin().await?;
    if !envs::hold(&mut tx, id, epoch).await? {
        return Err(ClaimLost(id.to_string()).into());
    }
    Ok(tx)
}

/// Whether the claim of epoch `epoch` still holds environment `id` (read once; for deciding
/// whether a failed operation may undo its steps).
async fn still_held(st: &State, id: &str, epoch: i64) -> bool {
    matches!(envs::get(st.db.pool(), id, None).await, Ok(Some(e)) if e.op_epoch == Some(epoch))
}

/// A create request (validated by [`create`]).
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// The new environment's id, drawn before the operation starts (it names the operation).
    pub id: String,
    /// `Idempotency-Key` and the digest of the request it came with.
    pub idempotency: Option<IdempotencyKey>,
    pub name: String,
    pub image: Option<String>,
    pub gpus: u32,
    /// Part of the GPU model name the GPUs must have (e.g. `A100`, case-insensitive).
    pub gpu_model: Option<String>,
    pub services: Option<Vec<String>>,
    pub ssh_public_keys: Vec<String>,
    /// Memory limit in MiB (default and maximum from configuration).
    pub memory_mb: Option<u64>,
    /// CPU limit in cores.
    pub cpus: Option<f64>,
    /// Process limit.
    pub pids: Option<u32>,
    /// Seconds of inactivity after which the workspace stops (default from configuration).
    pub idle_stop_after_s: Option<u64>,
    /// How each service is reached (`ports`, `hostname`, `both`); default from `[names]`.
    pub access: Option<std::collections::BTreeMap<String, crate::config::AccessMode>>,
}

/// An `Idempotency-Key` header value and the digest of its request.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// The key, 1 to 255 printable ASCII characters.
    pub key: String,
    /// SHA-256 of the request body's fields.
    pub request: Vec<u8>,
}

/// What a create, start or stop settled on.
#[derive(Debug)]
pub struct Outcome {
    /// The environment row after the operation.
    pub env: EnvRow,
    /// Whether the routes were seen live in the table within the wait (creates and starts).
    pub routes_live: bool,
    /// Seconds spent per step (`database`, `docker_create`, `docker_start`, `route_write`,
    /// `total`); creates only.
    pub timings: Vec<(&'static str, f64)>,
    /// A create answered from its `Idempotency-Key`: the environment an earlier attempt made.
    pub replayed: bool,
}

/// 409 (code 1008): `what` was refused for want of GPUs (`free` of the `needed`, of `model`
/// when one was asked for). For a model, the message and `data` also say what is free, per
/// model. Called after the allocation's transaction rolled back.
async fn gpus_unavailable(st: &State, what: String, free: usize, needed: u32, model: Option<&str>) -> ApiError {
    let free = u32::try_from(free).unwrap_or(u32::MAX);
    let Some(model) = model else {
        return ApiError::GpusUnavailable { message: what, free, needed, model: None };
    };
    let by_model = gpus::free_by_model(st.db.pool()).await.unwrap_or_default();
    let listed = if by_model.is_empty() {
        "none".to_string()
    } else {
        by_model
            .iter()
            .map(|(name, n)| format!("{} ({n})", if name.is_empty() { "unknown model" } else { name }))
            .collect::<Vec<_>>()
            .join(", ")
    };
    ApiError::GpusUnavailable {
        message: format!("{what}; free now: {listed}"),
        free,
        needed,
        model: Some((model.to_string(), by_model)),
    }
}

fn docker_error(e: DockerError) -> ApiError {
    match e {
        DockerError::ImageMissing(image) => ApiError::ImageNotFound(image),
        DockerError::Connect(_) | DockerError::Timeout(_) | DockerError::WrongEngine(_) => {
            tracing::error!(error = %e, "Docker unavailable");
            ApiError::Unavailable("Docker is unavailable".into())
        }
        DockerError::Busy(_) => {
            tracing::warn!(error = %e, "Docker busy");
            ApiError::Unavailable(format!("{e}; try again"))
        }
        other => ApiError::internal("Docker error", other),
    }
}

/// What a stop or delete that failed after its claim answers (`what`: the operation): the
/// claim taken over, the database or the host's engine not answering, is a 503 (the
/// reconciler finishes the operation); anything else a 500.
fn step_error(what: &str, e: anyhow::Error) -> ApiError {
    let e = match e.downcast::<ClaimLost>() {
        Ok(lost) => return lost.into(),
        Err(e) => e,
    };
    let e = match e.downcast::<FenceError>() {
        Ok(fence) => return fence.into(),
        Err(e) => e,
    };
    // Already an answer (a fenced transaction that found its claim gone, or the database
    // unavailable when it began).
    let e = match e.downcast::<ApiError>() {
        Ok(answer) => return answer,
        Err(e) => e,
    };
    let e = match e.downcast::<sqlx::Error>() {
        Ok(db) => return ApiError::from(db),
        Err(e) => e,
    };
    match e.downcast::<DockerError>() {
        Ok(d @ (DockerError::Connect(_) | DockerError::Timeout(_) | DockerError::WrongEngine(_))) => {
            tracing::error!(error = %d, "{what}: the host's engine is unavailable; the reconciler finishes it");
            ApiError::Unavailable(format!("the host's Docker engine is unavailable; the {what} finishes once it answers"))
        }
        Ok(d @ DockerError::Busy(_)) => {
            tracing::warn!(error = %d, "{what}: the host's engine is still busy; the reconciler finishes it");
            ApiError::Unavailable(format!("{d}; the {what} finishes once the engine is done with it"))
        }
        Ok(d) => ApiError::internal(what, d),
        Err(e) => ApiError::internal(what, format!("{e:#}")),
    }
}

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
        if env.status != status::CREATING || Instant::now() >= deadline {
            let routes_live = env.status == status::RUNNING;
            return Ok(Outcome { env, routes_live, timings: vec![], replayed: true });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_and_read(
    dk: &DockerClient,
    container: &str,
    allocated: &[(u16, Service)],
) -> Result<Vec<(u16, Service, SocketAddr)>, ApiError> {
    dk.start(container).await.map_err(docker_error)?;
    dk.upstreams(container, allocated).await.map_err(docker_error)
}

/// The client of `host`'s engine, if `image` is there.
async fn host_with_image(st: &State, host: &str, image: &str) -> Result<DockerClient, ApiError> {
    let dk = st.fleet.client(host).await.map_err(|e| host_error(host, e))?;
    dk.image_exists(image).await.map_err(|e| host_error(host, e))?;
    Ok(dk)
}

/// A host that cannot be reached or lacks the image, as the client sees it.
fn host_error(host: &str, e: DockerError) -> ApiError {
    match e {
        DockerError::ImageMissing(image) => ApiError::ImageNotFound(image),
        DockerError::Connect(_) | DockerError::Timeout(_) | DockerError::Busy(_) => {
            tracing::error!(host, error = %e, "host's Docker engine unavailable");
            ApiError::Unavailable(format!("host {host} is unavailable; try again"))
        }
        DockerError::WrongEngine(_) => {
            tracing::error!(host, error = %e, "refusing to act for a host whose engine is another");
            ApiError::Unavailable(format!("host {host} is unavailable from this API instance; try again"))
        }
        other => ApiError::internal("Docker error", other),
    }
}

/// The routes the table must hold after a commit: by port, and by name.
pub(crate) struct Wanted {
    pub ports: Vec<(u16, Route)>,
    pub names: Vec<Route>,
}

/// The services of an environment row reachable by name.
pub(crate) fn name_services(env: &crate::db::envs::EnvRow) -> Vec<Service> {
    env.name_services.iter().filter_map(|s| s.parse().ok()).collect()
}

/// Commits routes with a new generation (a port route for each service with a pool port, a
/// name route for each of `names`) and marks the environment running, starts the readiness
/// probes of its services; returns the routes the table must then hold.
async fn commit_routes(
    st: &State,
    id: &str,
    epoch: i64,
    container: &str,
    upstreams: &[(u16, Service, SocketAddr)],
    names: &[Service],
) -> Result<Wanted, ApiError> {
    if st.fail_point("route_write") {
        return Err(ApiError::internal("route write", "fault injection: route_write"));
    }
    st.pause_point("before_routes_commit").await;
    let env_id: EnvId = id.parse().map_err(|e| ApiError::internal("environment id", e))?;
    let mut tx = begin_fenced(st, id, epoch).await?;
    let generation = envs::next_generation(&mut tx, id).await?;
    if let Some(port) = routes::put(&mut tx, id, generation, upstreams, names).await? {
        // The port is another environment's: never a silent skip (that other tenant would
        // keep a route this operation believes is its own). The operation is undone.
        return Err(ApiError::internal(
            "route write",
            format!("port {port} is routed to another environment; environment {id} cannot take it"),
        ));
    }
    let deadlines: Vec<(&str, u64)> =
        upstreams.iter().map(|(_, s, _)| (s.as_str(), st.cfg.readiness.deadline_s(*s))).collect();
    readiness::reset(&mut tx, id, generation, &deadlines, st.instance).await?;
    envs::settle(&mut *tx, id, epoch, status::RUNNING, None, Some(container)).await?;
    let detail = serde_json::json!({
        "container": container,
        "generation": generation,
        "routes": upstreams.iter().map(|(p, s, u)| serde_json::json!({"port": p, "service": s.as_str(), "upstream": u.to_string()})).collect::<Vec<_>>(),
        "names": names.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    });
    db::event(&mut *tx, Some(id), "container_started", detail).await?;
    tx.commit().await?;
    // Each service is probed at its published address until it answers (crate::readiness).
    let targets: Vec<(Service, SocketAddr)> = upstreams.iter().map(|(_, s, u)| (*s, *u)).collect();
    st.readiness.spawn(id, generation, &targets);
    let generation = u64::try_from(generation).unwrap_or(0);
    let route = |service: Service, upstream: SocketAddr| Route { upstream, env_id, service, generation, expires_ms: None };
    Ok(Wanted {
        ports: upstreams.iter().filter(|(p, _, _)| *p != 0).map(|(p, s, u)| (*p, route(*s, *u))).collect(),
        names: upstreams.iter().filter(|(_, s, _)| names.contains(s)).map(|(_, s, u)| route(*s, *u)).collect(),
    })
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
    envs::settle(&mut *tx, id, epoch, status::DELETED, Some(reason), None).await?;
    db::event(&mut *tx, Some(id), "create_undone", serde_json::json!({"ports_released": released, "reason": reason})).await?;
    tx.commit().await?;
    Ok(())
}

/// Removes the environment's container: the known id, and any other container labelled with
/// the environment (a crash between create and recording the id).
async fn remove_containers(dk: &DockerClient, id: &str, known: Option<&str>) -> Result<(), DockerError> {
    if let Some(c) = known {
        dk.remove(c).await?;
    }
    for c in dk.list_managed().await?.into_iter().filter(|c| c.env_id == id) {
        dk.remove(&c.id).await?;
    }
    Ok(())
}

/// The SSH host key a new container of environment `id` gets (the same for its whole life),
/// with a fresh certificate from the deployment's CA naming its SSH host name.
pub(crate) async fn host_identity(st: &State, id: &str) -> Result<ssh_identity::HostIdentity, ApiError> {
    let principal = format!("{id}.ssh.{}", st.cfg.domain);
    match ssh_identity::for_container(&st.db, &st.host_ca, id, &principal).await {
        Ok(Some(identity)) => Ok(identity),
        Ok(None) => Err(ApiError::env_not_found(id)),
        Err(ssh_identity::IdentityError::Db(e)) => Err(e.into()),
        Err(e) => Err(ApiError::internal("SSH host identity", e)),
    }
}

/// The owner's account keys and password setting a new container starts with (later changes
/// reach it by [`crate::key_sync`]).
pub(crate) async fn account_login(st: &State, owner: i64) -> Result<AccountLogin, ApiError> {
    let (generation, keys) = account_keys::current(st.db.pool(), owner).await?;
    let password_login = st.cfg.docker.password_login.allows(keys.len());
    Ok(AccountLogin { generation, keys, password_login })
}

/// Claims an environment for an operation, or explains why not (404 / 409).
async fn claim(st: &State, user: &User, id: &str, from: &[&str], to: &str, verb: &str) -> Result<EnvRow, ApiError> {
    if id.parse::<EnvId>().is_err() {
        return Err(ApiError::env_not_found(id));
    }
    if let Some(env) = envs::claim(&st.db, id, Some(user.id), from, to, st.instance).await? {
        return Ok(env);
    }
    match envs::get(st.db.pool(), id, Some(user.id)).await? {
        None => Err(ApiError::env_not_found(id)),
        Some(env) if env.op_instance.is_some() => Err(ApiError::Conflict(format!(
            "environment {id} is busy ({}); try again",
            env.status
        ))),
        Some(env) => Err(ApiError::Conflict(format!("cannot {verb} environment {id}: it is {}", env.status))),
    }
}

/// Deletes an environment: routes first, then the container, then its home volume, then
/// ports into quarantine.
pub async fn delete(st: &State, user: &User, id: &str) -> Result<EnvRow, ApiError> {
    let started = Instant::now();
    let from = [status::RUNNING, status::STOPPED, status::FAILED, status::CREATING, status::UNREACHABLE, status::STOPPING];
    let env = match claim(st, user, id, &from, status::DELETING, "delete").await {
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
            env.status = status::DELETED.into();
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

/// After an environment's routes left the database: waits (each step up to `route_wait_ms`)
/// until the table no longer routes its ports to it, then until the sessions the publisher
/// revoked with the removal are closed — a close from the gateway for the client, before the
/// container is stopped or removed (`doing`, for the log). Goes on anyway after a time-out.
async fn wait_cut_off(st: &State, env_id: &str, held: &[u16], names: &[Service], doing: &str) {
    let wait = Duration::from_millis(st.cfg.route_wait_ms);
    let late = if !st.table.wait_gone(held, env_id, wait).await {
        "routes still in the table"
    } else if !st.table.wait_names_gone(env_id, names, wait).await {
        "name routes still in the table"
    } else if !st.table.wait_sessions_closed(held, wait).await {
        "sessions still open after the revoke"
    } else {
        return;
    };
    tracing::warn!(env_id = %env_id, "{late} after {} ms; {doing} the container anyway", st.cfg.route_wait_ms);
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
    envs::settle(&mut *tx, &env.id, epoch, status::DELETED, None, None).await?;
    db::event(&mut *tx, Some(&env.id), "deleted", serde_json::json!({"ports_quarantined": released, "container": env.container_id})).await?;
    tx.commit().await?;
    tracing::info!(env_id = %env.id, ports = ?released, "environment deleted");
    Ok(())
}
