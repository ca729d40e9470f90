//! The `environments` table: one row per workspace and its lifecycle state.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::{Db, DbResult, Tx};

pub use super::env_status::Status;

/// One environment row.
#[derive(Clone, sqlx::FromRow)]
pub struct EnvRow {
    pub id: String,
    pub owner_id: i64,
    pub name: String,
    pub image: String,
    #[sqlx(try_from = "String")]
    pub status: Status,
    pub status_reason: Option<String>,
    pub container_id: Option<String>,
    /// The host it lives on (its container and home volume are there).
    pub host: String,
    pub services: Vec<String>,
    /// The services reachable by name (`<id>.<service>.<domain>` on the TLS port).
    pub name_services: Vec<String>,
    /// GPUs held now (empty while stopped: a stop gives them back).
    pub gpus: Vec<i32>,
    /// GPUs the environment asked for; a start allocates this many again.
    pub gpu_count: i32,
    /// The GPU model asked for (matched against the model name); `None`: any.
    pub gpu_model: Option<String>,
    /// Memory limit in MiB settled at create (`None`: made before limits were recorded).
    pub memory_mb: Option<i64>,
    /// CPU limit in cores settled at create.
    pub cpus: Option<f64>,
    /// Process limit settled at create.
    pub pids: Option<i32>,
    pub route_generation: i64,
    pub username: String,
    pub password: String,
    pub jupyter_token: String,
    pub ssh_public_keys: Vec<String>,
    /// Its SSH host key (OpenSSH private key), made at its first container and kept for life.
    pub ssh_host_key: Option<String>,
    pub op_instance: Option<i64>,
    /// The epoch of the claim the operation holds (see [`Claim`]); `None` when none.
    pub op_epoch: Option<i64>,
    /// Seconds of inactivity after which the workspace is stopped (0: never).
    pub idle_stop_after_s: i64,
    /// When it last became running (the idle clock's floor).
    pub running_since: Option<DateTime<Utc>>,
    /// Until when its owner holds it awake (past or `None`: no hold).
    pub hold_until: Option<DateTime<Utc>>,
    /// When its last `idle_warning` went out.
    pub idle_warned_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for EnvRow {
    // Credentials stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvRow")
            .field("id", &self.id)
            .field("owner_id", &self.owner_id)
            .field("status", &self.status)
            .field("container_id", &self.container_id)
            .field("host", &self.host)
            .field("services", &self.services)
            .field("gpus", &self.gpus)
            .field("gpu_count", &self.gpu_count)
            .finish_non_exhaustive()
    }
}

pub(super) const COLUMNS: &str = "id, owner_id, name, image, status, status_reason, container_id, host, services, \
    name_services, gpus, gpu_count, gpu_model, memory_mb, cpus, pids, route_generation, username, password, jupyter_token, \
    ssh_public_keys, ssh_host_key, op_instance, op_epoch, idle_stop_after_s, running_since, hold_until, idle_warned_at, \
    created_at, updated_at, deleted_at";

/// What a create inserts.
pub struct NewEnv<'a> {
    pub id: &'a str,
    pub owner_id: i64,
    pub name: &'a str,
    pub image: &'a str,
    pub services: &'a [String],
    pub name_services: &'a [String],
    pub username: &'a str,
    pub password: &'a str,
    pub jupyter_token: &'a str,
    pub ssh_public_keys: &'a [String],
    /// GPUs asked for (allocated again by every start).
    pub gpu_count: u32,
    /// The GPU model asked for (every start takes that model again).
    pub gpu_model: Option<&'a str>,
    /// The container's limits (kept for the container a start re-creates): memory in MiB,
    /// CPU cores, processes.
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids: u32,
    pub idle_stop_after_s: u64,
    pub instance: i64,
    /// The host placement chose.
    pub host: &'a str,
}

/// Inserts a new environment in state `creating`, claimed by `instance` until it settles;
/// returns the claim's epoch.
pub async fn insert_creating(tx: &mut Tx<'_>, e: &NewEnv<'_>) -> DbResult<i64> {
    sqlx::query_scalar(
        "INSERT INTO environments (id, owner_id, name, image, status, services, username, \
             password, jupyter_token, ssh_public_keys, op_instance, gpu_count, memory_mb, cpus, pids, \
             idle_stop_after_s, gpu_model, name_services, host, op_epoch) \
         VALUES ($1, $2, $3, $4, 'creating', $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
             nextval('claim_epoch_seq')) \
         RETURNING op_epoch",
    )
    .bind(e.id)
    .bind(e.owner_id)
    .bind(e.name)
    .bind(e.image)
    .bind(e.services)
    .bind(e.username)
    .bind(e.password)
    .bind(e.jupyter_token)
    .bind(e.ssh_public_keys)
    .bind(e.instance)
    .bind(i32::try_from(e.gpu_count).unwrap_or(i32::MAX))
    .bind(i64::try_from(e.memory_mb).unwrap_or(i64::MAX))
    .bind(e.cpus)
    .bind(i32::try_from(e.pids).unwrap_or(i32::MAX))
    .bind(i64::try_from(e.idle_stop_after_s).unwrap_or(i64::MAX))
    .bind(e.gpu_model)
    .bind(e.name_services)
    .bind(e.host)
    .fetch_one(&mut **tx)
    .await
}

