//! The idle stop's own columns of `environments`: the owner's hold, the warning sent before a
//! stop, and the claim an idle stop takes (which a hold refuses).

use chrono::{DateTime, Utc};

use super::envs::{EnvRow, Status};
use super::{Db, DbResult};

/// What a hold request found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// Set (or released, `None`) on the running environment.
    Set(Option<DateTime<Utc>>),
    /// The environment is not running; its status.
    NotRunning(String),
    /// No such environment for this owner.
    NotFound,
}

/// Holds `owner`'s running environment `id` awake for `secs` from now (0: releases the hold),
/// by the database's clock; an audit event records it.
pub async fn set_hold(db: &Db, id: &str, owner: i64, secs: u64) -> DbResult<HoldOutcome> {
    let mut tx = db.begin().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM environments WHERE id = $1 AND owner_id = $2 AND status <> 'deleted' FOR UPDATE")
            .bind(id)
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(status) = status else {
        return Ok(HoldOutcome::NotFound);
    };
    if status != Status::Running.as_str() {
        return Ok(HoldOutcome::NotRunning(status));
    }
    let until: Option<DateTime<Utc>> = sqlx::query_scalar(
        "UPDATE environments SET hold_until = CASE WHEN $2 = 0 THEN NULL \
             ELSE now() + make_interval(secs => $2) END, updated_at = now() \
         WHERE id = $1 RETURNING hold_until",
    )
    .bind(id)
    .bind(secs as f64)
    .fetch_one(&mut *tx)
    .await?;
    let (kind, detail) = match until {
        Some(t) => ("idle_hold_set", serde_json::json!({ "seconds": secs, "until": t })),
        None => ("idle_hold_released", serde_json::json!({})),
    };
    super::event(&mut *tx, Some(id), kind, detail).await?;
    tx.commit().await?;
    Ok(HoldOutcome::Set(until))
}

/// Records the `idle_warning` of the idle period that began at `period_start` on a running
/// environment, unless one was already sent in that period (by this process or another);
/// returns whether this call sent it. `detail` goes into the event.
pub async fn warn(db: &Db, id: &str, period_start: DateTime<Utc>, detail: serde_json::Value) -> DbResult<bool> {
    let mut tx = db.begin().await?;
    let marked = sqlx::query(
        "UPDATE environments SET idle_warned_at = now() \
         WHERE id = $1 AND status = 'running' AND (idle_warned_at IS NULL OR idle_warned_at < $2)",
    )
    .bind(id)
    .bind(period_start)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if marked {
        super::event(&mut *tx, Some(id), "idle_warning", detail).await?;
    }
    tx.commit().await?;
    Ok(marked)
}

/// Claims a running environment for an idle stop by `instance` (status `stopping`), only if no
/// operation holds it, no hold keeps it (a hold set since the check wins), and its warning
/// went out; like [`super::envs::claim`] otherwise.
pub async fn claim_stop(db: &Db, id: &str, instance: i64) -> DbResult<Option<EnvRow>> {
    sqlx::query_as(&format!(
        "UPDATE environments SET status = 'stopping', op_instance = $2, op_epoch = nextval('claim_epoch_seq'), \
             updated_at = now() \
         WHERE id = $1 AND status = 'running' AND op_instance IS NULL \
             AND (hold_until IS NULL OR hold_until <= now()) AND idle_warned_at IS NOT NULL \
         RETURNING {}",
        super::envs::COLUMNS
    ))
    .bind(id)
    .bind(instance)
    .fetch_optional(db.pool())
    .await
}
