//! The `gpu_devices` table: the host's inventory (discovered by UUID, or indexes from
//! configuration), per-environment allocation, and each GPU's last utilisation sample.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;

use super::{hosts, Db, DbResult, Tx};
use crate::gpu::{Device, GpuRef};

/// One inventory row, as an admin sees it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct GpuRow {
    /// The key: the UUID, or `index:<n>` for a GPU listed in configuration.
    pub id: String,
    /// Its index on the host now (last reported).
    pub index: i32,
    pub uuid: Option<String>,
    /// Model name (empty when unknown).
    pub name: String,
    pub memory_mib: Option<i64>,
    /// `available`, `allocated` or `retired`.
    pub status: String,
    /// Whether the host reports it now; false for a GPU that disappeared (an environment
    /// may still hold it until it is released, then it retires).
    pub in_inventory: bool,
    /// The environment holding it.
    pub env_id: Option<String>,
    /// The host it is on.
    pub host: String,
}

const COLUMNS: &str = "id, idx AS index, uuid, name, memory_mib, status, in_inventory, env_id, host";

/// A GPU that left the inventory in a sync.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Retired {
    /// Its key.
    pub id: String,
    /// The environment that still holds it (it retires when that one releases it).
    pub env_id: Option<String>,
}

/// What a sync changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InventoryChange {
    /// Keys of GPUs that joined (new, or back after leaving).
    pub added: Vec<String>,
    /// GPUs that left.
    pub retired: Vec<Retired>,
}

/// Makes the inventory match `devices`: new GPUs become available (a retired one that came
/// back too), names, memory and indexes are refreshed, GPUs missing from `devices` leave the
/// inventory: a free one retires at once, an allocated one stays with its environment until
/// released, then retires (every release path honours `in_inventory`). Each change is an
/// event (`gpu_added`, `gpu_vanished` on the environment holding it).
pub async fn sync_inventory(db: &Db, host: &str, devices: &[Device]) -> DbResult<InventoryChange> {
    let ids: Vec<String> = devices.iter().map(Device::key).collect();
    let idx: Vec<i32> = devices.iter().map(|d| i32::try_from(d.index).unwrap_or(i32::MAX)).collect();
    let uuids: Vec<Option<String>> = devices.iter().map(|d| d.uuid.clone()).collect();
    let names: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
    let mem: Vec<Option<i64>> = devices.iter().map(|d| d.memory_mib.and_then(|m| i64::try_from(m).ok())).collect();
    let mut tx = db.begin().await?;
    // One sync at a time, so that each change is reported once.
    sqlx::query("LOCK TABLE gpu_devices IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    let before: Vec<String> = sqlx::query_scalar("SELECT id FROM gpu_devices WHERE in_inventory AND host = $1")
        .bind(host)
        .fetch_all(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO gpu_devices (host, id, idx, uuid, name, memory_mib) \
         SELECT $6, * FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::bigint[]) \
         ON CONFLICT (host, id) DO UPDATE SET idx = EXCLUDED.idx, uuid = EXCLUDED.uuid, name = EXCLUDED.name, \
             memory_mib = EXCLUDED.memory_mib, in_inventory = true, \
             status = CASE WHEN gpu_devices.status = 'retired' THEN 'available' ELSE gpu_devices.status END",
    )
    .bind(&ids)
    .bind(&idx)
    .bind(&uuids)
    .bind(&names)
    .bind(&mem)
    .bind(host)
    .execute(&mut *tx)
    .await?;
    let gone: Vec<(String, Option<String>)> = sqlx::query_as(
        "UPDATE gpu_devices SET in_inventory = false, \
             status = CASE WHEN status = 'available' THEN 'retired' ELSE status END \
         WHERE in_inventory AND host = $2 AND NOT (id = ANY($1::text[])) RETURNING id, env_id",
    )
    .bind(&ids)
    .bind(host)
    .fetch_all(&mut *tx)
    .await?;
    let mut change = InventoryChange::default();
    for d in devices {
        let key = d.key();
        if !before.contains(&key) {
            super::event(&mut *tx, None, "gpu_added", serde_json::json!({ "gpu": key, "index": d.index, "name": d.name }))
                .await?;
            change.added.push(key);
        }
    }
    for (id, env_id) in gone {
        super::event(&mut *tx, env_id.as_deref(), "gpu_vanished", serde_json::json!({ "gpu": id, "held": env_id.is_some() }))
            .await?;
        change.retired.push(Retired { id, env_id });
    }
    tx.commit().await?;
    Ok(change)
}