/// Records the GPUs an environment holds now (empty when a stop gave them back).
pub async fn set_gpus(tx: &mut Tx<'_>, id: &str, gpus: &[crate::gpu::GpuRef]) -> DbResult<()> {
    let gpus: Vec<i32> = gpus.iter().filter_map(|g| i32::try_from(g.index).ok()).collect();
    sqlx::query("UPDATE environments SET gpus = $2 WHERE id = $1")
        .bind(id)
        .bind(gpus)
        .execute(&mut **tx)
        .await
        .map(|_| ())
}

/// One environment; with `owner`, only if that user owns it. Deleted ones are not found.
pub async fn get<'e, E: PgExecutor<'e>>(exec: E, id: &str, owner: Option<i64>) -> DbResult<Option<EnvRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM environments WHERE id = $1 AND status <> 'deleted' \
         AND ($2::bigint IS NULL OR owner_id = $2)"
    ))
    .bind(id)
    .bind(owner)
    .fetch_optional(exec)
    .await
}

/// The owner's environments (not deleted), oldest first.
pub async fn list(db: &Db, owner: i64) -> DbResult<Vec<EnvRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM environments WHERE owner_id = $1 AND status <> 'deleted' \
         ORDER BY created_at, id"
    ))
    .bind(owner)
    .fetch_all(db.pool())
    .await
}

/// Every environment that is not deleted (reconciler).
pub async fn list_live(db: &Db) -> DbResult<Vec<EnvRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM environments WHERE status <> 'deleted' ORDER BY created_at"
    ))
    .fetch_all(db.pool())
    .await
}

