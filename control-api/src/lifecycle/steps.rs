//! The steps the lifecycle operations share: claims and the fence that keeps a taken-over
//! operation from writing, the errors each step answers with, Docker create-and-read, routes
//! committed and waited for, containers removed, a new container's SSH identity and account
//! keys.

use std::net::SocketAddr;
use std::time::Duration;

use gpugate_routes::{EnvId, Route, Service};

use crate::db::envs::{self, EnvRow, Status};
use crate::db::{self, gpus, readiness, routes, users::User, Tx};
use crate::docker::{AccountLogin, DockerClient, DockerError};
use crate::error::ApiError;
use crate::key_sync;
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
pub(super) async fn still_held(st: &State, id: &str, epoch: i64) -> bool {
    matches!(envs::get(st.db.pool(), id, None).await, Ok(Some(e)) if e.op_epoch == Some(epoch))
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
pub(super) async fn gpus_unavailable(st: &State, what: String, free: usize, needed: u32, model: Option<&str>) -> ApiError {
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

pub(super) fn docker_error(e: DockerError) -> ApiError {
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
pub(super) fn step_error(what: &str, e: anyhow::Error) -> ApiError {
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

pub(super) async fn start_and_read(
    dk: &DockerClient,
    container: &str,
    allocated: &[(u16, Service)],
) -> Result<Vec<(u16, Service, SocketAddr)>, ApiError> {
    dk.start(container).await.map_err(docker_error)?;
    dk.upstreams(container, allocated).await.map_err(docker_error)
}

/// A host that cannot be reached or lacks the image, as the client sees it.
pub(super) fn host_error(host: &str, e: DockerError) -> ApiError {
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
pub(super) async fn commit_routes(
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
    envs::settle(&mut *tx, id, epoch, Status::Running, None, Some(container)).await?;
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

/// Removes the environment's container: the known id, and any other container labelled with
/// the environment (a crash between create and recording the id).
pub(super) async fn remove_containers(dk: &DockerClient, id: &str, known: Option<&str>) -> Result<(), DockerError> {
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
    Ok(key_sync::current(st, owner).await?)
}

/// Claims an environment for an operation, or explains why not (404 / 409).
pub(super) async fn claim(st: &State, user: &User, id: &str, from: &[Status], to: Status, verb: &str) -> Result<EnvRow, ApiError> {
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

/// After an environment's routes left the database: waits (each step up to `route_wait_ms`)
/// until the table no longer routes its ports to it, then until the sessions the publisher
/// revoked with the removal are closed — a close from the gateway for the client, before the
/// container is stopped or removed (`doing`, for the log). Goes on anyway after a time-out.
pub(super) async fn wait_cut_off(st: &State, env_id: &str, held: &[u16], names: &[Service], doing: &str) {
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
