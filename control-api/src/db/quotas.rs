//! The `user_quotas` table and what a user holds against it.

use super::env_status::OCCUPYING_SQL;
use super::{Db, DbResult, Tx};

/// A user's overrides; `None` means the deployment's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Most environments (any status but deleted).
    pub environments: Option<u32>,
    /// Most GPUs across their environments.
    pub gpus: Option<u32>,
    /// Most environments creating or running at once.
    pub running: Option<u32>,
}

/// What a user holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Environments not deleted.
    pub environments: u32,
    /// GPUs those environments asked for (`gpu_count`), stopped ones included: a stop frees
    /// the devices for others, not the user's share.
    pub gpus: u32,
    /// Environments creating or running.
    pub running: u32,
}

fn to_u32(v: Option<i32>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok())
}

/// The user's overrides.
pub async fn overrides(tx: &mut Tx<'_>, user_id: i64) -> DbResult<Overrides> {
    let row: Option<(Option<i32>, Option<i32>, Option<i32>)> =
        sqlx::query_as("SELECT environments, gpus, running FROM user_quotas WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row
        .map(|(e, g, r)| Overrides { environments: to_u32(e), gpus: to_u32(g), running: to_u32(r) })
        .unwrap_or_default())
}

/// Locks the user's row for the rest of `tx` (one create or start of a user at a time checks
/// and takes its share) and returns what the user holds.
pub async fn lock_usage(tx: &mut Tx<'_>, user_id: i64) -> DbResult<Usage> {
    sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR UPDATE").bind(user_id).execute(&mut **tx).await?;
    let (environments, gpus, running): (i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), COALESCE(sum(gpu_count), 0)::bigint, count(*) FILTER (WHERE status IN {OCCUPYING_SQL}) \
         FROM environments WHERE owner_id = $1 AND status <> 'deleted'"
    ))
    .bind(user_id)
    .fetch_one(&mut **tx)
    .await?;
    let n = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(Usage { environments: n(environments), gpus: n(gpus), running: n(running) })
}

/// Sets (or with all `None`, removes) the overrides of the user named `name`; returns false
/// when there is no such user.
pub async fn set(db: &Db, name: &str, o: Overrides) -> DbResult<bool> {
    let id: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE name = $1").bind(name).fetch_optional(db.pool()).await?;
    let Some(id) = id else { return Ok(false) };
    let v = |x: Option<u32>| x.map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    let mut tx = db.begin().await?;
    if o == Overrides::default() {
        sqlx::query("DELETE FROM user_quotas WHERE user_id = $1").bind(id).execute(&mut *tx).await?;
    } else {
        sqlx::query(
            "INSERT INTO user_quotas (user_id, environments, gpus, running) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_id) DO UPDATE SET environments = $2, gpus = $3, running = $4, updated_at = now()",
        )
        .bind(id)
        .bind(v(o.environments))
        .bind(v(o.gpus))
        .bind(v(o.running))
        .execute(&mut *tx)
        .await?;
    }
    super::event(&mut *tx, None, "quota_set", serde_json::json!({"user": name, "environments": o.environments, "gpus": o.gpus, "running": o.running})).await?;
    tx.commit().await?;
    Ok(true)
}