/// Claims the environment for an operation by `instance`: succeeds only if the owner matches,
/// its status is one of `from`, and no other live operation holds it. Sets `status` to `to`
/// and draws the claim's epoch (`op_epoch` of the row returned).
pub async fn claim(
    db: &Db,
    id: &str,
    owner: Option<i64>,
    from: &[Status],
    to: Status,
    instance: i64,
) -> DbResult<Option<EnvRow>> {
    if let Some(f) = from.iter().find(|f| !f.may_become(to)) {
        return Err(sqlx::Error::Protocol(format!("an environment may not move from {f} to {to}")));
    }
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    sqlx::query_as(&format!(
        "UPDATE environments SET status = $4, op_instance = $5, op_epoch = nextval('claim_epoch_seq'), \
             updated_at = now() \
         WHERE id = $1 AND ($2::bigint IS NULL OR owner_id = $2) AND status = ANY($3) \
             AND op_instance IS NULL \
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(owner)
    .bind(from)
    .bind(to.as_str())
    .bind(instance)
    .fetch_optional(db.pool())
    .await
}

/// Takes over an environment whose operating instance died (reconciler): a new claim, whose
/// epoch is returned; the old operation's later writes find it and change nothing.
pub async fn take_over(db: &Db, id: &str, dead: i64, instance: i64) -> DbResult<Option<i64>> {
    sqlx::query_scalar(
        "UPDATE environments SET op_instance = $3, op_epoch = nextval('claim_epoch_seq') \
         WHERE id = $1 AND op_instance = $2 RETURNING op_epoch",
    )
    .bind(id)
    .bind(dead)
    .bind(instance)
    .fetch_optional(db.pool())
    .await
    .map(Option::flatten)
}

/// Locks the row for the rest of `tx` if the claim of epoch `epoch` still holds it; false
/// when another process took it over (the operation must then change nothing more). Every
/// write transaction of an operation after its claim starts here: a take-over waits for the
/// lock, so the claim cannot change while the transaction runs.
pub async fn hold(tx: &mut Tx<'_>, id: &str, epoch: i64) -> DbResult<bool> {
    Ok(sqlx::query_scalar::<_, i32>("SELECT 1 FROM environments WHERE id = $1 AND op_epoch = $2 FOR UPDATE")
        .bind(id)
        .bind(epoch)
        .fetch_optional(&mut **tx)
        .await?
        .is_some())
}

/// Sets the status (and reason), records the container id if given, and ends the operation
/// whose claim has epoch `epoch`; false (nothing changed) if that claim no longer holds the row
/// or the row's status may not move to `status`.
pub async fn settle<'e, E: PgExecutor<'e>>(
    exec: E,
    id: &str,
    epoch: i64,
    status: Status,
    reason: Option<&str>,
    container_id: Option<&str>,
) -> DbResult<bool> {
    Ok(sqlx::query(
        "UPDATE environments SET status = $2, status_reason = $3, \
             container_id = COALESCE($4, container_id), op_instance = NULL, op_epoch = NULL, \
             updated_at = now(), \
             deleted_at = CASE WHEN $2 = 'deleted' THEN now() END \
         WHERE id = $1 AND op_epoch = $5 AND status = ANY($6)",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(reason)
    .bind(container_id)
    .bind(epoch)
    .bind(status.sources())
    .execute(exec)
    .await?
    .rows_affected()
        == 1)
}

/// Records the container id while the claim of epoch `epoch` still holds the row (crash
/// recovery finds it); false if it does not. The new container has yet to be brought to its
/// owner's account keys by the key sync (its environment carried them as of its create).
pub async fn set_container<'e, E: PgExecutor<'e>>(exec: E, id: &str, epoch: i64, container_id: &str) -> DbResult<bool> {
    Ok(sqlx::query(
        "UPDATE environments SET container_id = $2, account_keys_synced = NULL, updated_at = now() \
         WHERE id = $1 AND op_epoch = $3",
    )
        .bind(id)
        .bind(container_id)
        .bind(epoch)
        .execute(exec)
        .await?
        .rows_affected()
        == 1)
}

/// Bumps and returns the environment's route generation (a deployment-wide sequence value).
///
/// Takes the generation lock shared first, held until the transaction ends: generations
/// commit in any order, and a gateway barrier (`gateways::barrier`) waits on this lock to
/// learn that every generation handed out so far has settled. Only barriers take it
/// exclusive, for one read of the sequence.
pub async fn next_generation(tx: &mut Tx<'_>, id: &str) -> DbResult<i64> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, $2)")
        .bind(super::GENERATION_LOCK.0)
        .bind(super::GENERATION_LOCK.1)
        .execute(&mut **tx)
        .await?;
    sqlx::query_scalar(
        "UPDATE environments SET route_generation = nextval('route_generation_seq') \
         WHERE id = $1 RETURNING route_generation",
    )
    .bind(id)
    .fetch_one(&mut **tx)
    .await
}

/// Environment counts by status (metrics).
pub async fn count_by_status(db: &Db) -> DbResult<Vec<(String, i64)>> {
    sqlx::query_as("SELECT status, count(*) FROM environments WHERE status <> 'deleted' GROUP BY status")
        .fetch_all(db.pool())
        .await
}

/// Takes an environment that no operation holds (an undo or delete that gave up earlier);
/// returns the new claim's epoch.
pub async fn take_over_unowned(db: &Db, id: &str, instance: i64) -> DbResult<Option<i64>> {
    sqlx::query_scalar(
        "UPDATE environments SET op_instance = $2, op_epoch = nextval('claim_epoch_seq') \
         WHERE id = $1 AND op_instance IS NULL RETURNING op_epoch",
    )
    .bind(id)
    .bind(instance)
    .fetch_optional(db.pool())
    .await
    .map(Option::flatten)
}

/// Ends `instance`'s claim on the environment, if it still holds one (an operation that
/// ended early, or a repair that gave up); returns whether a claim was released.
pub async fn release_claim(db: &Db, id: &str, instance: i64) -> DbResult<bool> {
    Ok(sqlx::query("UPDATE environments SET op_instance = NULL, op_epoch = NULL WHERE id = $1 AND op_instance = $2")
        .bind(id)
        .bind(instance)
        .execute(db.pool())
        .await?
        .rows_affected()
        == 1)
}

/// Marks a running or stopped environment that no operation holds, and whose recorded
/// container is still `container` (none: still none), as failed with `reason`; returns whether
/// it did. A start or create that recorded a new container meanwhile keeps its environment.
pub async fn mark_failed(tx: &mut Tx<'_>, id: &str, container: Option<&str>, reason: &str) -> DbResult<bool> {
    Ok(sqlx::query(
        "UPDATE environments SET status = 'failed', status_reason = $2, updated_at = now() \
         WHERE id = $1 AND status IN ('running', 'stopped') AND op_instance IS NULL \
             AND container_id IS NOT DISTINCT FROM $3",
    )
    .bind(id)
    .bind(reason)
    .bind(container)
    .execute(&mut **tx)
    .await?
    .rows_affected()
        == 1)
}

/// Locks the row and tells whether it is still running with no operation (route repair).
pub async fn lock_if_idle_running(tx: &mut Tx<'_>, id: &str) -> DbResult<bool> {
    lock_if_idle_in(tx, id, Status::Running).await
}

/// Locks the row and tells whether it is still in `status` with no operation (repairs).
pub async fn lock_if_idle_in(tx: &mut Tx<'_>, id: &str, status: Status) -> DbResult<bool> {
    let still: Option<(String, Option<i64>)> =
        sqlx::query_as("SELECT status, op_instance FROM environments WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(still == Some((status.as_str().to_string(), None)))
}

/// Forgets the environment's container (a start that failed removed it; the next start
/// makes a new one).
pub async fn clear_container<'e, E: PgExecutor<'e>>(exec: E, id: &str) -> DbResult<()> {
    sqlx::query("UPDATE environments SET container_id = NULL, updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(exec)
        .await
        .map(|_| ())
}

/// Sets an environment's idle limit; false if it does not exist (for `owner`) or is deleted.
pub async fn set_idle_stop_after(db: &Db, id: &str, owner: Option<i64>, secs: u64) -> DbResult<bool> {
    Ok(sqlx::query(
        "UPDATE environments SET idle_stop_after_s = $3, updated_at = now() \
         WHERE id = $1 AND ($2::bigint IS NULL OR owner_id = $2) AND status <> 'deleted'",
    )
    .bind(id)
    .bind(owner)
    .bind(i64::try_from(secs).unwrap_or(i64::MAX))
    .execute(db.pool())
    .await?
    .rows_affected()
        == 1)
}

/// Running environments with an idle limit that no operation holds (the idle task).
pub async fn list_idle_candidates(db: &Db) -> DbResult<Vec<EnvRow>> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM environments WHERE status = 'running' AND idle_stop_after_s > 0 \
         AND op_instance IS NULL ORDER BY running_since"
    ))
    .fetch_all(db.pool())
    .await
}

/// A host stopped answering: its running environments (no operation in flight) become
/// `unreachable` with `reason`, keeping their routes. Returns their ids.
pub async fn host_unreachable(db: &Db, host: &str, reason: &str) -> DbResult<Vec<String>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE environments SET status = 'unreachable', status_reason = $2, updated_at = now() \
         WHERE host = $1 AND status = 'running' AND op_instance IS NULL RETURNING id",
    )
    .bind(host)
    .bind(reason)
    .fetch_all(db.pool())
    .await?;
    for id in &ids {
        super::event(db.pool(), Some(id), "host_unreachable", serde_json::json!({ "host": host, "reason": reason }))
            .await?;
    }
    Ok(ids)
}

