//! Retention: events, close requests and deleted environments' rows older than the configured
//! time go, so that no table grows without bound (a tenant can add events and close requests at
//! its rate limit).

use super::{Db, DbResult};

/// Rows removed by one [`purge`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    pub events: u64,
    pub environments: u64,
    pub close_requests: u64,
}

/// Most rows removed from each table per call: a long backlog goes over several passes
/// without one long-held lock.
const BATCH: i64 = 10_000;

/// Removes events and close requests older than `days` days (with the records of which
/// gateways applied them), and environments deleted more than `days` days ago that nothing
/// refers to any more (a port, GPU, route or idempotency key).
pub async fn purge(db: &Db, days: u32) -> DbResult<Purged> {
    let events = sqlx::query(
        "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < now() - make_interval(days => $1) \
         ORDER BY id LIMIT $2)",
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .bind(BATCH)
    .execute(db.pool())
    .await?
    .rows_affected();
    let environments = sqlx::query(
        "DELETE FROM environments WHERE id IN (SELECT e.id FROM environments e \
             WHERE e.status = 'deleted' AND e.deleted_at < now() - make_interval(days => $1) \
             AND NOT EXISTS (SELECT 1 FROM port_pool p WHERE p.env_id = e.id) \
             AND NOT EXISTS (SELECT 1 FROM gpu_devices g WHERE g.env_id = e.id) \
             AND NOT EXISTS (SELECT 1 FROM routes r WHERE r.env_id = e.id) \
             AND NOT EXISTS (SELECT 1 FROM name_routes n WHERE n.env_id = e.id) \
             AND NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.env_id = e.id) \
             ORDER BY e.deleted_at LIMIT $2)",
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .bind(BATCH)
    .execute(db.pool())
    .await?
    .rows_affected();
    let close_requests = sqlx::query(
        "DELETE FROM close_requests WHERE id IN (SELECT id FROM close_requests \
         WHERE requested_at < now() - make_interval(days => $1) ORDER BY id LIMIT $2)",
    )
    .bind(i32::try_from(days).unwrap_or(i32::MAX))
    .bind(BATCH)
    .execute(db.pool())
    .await?
    .rows_affected();
    Ok(Purged { events, environments, close_requests })
}
