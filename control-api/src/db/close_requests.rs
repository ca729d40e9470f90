//! The `close_requests`, `close_applied` and `close_cursors` tables: sessions/close recorded
//! once for the whole fleet, and which gateway applied which request.

use super::gateways::STALE_AFTER_BEATS;
use super::{Db, DbResult};

/// The channel a new request is notified on (the publishers listen beside the routes').
pub const CHANNEL: &str = "gpugate_close_requests";

/// One request as a gateway applies it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CloseRequest {
    pub id: i64,
    pub env_id: String,
    pub ports: Vec<i32>,
    pub port_generations: Vec<i64>,
    pub services: Vec<String>,
    pub name_generations: Vec<i64>,
}

/// Records a request to close the sessions open now on `ports` and `names` of `env_id`,
/// each `(port or service, route generation)`, and notifies the publishers; returns its id.
pub async fn record(db: &Db, env_id: &str, ports: &[(u16, i64)], names: &[(String, i64)]) -> DbResult<i64> {
    let mut tx = db.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO close_requests (env_id, ports, port_generations, services, name_generations) \
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(env_id)
    .bind(ports.iter().map(|(p, _)| i32::from(*p)).collect::<Vec<_>>())
    .bind(ports.iter().map(|(_, g)| *g).collect::<Vec<_>>())
    .bind(names.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>())
    .bind(names.iter().map(|(_, g)| *g).collect::<Vec<_>>())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(id.to_string()).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(id)
}

/// The requests `gateway` has not applied yet, oldest first. A gateway seen for the first
/// time starts after the newest request (it owes nothing to earlier ones).
pub async fn pending(db: &Db, gateway: &str) -> DbResult<Vec<CloseRequest>> {
    sqlx::query(
        "INSERT INTO close_cursors (gateway, since_id) \
         VALUES ($1, (SELECT COALESCE(max(id), 0) FROM close_requests)) ON CONFLICT (gateway) DO NOTHING",
    )
    .bind(gateway)
    .execute(db.pool())
    .await?;
    sqlx::query_as(
        "SELECT r.id, r.env_id, r.ports, r.port_generations, r.services, r.name_generations \
         FROM close_requests r JOIN close_cursors c ON c.gateway = $1 AND r.id > c.since_id \
         WHERE NOT EXISTS (SELECT 1 FROM close_applied a WHERE a.request_id = r.id AND a.gateway = $1) \
         ORDER BY r.id",
    )
    .bind(gateway)
    .fetch_all(db.pool())
    .await
}

/// Records that `gateway` applied requests `ids`.
pub async fn mark_applied(db: &Db, gateway: &str, ids: &[i64]) -> DbResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO close_applied (request_id, gateway) SELECT id, $1 FROM UNNEST($2::int8[]) AS t(id) \
         ON CONFLICT DO NOTHING",
    )
    .bind(gateway)
    .bind(ids)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// How many fresh gateways are registered, and how many of them applied request `id`.
pub async fn progress(db: &Db, id: i64) -> DbResult<(i64, i64)> {
    let fresh = format!("heartbeat_at >= now() - {STALE_AFTER_BEATS} * heartbeat_ms * interval '1 millisecond'");
    sqlx::query_as(&format!(
        "SELECT count(*), count(*) FILTER (WHERE EXISTS \
             (SELECT 1 FROM close_applied a WHERE a.request_id = $1 AND a.gateway = g.name)) \
         FROM gateways g WHERE {fresh}"
    ))
    .bind(id)
    .fetch_one(db.pool())
    .await
}
