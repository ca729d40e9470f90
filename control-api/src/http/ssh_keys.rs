//! `/api/v1/users/me/ssh-keys`: the caller's account keys. Every workspace of theirs accepts
//! them besides the keys named at its create; an add or a removal reaches their running
//! workspaces within seconds, without a restart ([`crate::key_sync`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::Router;
use serde::{Deserialize, Serialize};

use super::extract::{Body, Caller};
use crate::db::account_keys::{self, AccountKey, Added};
use crate::error::{ok, ApiError, ApiResult, Envelope, ErrorEnvelope, Success};
use crate::key_sync;
use crate::ssh_public_key;
use crate::state::AppState;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/users/me/ssh-keys", get(list_ssh_keys).post(add_ssh_key))
        .route("/api/v1/users/me/ssh-keys/{key_id}", delete(remove_ssh_key))
}

/// The caller's account keys and what they mean for password login.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccountKeys {
    /// Oldest first.
    pub keys: Vec<AccountKey>,
    /// Whether the caller's workspaces take the password over SSH now (the deployment's
    /// `password_login`: `auto` turns it off once there is a key).
    pub password_login: bool,
}

/// Body of `POST /api/v1/users/me/ssh-keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMsPYWUBvbtIOCU/jWO+Z73Es8vVe17lnQeHcpNTgfNn me@laptop", "name": "laptop"}))]
pub struct AddSshKey {
    /// One OpenSSH public key line (the contents of `~/.ssh/id_ed25519.pub`): Ed25519, ECDSA,
    /// their security-key forms, or RSA of at least 3072 bits.
    pub public_key: String,
    /// A label (1-64 characters); default: the key's comment.
    pub name: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/users/me/ssh-keys",
    tag = "users",
    responses((status = 200, description = "The caller's account keys.", body = Envelope<AccountKeys>)),
)]
/// `GET /api/v1/users/me/ssh-keys`: the caller's account keys.
async fn list_ssh_keys(State(st): State<AppState>, caller: Caller) -> ApiResult<AccountKeys> {
    let keys = account_keys::list(&st.db, caller.0.id).await?;
    let password_login = st.cfg.docker.password_login.allows(keys.len());
    Ok(ok(AccountKeys { keys, password_login }))
}

#[utoipa::path(
    post,
    path = "/api/v1/users/me/ssh-keys",
    tag = "users",
    request_body = AddSshKey,
    responses(
        (status = 201, description = "The key, added: the caller's running workspaces accept it within seconds.", body = Envelope<AccountKey>),
        (status = 200, description = "The caller has this key already (same fingerprint): the key as it is, nothing changed.", body = Envelope<AccountKey>),
        (status = 400, description = "Malformed JSON or wrong content type (code 1001).", body = ErrorEnvelope),
        (status = 409, description = "The caller has the most keys allowed (code 1011).", body = ErrorEnvelope),
        (status = 413, description = "Request body over 2 MiB (code 1013).", body = ErrorEnvelope),
        (status = 422, description = "Not a public key, a private key, a weak or unsupported one (the message says which), or a bad name (code 1002).", body = ErrorEnvelope),
    ),
)]
/// `POST /api/v1/users/me/ssh-keys`: adds an account key.
async fn add_ssh_key(State(st): State<AppState>, caller: Caller, Body(req): Body<AddSshKey>) -> Result<Success<AccountKey>, ApiError> {
    let vetted = ssh_public_key::vet(&req.public_key).map_err(ApiError::Validation)?;
    let name = ssh_public_key::vet_name(req.name.as_deref().unwrap_or(&vetted.comment)).map_err(ApiError::Validation)?;
    match account_keys::add(&st.db, caller.0.id, &name, &vetted.key, &vetted.fingerprint).await? {
        Added::Key(key) => {
            tracing::info!(user = %caller.0.name, fingerprint = %key.fingerprint, "account key added");
            key_sync::spawn_for_user(&st, caller.0.id);
            Ok(Success(StatusCode::CREATED, key))
        }
        Added::Duplicate(key) => Ok(ok(key)),
        Added::Full => Err(ApiError::QuotaExceeded(format!(
            "at most {} account keys per user; remove one first",
            account_keys::MAX_PER_USER
        ))),
    }
}

#[utoipa::path(
    delete,
    path = "/api/v1/users/me/ssh-keys/{key_id}",
    tag = "users",
    params(("key_id" = i64, Path, description = "The key's id (another user's is unknown: 404).")),
    responses(
        (status = 200, description = "The key, removed: the caller's running workspaces refuse it within seconds.", body = Envelope<AccountKey>),
        (status = 404, description = "The caller has no such key (code 1005).", body = ErrorEnvelope),
    ),
)]
/// `DELETE /api/v1/users/me/ssh-keys/{key_id}`: removes an account key.
async fn remove_ssh_key(State(st): State<AppState>, caller: Caller, Path(key_id): Path<String>) -> ApiResult<AccountKey> {
    let unknown = || ApiError::NotFound(format!("no account key {key_id}"));
    let id: i64 = key_id.parse().map_err(|_| unknown())?;
    let key = account_keys::remove(&st.db, caller.0.id, id).await?.ok_or_else(unknown)?;
    tracing::info!(user = %caller.0.name, fingerprint = %key.fingerprint, "account key removed");
    key_sync::spawn_for_user(&st, caller.0.id);
    Ok(ok(key))
}
