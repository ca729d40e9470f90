//! The SSH host identity's rows: the deployment's host CA (one row) and each workspace's host
//! key (`environments.ssh_host_key`). Both are made by whoever needs them first, with a
//! candidate the caller generated: concurrent callers agree on whichever was stored first.

use super::{Db, DbResult};

/// The deployment's host CA private key (OpenSSH format): `candidate` if none was stored yet.
pub async fn host_ca(db: &Db, candidate: &str) -> DbResult<String> {
    sqlx::query("INSERT INTO ssh_host_ca (private_key) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(candidate)
        .execute(db.pool())
        .await?;
    sqlx::query_scalar("SELECT private_key FROM ssh_host_ca").fetch_one(db.pool()).await
}

/// Environment `env_id`'s host key (OpenSSH private key): `candidate` if it had none yet;
/// `None` for an unknown environment.
pub async fn env_host_key(db: &Db, env_id: &str, candidate: &str) -> DbResult<Option<String>> {
    sqlx::query_scalar(
        "UPDATE environments SET ssh_host_key = COALESCE(ssh_host_key, $2) WHERE id = $1 RETURNING ssh_host_key",
    )
    .bind(env_id)
    .bind(candidate)
    .fetch_optional(db.pool())
    .await
    .map(Option::flatten)
}
