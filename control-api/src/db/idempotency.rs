//! The `idempotency_keys` table: which environment a create with a given key made.

use sqlx::PgExecutor;

use super::{Db, DbResult, Tx};

/// A key already used by this user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    /// Digest of the request that first used the key.
    pub request: Vec<u8>,
    /// The environment it created.
    pub env_id: String,
}

/// The environment a key made, if the key was used within `retention_s` seconds.
pub async fn find(db: &Db, user_id: i64, key: &str, retention_s: u64) -> DbResult<Option<Used>> {
    let row: Option<(Vec<u8>, String)> = sqlx::query_as(
        "SELECT request, env_id FROM idempotency_keys \
         WHERE user_id = $1 AND key = $2 AND created_at > now() - make_interval(secs => $3)",
    )
    .bind(user_id)
    .bind(key)
    .bind(retention_s as f64)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(request, env_id)| Used { request, env_id }))
}

/// Records the key in the create's transaction. Returns false if the key is already taken
/// (a concurrent retry committed first: this insert waited for it); the caller rolls back.
/// An expired row for the key is replaced.
pub async fn record(
    tx: &mut Tx<'_>,
    user_id: i64,
    key: &str,
    request: &[u8],
    env_id: &str,
    retention_s: u64,
) -> DbResult<bool> {
    let inserted: Option<String> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (user_id, key, request, env_id) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id, key) DO UPDATE \
             SET request = EXCLUDED.request, env_id = EXCLUDED.env_id, created_at = now() \
             WHERE idempotency_keys.created_at <= now() - make_interval(secs => $5) \
         RETURNING env_id",
    )
    .bind(user_id)
    .bind(key)
    .bind(request)
    .bind(env_id)
    .bind(retention_s as f64)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(inserted.is_some())
}

/// Forgets the keys of an environment whose create failed (a retry may try again).
pub async fn forget_env<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<u64> {
    Ok(sqlx::query("DELETE FROM idempotency_keys WHERE env_id = $1")
        .bind(env_id)
        .execute(exec)
        .await?
        .rows_affected())
}

/// Deletes keys older than `retention_s` seconds; returns how many.
pub async fn purge(db: &Db, retention_s: u64) -> DbResult<u64> {
    Ok(sqlx::query("DELETE FROM idempotency_keys WHERE created_at <= now() - make_interval(secs => $1)")
        .bind(retention_s as f64)
        .execute(db.pool())
        .await?
        .rows_affected())
}
