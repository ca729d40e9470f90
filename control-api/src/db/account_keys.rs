//! Account keys (`user_ssh_keys`): a user's OpenSSH public keys, the generation that moves with
//! each change (`users.ssh_keys_generation`, in the change's own transaction), and which
//! running workspaces have yet to get their owner's current keys
//! (`environments.account_keys_synced`, cleared for every new container).

use chrono::{DateTime, Utc};

use super::{Db, DbResult};

/// The most account keys one user may have.
pub const MAX_PER_USER: i64 = 32;

/// One account key as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct AccountKey {
    pub id: i64,
    /// The owner's label for it (the key's comment unless a name was given).
    pub name: String,
    /// `<algorithm> <base64>`, as workspaces get it (no comment, no options).
    pub public_key: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    pub created_at: DateTime<Utc>,
}

/// What an add did.
#[derive(Debug)]
pub enum Added {
    /// The key is new.
    Key(AccountKey),
    /// The user has this key already (same fingerprint): nothing changed.
    Duplicate(AccountKey),
    /// The user has [`MAX_PER_USER`] keys: nothing changed.
    Full,
}

const COLUMNS: &str = "id, name, public_key, fingerprint, created_at";

/// `user_id`'s keys, oldest first.
pub async fn list(db: &Db, user_id: i64) -> DbResult<Vec<AccountKey>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM user_ssh_keys WHERE user_id = $1 ORDER BY id"))
        .bind(user_id)
        .fetch_all(db.pool())
        .await
}

/// Adds a vetted key to `user_id`'s account keys.
pub async fn add(db: &Db, user_id: i64, name: &str, public_key: &str, fingerprint: &str) -> DbResult<Added> {
    let mut tx = db.begin().await?;
    // The user's row locked to the commit: two adds cannot both pass the count.
    sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE").bind(user_id).execute(&mut *tx).await?;
    let existing: Option<AccountKey> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM user_ssh_keys WHERE user_id = $1 AND fingerprint = $2"))
            .bind(user_id)
            .bind(fingerprint)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(k) = existing {
        return Ok(Added::Duplicate(k));
    }
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM user_ssh_keys WHERE user_id = $1").bind(user_id).fetch_one(&mut *tx).await?;
    if count >= MAX_PER_USER {
        return Ok(Added::Full);
    }
    let key: AccountKey = sqlx::query_as(&format!(
        "INSERT INTO user_ssh_keys (user_id, name, public_key, fingerprint) VALUES ($1, $2, $3, $4) RETURNING {COLUMNS}"
    ))
    .bind(user_id)
    .bind(name)
    .bind(public_key)
    .bind(fingerprint)
    .fetch_one(&mut *tx)
    .await?;
    bump(&mut tx, user_id).await?;
    super::event(&mut *tx, None, "ssh_key_added", serde_json::json!({ "user_id": user_id, "key_id": key.id, "fingerprint": fingerprint }))
        .await?;
    tx.commit().await?;
    Ok(Added::Key(key))
}

/// Removes `user_id`'s key `id`; `None` if the user has no such key.
pub async fn remove(db: &Db, user_id: i64, id: i64) -> DbResult<Option<AccountKey>> {
    let mut tx = db.begin().await?;
    let gone: Option<AccountKey> =
        sqlx::query_as(&format!("DELETE FROM user_ssh_keys WHERE user_id = $1 AND id = $2 RETURNING {COLUMNS}"))
            .bind(user_id)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(k) = &gone {
        bump(&mut tx, user_id).await?;
        super::event(&mut *tx, None, "ssh_key_removed", serde_json::json!({ "user_id": user_id, "key_id": k.id, "fingerprint": k.fingerprint }))
            .await?;
    }
    tx.commit().await?;
    Ok(gone)
}

async fn bump(tx: &mut super::Tx<'_>, user_id: i64) -> DbResult<()> {
    sqlx::query("UPDATE users SET ssh_keys_generation = ssh_keys_generation + 1 WHERE id = $1")
        .bind(user_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// `user_id`'s keys as workspaces get them, oldest first, with the generation they are (read
/// in one statement, so the two always belong together).
pub async fn current<'e, E: sqlx::PgExecutor<'e>>(exec: E, user_id: i64) -> DbResult<(i64, Vec<String>)> {
    sqlx::query_as(
        "SELECT u.ssh_keys_generation, \
                COALESCE(array_agg(k.public_key ORDER BY k.id) FILTER (WHERE k.id IS NOT NULL), '{}') \
         FROM users u LEFT JOIN user_ssh_keys k ON k.user_id = u.id WHERE u.id = $1 GROUP BY u.id",
    )
    .bind(user_id)
    .fetch_one(exec)
    .await
}

/// The mark of a workspace brought to generation `generation` under password setting `mode`
/// (what `account_keys_synced` holds once it is).
pub fn mark(generation: i64, mode: &str) -> String {
    format!("{generation}/{mode}")
}

/// A running workspace whose container has not got its owner's current keys.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unsynced {
    pub env_id: String,
    pub owner_id: i64,
    pub host: String,
    pub container_id: String,
}

/// Running, settled workspaces (of `host`, or of `owner`, or all) whose mark is not their
/// owner's current generation under password setting `mode`; those never brought first.
pub async fn unsynced(db: &Db, host: Option<&str>, owner: Option<i64>, mode: &str) -> DbResult<Vec<Unsynced>> {
    sqlx::query_as(
        "SELECT e.id AS env_id, e.owner_id, e.host, e.container_id \
         FROM environments e JOIN users u ON u.id = e.owner_id \
         WHERE e.status = 'running' AND e.op_instance IS NULL AND e.container_id IS NOT NULL \
           AND ($1::text IS NULL OR e.host = $1) AND ($2::bigint IS NULL OR e.owner_id = $2) \
           AND e.account_keys_synced IS DISTINCT FROM (u.ssh_keys_generation::text || '/' || $3) \
         ORDER BY e.account_keys_synced NULLS FIRST, e.id",
    )
    .bind(host)
    .bind(owner)
    .bind(mode)
    .fetch_all(db.pool())
    .await
}

/// Records that `env_id`'s container `container_id` holds the state `mark` (nothing if the
/// workspace has another container by now: that one starts unmarked).
pub async fn mark_synced(db: &Db, env_id: &str, container_id: &str, mark: &str) -> DbResult<()> {
    sqlx::query("UPDATE environments SET account_keys_synced = $3 WHERE id = $1 AND container_id = $2")
        .bind(env_id)
        .bind(container_id)
        .bind(mark)
        .execute(db.pool())
        .await?;
    Ok(())
}
