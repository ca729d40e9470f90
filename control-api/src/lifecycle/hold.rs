//! Holding a workspace awake: its owner keeps the idle stop away for a bounded time (at most
//! `idle.max_hold_s`), or releases the hold. The idle clock restarts at the hold's end.

use gpugate_routes::EnvId;

use crate::db::envs::{self, EnvRow};
use crate::db::idle::{self, HoldOutcome};
use crate::db::users::User;
use crate::error::ApiError;
use crate::state::State;

/// Holds `user`'s running environment `id` awake for `secs` from now, replacing any earlier
/// hold (0: releases it). Another user's environment is unknown (404), one that is not
/// running a conflict (409), a hold over the deployment's longest a 422.
pub async fn set(st: &State, user: &User, id: &str, secs: u64) -> Result<EnvRow, ApiError> {
    st.cfg.idle.check_hold(secs).map_err(|e| ApiError::Validation(format!("seconds: {e}")))?;
    if id.parse::<EnvId>().is_err() {
        return Err(ApiError::env_not_found(id));
    }
    match idle::set_hold(&st.db, id, user.id, secs).await? {
        HoldOutcome::Set(until) => tracing::info!(env_id = %id, until = ?until, "idle hold set"),
        HoldOutcome::NotFound => return Err(ApiError::env_not_found(id)),
        HoldOutcome::NotRunning(status) => {
            return Err(ApiError::Conflict(format!(
                "environment {id} is {status}: only a running environment can be held awake"
            )))
        }
    }
    envs::get(st.db.pool(), id, Some(user.id)).await?.ok_or_else(|| ApiError::env_not_found(id))
}
