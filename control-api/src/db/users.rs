//! Users and API tokens. Tokens are stored as SHA-256 digests; the raw token exists only in
//! the output of `gpugate-api token create` and in the caller's requests.

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

/// Creates the user if missing (upgrading it to admin if asked) and a new token for it;
/// returns the user and the raw token.
pub async fn create_token(db: &Db, name: &str, admin: bool) -> DbResult<(User, String)> {
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
    sqlx::query("INSERT INTO api_tokens (user_id, token_sha256) VALUES ($1, $2)")
        .bind(id)
        .bind(digest(&token))
        .execute(&mut *tx)
        .await?;
    super::event(&mut *tx, None, "token_created", serde_json::json!({ "user": name, "admin": admin }))
        .await?;
    tx.commit().await?;
    Ok((User { id, name, is_admin }, token))
}

/// The user a raw token belongs to.
pub async fn user_for_token(db: &Db, token: &str) -> DbResult<Option<User>> {
    let row: Option<(i64, String, bool)> = sqlx::query_as(
        "SELECT u.id, u.name, u.is_admin FROM api_tokens t JOIN users u ON u.id = t.user_id \
         WHERE t.token_sha256 = $1",
    )
    .bind(digest(token))
    .fetch_optional(db.pool())
    .await?;
    Ok(row.map(|(id, name, is_admin)| User { id, name, is_admin }))
}