/// How many GPUs the largest host of the fleet (not disabled) has now: no create can ask for
/// more.
pub async fn largest_inventory(db: &Db) -> DbResult<i64> {
    sqlx::query_scalar(
        "SELECT COALESCE(max(n), 0)::bigint FROM (SELECT count(*) AS n FROM gpu_devices g \
             JOIN hosts h ON h.name = g.host WHERE g.in_inventory AND h.state <> 'disabled' GROUP BY g.host) c",
    )
    .fetch_one(db.pool())
    .await
}

/// Every GPU known, by host, those in the inventory first, by index.
pub async fn list(db: &Db) -> DbResult<Vec<GpuRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM gpu_devices ORDER BY host, in_inventory DESC, idx, id"))
        .fetch_all(db.pool())
        .await
}

/// The GPUs `env_id` holds, by index.
pub async fn of_env<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<Vec<GpuRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM gpu_devices WHERE env_id = $1 ORDER BY idx, id"))
        .bind(env_id)
        .fetch_all(exec)
        .await
}

/// Free GPUs per model name, by name, on hosts that take placements (active and not down).
pub async fn free_by_model<'e, E: PgExecutor<'e>>(exec: E) -> DbResult<Vec<(String, i64)>> {
    sqlx::query_as(&format!(
        "SELECT g.name, count(*) FROM gpu_devices g JOIN hosts h ON h.name = g.host \
         WHERE g.status = 'available' AND {} GROUP BY g.name ORDER BY g.name",
        hosts::placeable_sql()
    ))
    .fetch_all(exec)
    .await
}

/// Allocates `count` free GPUs of `host` to `env_id` in `tx` (same `SKIP LOCKED` pattern as
/// ports), only of a model whose name contains `model` (case-insensitive) when one is given.
/// Returns fewer than `count` when not enough are free; the caller gives those back
/// ([`release_env`]) or rolls back.
pub async fn allocate(tx: &mut Tx<'_>, host: &str, env_id: &str, count: u32, model: Option<&str>) -> DbResult<Vec<GpuRef>> {
    if count == 0 {
        return Ok(vec![]);
    }
    let rows: Vec<(i32, Option<String>)> = sqlx::query_as(
        "UPDATE gpu_devices SET status = 'allocated', env_id = $1 \
         WHERE (host, id) IN (SELECT host, id FROM gpu_devices WHERE host = $4 AND status = 'available' \
                        AND ($3::text IS NULL OR strpos(lower(name), lower($3)) > 0) \
                      ORDER BY idx, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING idx, uuid",
    )
    .bind(env_id)
    .bind(i64::from(count))
    .bind(model)
    .bind(host)
    .fetch_all(&mut **tx)
    .await?;
    let mut out: Vec<GpuRef> = rows
        .into_iter()
        .filter_map(|(i, uuid)| Some(GpuRef { index: u32::try_from(i).ok()?, uuid }))
        .collect();
    out.sort_by(|a, b| (a.index, &a.uuid).cmp(&(b.index, &b.uuid)));
    Ok(out)
}

