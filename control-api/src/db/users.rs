//! Users and API tokens. Tokens are stored as SHA-256 digests; the raw token exists only in
//! the output of `gpugate-api token create` and in the caller's requests.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use super::{Db, DbResult};

/// The caller behind a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Database id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Whether admin endpoints are open to this user.
    pub is_admin: bool,
}

fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Creates the user if missing (upgrading it to admin if asked; never downgrading: that is
/// `unset-admin`) and a new token for it, valid for `valid_for_s` seconds if given; returns the
/// user and the raw token.
pub async fn create_token(db: &Db, name: &str, admin: bool, valid_for_s: Option<u64>) -> DbResult<(User, String)> {
    let token = crate::ids::token();
    let mut tx = db.begin().await?;
    let (id, name, is_admin): (i64, String, bool) = sqlx::query_as(
        "INSERT INTO users (name, is_admin) VALUES ($1, $2) \
         ON CONFLICT (name) DO UPDATE SET is_admin = users.is_admin OR EXCLUDED.is_admin \
         RETURNING id, name, is_admin",
    )
    .bind(name)
    .bind(admin)
    .fetch_one(&mut *tx)
    .await?;
    let hint: String = token.chars().take(8).collect();
    sqlx::query(
        "INSERT INTO api_tokens (user_id, token_sha256, hint, expires_at) \
         VALUES ($1, $2, $3, CASE WHEN $4::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $4) END)",
    )
    .bind(id)
    .bind(digest(&token))
    .bind(&hint)
    .bind(valid_for_s.map(|s| s as f64))
    .execute(&mut *tx)
    .await?;
    super::event(&mut *tx, None, "token_created", serde_json::json!({ "user": name, "admin": admin, "valid_for_s": valid_for_s }))
        .await?;
    tx.commit().await?;
    Ok((User { id, name, is_admin }, token))
}

/// The user a raw token belongs to, if the token is neither revoked nor expired. Records the
/// use (at most once a minute per token). No cache: a revocation counts from its commit.
pub async fn user_for_token(db: &Db, token: &str) -> DbResult<Option<User>> {
    let row: Option<(i64, String, bool)> = sqlx::query_as(
        "WITH t AS (SELECT id, user_id, last_used_at FROM api_tokens \
                    WHERE token_sha256 = $1 AND revoked_at IS NULL \
                        AND (expires_at IS NULL OR expires_at > now())), \
              touch AS (UPDATE api_tokens a SET last_used_at = now() FROM t \
                    WHERE a.id = t.id AND (t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute')) \
         SELECT u.id, u.name, u.is_admin FROM t JOIN users u ON u.id = t.user_id",
    )
    .bind(digest(token))
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(id, name, is_admin)| User { id, name, is_admin }))
}

/// A token as `token list` shows it (never the token itself).
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct TokenInfo {
    pub id: i64,
    pub user: String,
    pub hint: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Every token, or one user's, oldest first.
pub async fn list_tokens(db: &Db, user: Option<&str>) -> DbResult<Vec<TokenInfo>> {
    sqlx::query_as(
        "SELECT t.id, u.name AS user, t.hint, t.created_at, t.expires_at, t.last_used_at, t.revoked_at \
         FROM api_tokens t JOIN users u ON u.id = t.user_id \
         WHERE $1::text IS NULL OR u.name = $1 ORDER BY t.id",
    )
    .bind(user)
    .fetch_all(db.pool())
    .await
}

/// Revokes token `id`; returns false if there is no such token or it was already revoked.
pub async fn revoke_token(db: &Db, id: i64) -> DbResult<bool> {
    let mut tx = db.begin().await?;
    let n = sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n == 1 {
        super::event(&mut *tx, None, "token_revoked", serde_json::json!({ "token_id": id })).await?;
    }
    tx.commit().await?;
    Ok(n == 1)
}

/// Grants or removes admin rights; returns false if there is no such user.
pub async fn set_admin(db: &Db, name: &str, admin: bool) -> DbResult<bool> {
    let mut tx = db.begin().await?;
    let n = sqlx::query("UPDATE users SET is_admin = $2 WHERE name = $1")
        .bind(name)
        .bind(admin)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if n == 1 {
        super::event(&mut *tx, None, "admin_set", serde_json::json!({ "user": name, "admin": admin })).await?;
    }
    tx.commit().await?;
    Ok(n == 1)
}
