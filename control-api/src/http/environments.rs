//! `/api/v1/environments`: create, list, show, access, stop, start, delete.
//!
//! The handlers only: request types are in `environment_requests.rs`, answers in
//! `environment_views.rs`.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest, Sha256};

use super::environment_requests::{wait_of, CreateEnvironment, PatchEnvironment, StartEnvironment, Wait, WaitQuery};
use super::environment_views::{access, view, view_knowing, Access, Deleted, EnvironmentView};
use super::extract::{Body, Caller, IdPath, OptionalBody, QueryOf};
use crate::db::envs::{self, EnvRow, Status};
use crate::error::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope, Success};
use crate::lifecycle::{self, CreateSpec, IdempotencyKey};
use crate::state::{AppState, State as AppInner};

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/environments", post(create_environment).get(list_environments))
        .route(
            "/api/v1/environments/{id}",
            get(get_environment).patch(patch_environment).delete(delete_environment),
        )
        .route("/api/v1/environments/{id}/access", get(get_access))
        .route("/api/v1/environments/{id}/stop", post(stop_environment))
        .route("/api/v1/environments/{id}/start", post(start_environment))
        .route("/api/v1/environments/{id}/sessions/close", post(close_sessions))
}

async fn find(st: &AppInner, caller: &Caller, id: &str) -> Result<EnvRow, ApiError> {
    if id.parse::<gpugate_routes::EnvId>().is_err() {
        return Err(ApiError::env_not_found(id));
    }
    envs::get(st.db.pool(), id, Some(caller.0.id)).await?.ok_or_else(|| ApiError::env_not_found(id))
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap, req: &CreateEnvironment) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::Validation("Idempotency-Key must be 1 to 255 visible ASCII characters".into())
        })?;
    let body = serde_json::to_vec(req).map_err(|e| ApiError::internal("request digest", e))?;
    Ok(Some(IdempotencyKey { key: key.to_string(), request: Sha256::digest(&body).to_vec() }))
}

#[utoipa::path(
    post,
    path = "/api/v1/environments",
    tag = "environments",
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, pattern = "^[!-~]{1,255}$",
        description = "1 to 255 visible ASCII characters; a retry with the same key and body answers with the environment the first request made"),
        WaitQuery,
    ),
    request_body = CreateEnvironment,
    responses(
        (status = 201, description = "Created (or replayed: header `Idempotent-Replayed: true`); the environment with its ports and access information.",
            body = Envelope<EnvironmentView>,
            headers(("Idempotent-Replayed" = String, description = "`true` when the answer replays an earlier create with the same `Idempotency-Key`"))),
        (status = 400, description = "Malformed JSON or wrong content type (code 1001).", body = ErrorEnvelope),
        (status = 409, description = "More GPUs than are free (code 1008, `data` says how many), a quota (code 1011), or an `Idempotency-Key` whose environment was deleted (code 1006).", body = ErrorEnvelope),
        (status = 413, description = "Request body over 2 MiB (code 1013).", body = ErrorEnvelope),
        (status = 422, description = "A field missing, unknown or invalid, or an `Idempotency-Key` reused with another body (code 1002); the image not on the Docker host (code 1007).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/environments` → 201 with the environment and its access information. With
/// an `Idempotency-Key` already used by this caller: the environment that key created (same
/// id and ports), with `Idempotent-Replayed: true`. The create runs to completion even if the
/// client goes away.
async fn create_environment(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    QueryOf(query): QueryOf<WaitQuery>,
    Body(mut req): Body<CreateEnvironment>,
) -> Result<Response, ApiError> {
    // Taken out before the idempotency digest is made.
    let wait = wait_of(query.wait, req.wait.take())?;
    let idempotency = idempotency_key(&headers, &req)?;
    let spec = CreateSpec {
        id: crate::ids::env_id(),
        idempotency,
        name: req.name,
        image: req.image,
        gpus: req.gpus.unwrap_or(0),
        gpu_model: req.gpu_model,
        services: req.services,
        ssh_public_keys: req.ssh_public_keys.unwrap_or_default(),
        memory_mb: req.memory_mb,
        cpus: req.cpus,
        pids: req.pids,
        idle_stop_after_s: req.idle_stop_after_s,
        access: req.access,
    };
    let (st2, user, id) = (st.clone(), caller.0.clone(), spec.id.clone());
    let out = st.ops.run(&id, async move { lifecycle::create(&st2, &user, spec).await }).await?;
    let replayed = out.replayed;
    let env = settle_wait(&st, out.env, wait).await?;
    let body = Success(StatusCode::CREATED, view(&st, env, Some(out.routes_live)).await?);
    let mut resp = body.into_response();
    if replayed {
        resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(resp)
}

#[utoipa::path(
    get,
    path = "/api/v1/environments",
    tag = "environments",
    responses((status = 200, description = "The caller's environments (deleted ones excluded).", body = Envelope<Vec<EnvironmentView>>)),
)]
/// `GET /api/v1/environments` → the caller's environments.
async fn list_environments(State(st): State<AppState>, caller: Caller) -> ApiResult<Vec<EnvironmentView>> {
    let listed = envs::list(&st.db, caller.0.id).await?;
    let running = listed.iter().any(|e| e.status == Status::Running);
    let unknown = running && crate::idle::activity_unknown(&st).await?;
    let mut out = vec![];
    for env in listed {
        out.push(view_knowing(&st, env, None, unknown).await?);
    }
    Ok(ok(out))
}

#[utoipa::path(
    get,
    path = "/api/v1/environments/{id}",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "The environment, with `activity` and `idle_seconds`.", body = Envelope<EnvironmentView>),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
    ),
)]
/// `GET /api/v1/environments/{id}`.
async fn get_environment(State(st): State<AppState>, caller: Caller, IdPath(id): IdPath) -> ApiResult<EnvironmentView> {
    let env = find(&st, &caller, &id).await?;
    Ok(ok(view(&st, env, None).await?))
}

