//! The `routes` table: what the route table must hold. The publisher reads it; the lifecycle
//! writes it (and every committed change notifies the publisher through a trigger).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use chrono::{DateTime, Utc};
use gpugate_routes::{EnvId, Route, Service};
use sqlx::PgExecutor;

use super::{Db, DbResult, Tx};

/// The channel the routes trigger notifies on.
pub const CHANNEL: &str = "gpugate_routes";

/// One row of `routes`.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct RouteRow {
    pub port: i32,
    pub env_id: String,
    pub service: String,
    pub upstream: String,
    pub generation: i64,
    pub expires_at: Option<DateTime<Utc>>,
    pub active: bool,
}

impl RouteRow {
    /// The table route this row asks for, if the row is well formed.
    pub fn to_route(&self) -> Option<(u16, Route)> {
        let port = u16::try_from(self.port).ok().filter(|p| *p != 0)?;
        let upstream: SocketAddr = self.upstream.parse().ok()?;
        Some((
            port,
            Route {
                upstream,
                env_id: self.env_id.parse::<EnvId>().ok()?,
                service: self.service.parse::<Service>().ok()?,
                generation: u64::try_from(self.generation).ok()?,
                expires_ms: self
                    .expires_at
                    .map(|t| u64::try_from(t.timestamp_millis()).unwrap_or(0)),
            },
        ))
    }
}

const COLUMNS: &str = "port, env_id, service, upstream, generation, expires_at, active";

/// Inserts or replaces the routes of one environment, all active, with `generation`.
pub async fn put(
    tx: &mut Tx<'_>,
    env_id: &str,
    generation: i64,
    routes: &[(u16, Service, SocketAddr)],
) -> DbResult<()> {
    for (port, service, upstream) in routes {
        sqlx::query(
            "INSERT INTO routes (port, env_id, service, upstream, generation, active) \
             VALUES ($1, $2, $3, $4, $5, true) \
             ON CONFLICT (port) DO UPDATE SET env_id = EXCLUDED.env_id, \
                 service = EXCLUDED.service, upstream = EXCLUDED.upstream, \
                 generation = EXCLUDED.generation, active = true, updated_at = now() \
             WHERE routes.env_id = EXCLUDED.env_id",
        )
        .bind(i32::from(*port))
        .bind(env_id)
        .bind(service.as_str())
        .bind(upstream.to_string())
        .bind(generation)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Disables (keeps) an environment's routes: connections are refused, the ports stay.
pub async fn deactivate<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<u64> {
    Ok(sqlx::query(
        "UPDATE routes SET active = false, updated_at = now() WHERE env_id = $1 AND active",
    )
    .bind(env_id)
    .execute(exec)
    .await?
    .rows_affected())
}

/// Deletes an environment's routes.
pub async fn delete_env<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<u64> {
    Ok(sqlx::query("DELETE FROM routes WHERE env_id = $1")
        .bind(env_id)
        .execute(exec)
        .await?
        .rows_affected())
}

/// Every row (debug view, reconciler).
pub async fn all(db: &Db) -> DbResult<Vec<RouteRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM routes ORDER BY port"))
        .fetch_all(db.pool())
        .await
}

/// The rows of one environment.
pub async fn of_env<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<Vec<RouteRow>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM routes WHERE env_id = $1 ORDER BY port"))
        .bind(env_id)
        .fetch_all(exec)
        .await
}

/// The table the publisher must hold: every active route.
pub async fn desired(db: &Db) -> DbResult<BTreeMap<u16, Route>> {
    let rows: Vec<RouteRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM routes WHERE active ORDER BY port"))
            .fetch_all(db.pool())
            .await?;
    Ok(rows.iter().filter_map(RouteRow::to_route).collect())
}

/// What one port must hold (`None`: no route).
pub async fn desired_port(db: &Db, port: u16) -> DbResult<Option<Route>> {
    let row: Option<RouteRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM routes WHERE port = $1 AND active"))
            .bind(i32::from(port))
            .fetch_optional(db.pool())
            .await?;
    Ok(row.as_ref().and_then(RouteRow::to_route).map(|(_, r)| r))
}

/// Repairs the routes table against environment states: active routes of environments that
/// are not running are disabled, rows of deleted or failed environments are deleted. Returns
/// (disabled, deleted).
pub async fn prune(db: &Db) -> DbResult<(u64, u64)> {
    let deleted = sqlx::query(
        "DELETE FROM routes r USING environments e WHERE e.id = r.env_id \
         AND e.status IN ('deleted', 'failed') AND e.op_instance IS NULL",
    )
    .execute(db.pool())
    .await?
    .rows_affected();
    let disabled = sqlx::query(
        "UPDATE routes r SET active = false, updated_at = now() FROM environments e \
         WHERE e.id = r.env_id AND r.active AND e.status <> 'running' AND e.op_instance IS NULL",
    )
    .execute(db.pool())
    .await?
    .rows_affected();
    Ok((disabled, deleted))
}

/// What several ports must hold; ports absent from the map must have no route.
pub async fn desired_ports(db: &Db, ports: &[u16]) -> DbResult<BTreeMap<u16, Route>> {
    let ports: Vec<i32> = ports.iter().map(|p| i32::from(*p)).collect();
    let rows: Vec<RouteRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM routes WHERE port = ANY($1) AND active"
    ))
    .bind(ports)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.iter().filter_map(RouteRow::to_route).collect())
}

/// The revoke epochs the table must have reached, for active routes that ever had a
/// sessions/close (all of them, or those of `ports`).
pub async fn revoke_epochs(db: &Db, ports: Option<&[u16]>) -> DbResult<BTreeMap<u16, u64>> {
    let ports: Option<Vec<i32>> = ports.map(|ps| ps.iter().map(|p| i32::from(*p)).collect());
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT port, revoke_epoch FROM routes WHERE active AND revoke_epoch > 0 \
         AND ($1::integer[] IS NULL OR port = ANY($1))",
    )
    .bind(ports)
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(p, e)| Some((u16::try_from(p).ok()?, u64::try_from(e).ok()?)))
        .collect())
}

/// Asks the publisher to close the sessions open now on each `(port, epoch)`: the port's
/// revoke epoch must reach `epoch` (the one the caller read in the table, plus one). Only
/// active routes of `env_id`; returns the ports asked for.
pub async fn request_revoke(db: &Db, env_id: &str, targets: &[(u16, u64)]) -> DbResult<Vec<u16>> {
    let ports: Vec<i32> = targets.iter().map(|(p, _)| i32::from(*p)).collect();
    let epochs: Vec<i64> = targets.iter().map(|(_, e)| i64::try_from(*e).unwrap_or(i64::MAX)).collect();
    let rows: Vec<(i32,)> = sqlx::query_as(
        "UPDATE routes r SET revoke_epoch = GREATEST(r.revoke_epoch, t.epoch), updated_at = now() \
         FROM unnest($2::integer[], $3::bigint[]) AS t(port, epoch) \
         WHERE r.port = t.port AND r.env_id = $1 AND r.active RETURNING r.port",
    )
    .bind(env_id)
    .bind(ports)
    .bind(epochs)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().filter_map(|(p,)| u16::try_from(p).ok()).collect())
}
