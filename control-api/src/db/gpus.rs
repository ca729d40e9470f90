//! The `gpu_devices` table: the inventory from configuration and per-environment allocation.

use sqlx::PgExecutor;

use super::{Db, DbResult, Tx};

/// Makes the inventory match `devices`: new indexes become available, missing ones are
/// retired (an allocated one stays with its environment until released, then retires; every
/// release path honours `in_inventory`).
pub async fn sync_inventory(db: &Db, devices: &[u32]) -> DbResult<()> {
    let idx: Vec<i32> = devices.iter().filter_map(|d| i32::try_from(*d).ok()).collect();
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO gpu_devices (idx) SELECT unnest($1::int[]) \
         ON CONFLICT (idx) DO UPDATE SET in_inventory = true, \
             status = CASE WHEN gpu_devices.status = 'retired' THEN 'available' ELSE gpu_devices.status END",
    )
    .bind(&idx)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE gpu_devices SET in_inventory = false, \
             status = CASE WHEN status = 'available' THEN 'retired' ELSE status END \
         WHERE NOT (idx = ANY($1::int[]))",
    )
    .bind(&idx)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// How many GPUs the inventory has (not retired).
pub async fn inventory_size(db: &Db) -> DbResult<i64> {
    sqlx::query_scalar("SELECT count(*) FROM gpu_devices WHERE status <> 'retired'")
        .fetch_one(db.pool())
        .await
}

/// Allocates `count` free GPUs to `env_id` in `tx` (same `SKIP LOCKED` pattern as ports).
/// Returns fewer than `count` indexes when not enough are free; the caller rolls back.
pub async fn allocate(tx: &mut Tx<'_>, env_id: &str, count: u32) -> DbResult<Vec<u32>> {
    if count == 0 {
        return Ok(vec![]);
    }
    let idx: Vec<i32> = sqlx::query_scalar(
        "UPDATE gpu_devices SET status = 'allocated', env_id = $1 \
         WHERE idx IN (SELECT idx FROM gpu_devices WHERE status = 'available' \
                       ORDER BY idx LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING idx",
    )
    .bind(env_id)
    .bind(i64::from(count))
    .fetch_all(&mut **tx)
    .await?;
    let mut out: Vec<u32> = idx.into_iter().filter_map(|i| u32::try_from(i).ok()).collect();
    out.sort_unstable();
    Ok(out)
}

/// Returns `env_id`'s GPUs to the inventory (retired if they left it meanwhile).
pub async fn release_env<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<u64> {
    Ok(sqlx::query(
        "UPDATE gpu_devices SET env_id = NULL, \
             status = CASE WHEN in_inventory THEN 'available' ELSE 'retired' END WHERE env_id = $1",
    )
        .bind(env_id)
        .execute(exec)
        .await?
        .rows_affected())
}

/// Releases GPUs held by deleted or missing environments; returns how many.
pub async fn release_orphans(db: &Db) -> DbResult<u64> {
    Ok(sqlx::query(
        "UPDATE gpu_devices g SET env_id = NULL, \
             status = CASE WHEN g.in_inventory THEN 'available' ELSE 'retired' END \
         WHERE g.status = 'allocated' AND NOT EXISTS (SELECT 1 FROM environments e \
             WHERE e.id = g.env_id AND e.status <> 'deleted')",
    )
    .execute(db.pool())
    .await?
    .rows_affected())
}