/// The most free GPUs (of `model`, when given) on any one host that takes placements.
pub async fn most_free_on_a_host(db: &Db, model: Option<&str>) -> DbResult<i64> {
    sqlx::query_scalar(&format!(
        "SELECT COALESCE(max(n), 0)::bigint FROM (SELECT count(*) AS n FROM gpu_devices g \
             JOIN hosts h ON h.name = g.host \
             WHERE g.status = 'available' AND {} \
               AND ($1::text IS NULL OR strpos(lower(g.name), lower($1)) > 0) GROUP BY g.host) c",
        hosts::placeable_sql()
    ))
    .bind(model)
    .fetch_one(db.pool())
    .await
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

/// Releases GPUs held by deleted or missing environments, except on a host that is down (the
/// container that had them may still run there); returns how many.
pub async fn release_orphans(db: &Db) -> DbResult<u64> {
    Ok(sqlx::query(
        "UPDATE gpu_devices g SET env_id = NULL, \
             status = CASE WHEN g.in_inventory THEN 'available' ELSE 'retired' END \
         WHERE g.status = 'allocated' AND NOT EXISTS (SELECT 1 FROM environments e \
             WHERE e.id = g.env_id AND e.status <> 'deleted') \
             AND NOT EXISTS (SELECT 1 FROM hosts h WHERE h.name = g.host AND h.health = 'down')",
    )
    .execute(db.pool())
    .await?
    .rows_affected())
}

/// Records this host's utilisation samples (`samples`: UUID, percent, whether busy by the
/// sampler's threshold) at the database's time: each GPU of `host` with that UUID gets its
/// sample, and a busy one its `busy_at`. GPUs not in the inventory (yet) are skipped.
/// Returns how many rows took a sample.
pub async fn record_utilization(db: &Db, host: &str, samples: &[(String, Option<u8>, bool)]) -> DbResult<u64> {
    record_samples(db, host, None, samples).await
}

/// Writes samples of `host`'s GPUs: keyed by UUID (`holder` `None`), or by inventory key and
/// only for GPUs `holder` holds (what one workspace's own output may speak for).
async fn record_samples(db: &Db, host: &str, holder: Option<&str>, samples: &[(String, Option<u8>, bool)]) -> DbResult<u64> {
    let keys: Vec<&str> = samples.iter().map(|(k, _, _)| k.as_str()).collect();
    let pct: Vec<Option<i16>> = samples.iter().map(|(_, p, _)| p.map(i16::from)).collect();
    let busy: Vec<bool> = samples.iter().map(|(_, _, b)| *b).collect();
    Ok(sqlx::query(
        "UPDATE gpu_devices g SET utilization_pct = s.pct, utilization_at = now(), \
             busy_at = CASE WHEN s.busy THEN now() ELSE g.busy_at END \
         FROM unnest($3::text[], $4::smallint[], $5::bool[]) AS s(key, pct, busy) \
         WHERE g.host = $1 AND CASE WHEN $2::text IS NULL THEN g.uuid = s.key \
                                    ELSE g.env_id = $2 AND g.id = s.key END",
    )
    .bind(host)
    .bind(holder)
    .bind(&keys)
    .bind(&pct)
    .bind(&busy)
    .execute(db.pool())
    .await?
    .rows_affected())
}

/// A running GPU workspace of a host whose GPUs no sample younger than the caller's bound
/// covers: the GPUs its host's own API process does not sample (see `crate::gpu_activity`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unsampled {
    /// The environment.
    pub env_id: String,
    /// Its container.
    pub container_id: String,
    /// Keys of its GPUs, by index on the host (the order `nvidia-smi` inside the container
    /// lists them in).
    pub gpus: Vec<String>,
}

/// Running, settled workspaces of `host` holding GPUs none of which was sampled in the last
/// `older_than_s` seconds, the longest unsampled first.
pub async fn unsampled_on_host(db: &Db, host: &str, older_than_s: f64) -> DbResult<Vec<Unsampled>> {
    sqlx::query_as(
        "SELECT e.id AS env_id, e.container_id, array_agg(g.id ORDER BY g.idx, g.id) AS gpus \
         FROM environments e JOIN gpu_devices g ON g.env_id = e.id AND g.host = e.host \
         WHERE e.host = $1 AND e.status = 'running' AND e.op_instance IS NULL AND e.container_id IS NOT NULL \
         GROUP BY e.id, e.container_id \
         HAVING COALESCE(max(g.utilization_at) < now() - make_interval(secs => $2), true) \
         ORDER BY max(g.utilization_at) NULLS FIRST, e.id",
    )
    .bind(host)
    .bind(older_than_s)
    .fetch_all(db.pool())
    .await
}

/// Records samples of `env_id`'s GPUs by key (host, key, percent, busy); a GPU that left the
/// environment meanwhile is not written. Returns how many rows took a sample.
pub async fn record_env_utilization(db: &Db, host: &str, env_id: &str, samples: &[(String, Option<u8>, bool)]) -> DbResult<u64> {
    record_samples(db, host, Some(env_id), samples).await
}

/// The last utilisation sample of a GPU an environment holds.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UtilizationRow {
    /// The GPU's key.
    pub id: String,
    /// Percent at the last sample (`None`: not reported, or never sampled).
    pub utilization_pct: Option<i16>,
    /// When the last sample was taken.
    pub utilization_at: Option<DateTime<Utc>>,
    /// When it was last sampled busy.
    pub busy_at: Option<DateTime<Utc>>,
    /// Whether the last sample is younger than the freshness window (by the database's clock).
    pub fresh: bool,
}

/// The last samples of `env_id`'s GPUs, by index; `fresh_s`: how old a sample may be and
/// still count.
pub async fn utilization_of_env(db: &Db, env_id: &str, fresh_s: u64) -> DbResult<Vec<UtilizationRow>> {
    sqlx::query_as(
        "SELECT id, utilization_pct, utilization_at, busy_at, \
             COALESCE(utilization_at > now() - make_interval(secs => $2), false) AS fresh \
         FROM gpu_devices WHERE env_id = $1 ORDER BY idx, id",
    )
    .bind(env_id)
    .bind(fresh_s as f64)
    .fetch_all(db.pool())
    .await
}