/// A host answers again: its `unreachable` environments are `running` again (their routes
/// never left; the reconciler checks their containers). Returns their ids.
pub async fn host_back(db: &Db, host: &str) -> DbResult<Vec<String>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE environments SET status = 'running', status_reason = NULL, updated_at = now() \
         WHERE host = $1 AND status = 'unreachable' AND op_instance IS NULL RETURNING id",
    )
    .bind(host)
    .fetch_all(db.pool())
    .await?;
    for id in &ids {
        super::event(db.pool(), Some(id), "host_reachable", serde_json::json!({ "host": host })).await?;
    }
    Ok(ids)
}

/// A host stayed unreachable too long: its `unreachable` environments become `failed` with
/// `reason` and forget their container (the reconciler removes it if the host comes back,
/// before the host takes placements again); they keep their GPUs and home volume (a start
/// recovers them once the host is back). The caller deletes their routes in the same
/// transaction. Returns their ids.
pub async fn host_lost(tx: &mut Tx<'_>, host: &str, reason: &str) -> DbResult<Vec<String>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE environments SET status = 'failed', status_reason = $2, container_id = NULL, \
             updated_at = now() \
         WHERE host = $1 AND status = 'unreachable' AND op_instance IS NULL RETURNING id",
    )
    .bind(host)
    .bind(reason)
    .fetch_all(&mut **tx)
    .await?;
    Ok(ids)
}

/// Records the host placement chose (in the create's transaction).
pub async fn set_host(tx: &mut Tx<'_>, id: &str, host: &str) -> DbResult<()> {
    sqlx::query("UPDATE environments SET host = $2 WHERE id = $1")
        .bind(id)
        .bind(host)
        .execute(&mut **tx)
        .await
        .map(|_| ())
}