#[utoipa::path(
    get,
    path = "/api/v1/environments/{id}/access",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "How to reach each of the environment's services.", body = Envelope<Access>),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
    ),
)]
/// `GET /api/v1/environments/{id}/access` → the seed's access shape.
async fn get_access(State(st): State<AppState>, caller: Caller, IdPath(id): IdPath) -> ApiResult<Access> {
    let env = find(&st, &caller, &id).await?;
    Ok(ok(access(&st, env).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/environments/{id}/stop",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "Stopped: routes disabled, container stopped, GPUs given back; ports and home volume kept.", body = Envelope<EnvironmentView>),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
        (status = 409, description = "Not running, or another operation on it is in progress (code 1006).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/environments/{id}/stop`.
async fn stop_environment(State(st): State<AppState>, caller: Caller, IdPath(id): IdPath) -> ApiResult<EnvironmentView> {
    // Ownership first: another user's id is a 404, never a "busy" that tells it exists (or
    // that blocks its owner's own operation while the refusal runs).
    find(&st, &caller, &id).await?;
    let (st2, user, id2) = (st.clone(), caller.0.clone(), id.clone());
    let out = st.ops.run(&id, async move { lifecycle::stop(&st2, &user, &id2).await }).await?;
    Ok(ok(view(&st, out.env, None).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/environments/{id}/start",
    tag = "environments",
    params(
        ("id" = String, Path, description = "The environment's id (another user's is unknown: 404)."),
        WaitQuery,
    ),
    request_body(content = Option<StartEnvironment>, description = "Optional: `{\"wait\": \"ready\"}`, like `?wait=ready`."),
    responses(
        (status = 200, description = "Running again: GPUs allocated, a new container on the same home volume, same ports.", body = Envelope<EnvironmentView>),
        (status = 400, description = "A body that is not JSON, or has the wrong content type (code 1001).", body = ErrorEnvelope),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
        (status = 413, description = "Request body over 2 MiB (code 1013).", body = ErrorEnvelope),
        (status = 422, description = "An unknown `wait`, or different values in query and body (code 1002).", body = ErrorEnvelope),
        (status = 409, description = "Not stopped or busy (code 1006), too few free GPUs (code 1008, `data` says how many), or a quota (code 1011).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/environments/{id}/start` (`?wait=ready`, or an optional body
/// `{"wait": "ready"}`).
async fn start_environment(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    QueryOf(query): QueryOf<WaitQuery>,
    OptionalBody(body): OptionalBody<StartEnvironment>,
) -> ApiResult<EnvironmentView> {
    let wait = wait_of(query.wait, body.and_then(|b| b.wait))?;
    // Ownership first: another user's id is a 404, never a "busy" that tells it exists (or
    // that blocks its owner's own operation while the refusal runs).
    find(&st, &caller, &id).await?;
    let (st2, user, id2) = (st.clone(), caller.0.clone(), id.clone());
    let out = st.ops.run(&id, async move { lifecycle::start(&st2, &user, &id2).await }).await?;
    let env = settle_wait(&st, out.env, wait).await?;
    Ok(ok(view(&st, env, Some(out.routes_live)).await?))
}

/// For `wait: ready`: waits until every service of a running `env` is ready or past its
/// deadline, and returns the environment as it is then; otherwise `env` as it is.
async fn settle_wait(st: &AppInner, env: EnvRow, wait: Wait) -> Result<EnvRow, ApiError> {
    if wait != Wait::Ready || env.status != Status::Running {
        return Ok(env);
    }
    let limit = st.readiness.wait_limit(&env.services);
    st.readiness.wait_decided(&env.id, limit).await?;
    Ok(envs::get(st.db.pool(), &env.id, None).await?.unwrap_or(env))
}

#[utoipa::path(
    delete,
    path = "/api/v1/environments/{id}",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "Deleted: routes, container and home volume removed, ports in quarantine.", body = Envelope<Deleted>),
        (status = 404, description = "Unknown environment, or deleted already (code 1005).", body = ErrorEnvelope),
        (status = 409, description = "Another operation on it is in progress (code 1006).", body = ErrorEnvelope),
    ),
)]
/// `DELETE /api/v1/environments/{id}` → the environment, status `deleted`.
async fn delete_environment(State(st): State<AppState>, caller: Caller, IdPath(id): IdPath) -> ApiResult<Deleted> {
    // Ownership first: another user's id is a 404, never a "busy" that tells it exists (or
    // that blocks its owner's own operation while the refusal runs).
    find(&st, &caller, &id).await?;
    let (st2, user, id2) = (st.clone(), caller.0.clone(), id.clone());
    let env = st.ops.run(&id, async move { lifecycle::delete(&st2, &user, &id2).await }).await?;
    Ok(ok(Deleted { id: env.id, status: env.status }))
}

#[utoipa::path(
    patch,
    path = "/api/v1/environments/{id}",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    request_body = PatchEnvironment,
    responses(
        (status = 200, description = "The environment with its new idle limit.", body = Envelope<EnvironmentView>),
        (status = 400, description = "Malformed JSON or wrong content type (code 1001).", body = ErrorEnvelope),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
        (status = 413, description = "Request body over 2 MiB (code 1013).", body = ErrorEnvelope),
        (status = 422, description = "A field missing, unknown or invalid; a limit over the deployment's maximum (code 1002).", body = ErrorEnvelope),
    ),
)]
/// `PATCH /api/v1/environments/{id}`: changes the idle limit.
async fn patch_environment(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
    Body(req): Body<PatchEnvironment>,
) -> ApiResult<EnvironmentView> {
    let env = lifecycle::sessions::set_idle_limit(&st, &caller.0, &id, req.idle_stop_after_s).await?;
    Ok(ok(view(&st, env, None).await?))
}

#[utoipa::path(
    post,
    path = "/api/v1/environments/{id}/sessions/close",
    tag = "environments",
    params(("id" = String, Path, description = "The environment's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "The close is recorded once for the fleet; `gateways` says how many fresh gateways applied it to their table, `applied` whether all did.", body = Envelope<lifecycle::sessions::SessionsClosed>),
        (status = 404, description = "Unknown environment (code 1005).", body = ErrorEnvelope),
        (status = 409, description = "Not running (code 1006).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/environments/{id}/sessions/close` (owner or admin): closes every session
/// open now through the gateway; the environment keeps running and new sessions work.
async fn close_sessions(
    State(st): State<AppState>,
    caller: Caller,
    IdPath(id): IdPath,
) -> ApiResult<lifecycle::sessions::SessionsClosed> {
    Ok(ok(lifecycle::sessions::close(&st, &caller.0, &id).await?))
}
