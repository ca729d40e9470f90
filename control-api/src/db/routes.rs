//! The `routes` table: what the route table must hold. The publisher reads it; the lifecycle
//! writes it (and every committed change notifies the publisher through a trigger).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use chrono::{DateTime, Utc};
use gpugate_routes::{EnvId, HostKey, Route, Service};
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

/// One row of `name_routes`.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct NameRouteRow {
    pub env_id: String,
    pub service: String,
    pub upstream: String,
    pub generation: i64,
    pub active: bool,
}

impl NameRouteRow {
    /// The table route this row asks for, if the row is well formed.
    pub fn to_route(&self) -> Option<(HostKey, Route)> {
        let route = Route {
            upstream: self.upstream.parse().ok()?,
            env_id: self.env_id.parse::<EnvId>().ok()?,
            service: self.service.parse::<Service>().ok()?,
            generation: u64::try_from(self.generation).ok()?,
            expires_ms: None,
        };
        Some((HostKey::of(&route), route))
    }
}

const NAME_COLUMNS: &str = "env_id, service, upstream, generation, active";

/// What the table must hold: routes by port and routes by name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Desired {
    pub ports: BTreeMap<u16, Route>,
    pub names: BTreeMap<HostKey, Route>,
}

/// Reads a notification payload: a port number, or `n:<env-id>:<service>` for a name route.
pub fn parse_notice(payload: &str) -> Option<Result<u16, HostKey>> {
    if let Some(rest) = payload.strip_prefix("n:") {
        let (env, svc) = rest.split_once(':')?;
        return Some(Err(HostKey::new(env.parse().ok()?, svc.parse().ok()?)));
    }
    payload.parse::<u16>().ok().map(Ok)
}

/// Inserts or replaces the routes of one environment, all active, with `generation`: a port
/// route for each service that holds a pool port (port 0: none), a name route for each of
/// `names`. A port routed to another environment is never taken over: the first such port is
/// returned (`Some`), and the caller must roll the transaction back.
pub async fn put(
    tx: &mut Tx<'_>,
    env_id: &str,
    generation: i64,
    routes: &[(u16, Service, SocketAddr)],
    names: &[Service],
) -> DbResult<Option<u16>> {
    for (_, service, upstream) in routes.iter().filter(|(_, s, _)| names.contains(s)) {
        sqlx::query(
            "INSERT INTO name_routes (env_id, service, upstream, generation, active) \
             VALUES ($1, $2, $3, $4, true) \
             ON CONFLICT (env_id, service) DO UPDATE SET upstream = EXCLUDED.upstream, \
                 generation = EXCLUDED.generation, active = true, updated_at = now()",
        )
        .bind(env_id)
        .bind(service.as_str())
        .bind(upstream.to_string())
        .bind(generation)
        .execute(&mut **tx)
        .await?;
    }
    for (port, service, upstream) in routes.iter().filter(|(p, _, _)| *p != 0) {
        let written = sqlx::query(
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
        if written.rows_affected() == 0 {
            return Ok(Some(*port));
        }
    }
    Ok(None)
}

/// Disables (keeps) an environment's routes, by port and by name: connections are refused,
/// the ports stay.
pub async fn deactivate<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<u64> {
    let (n,): (i64,) = sqlx::query_as(
        "WITH p AS (UPDATE routes SET active = false, updated_at = now() \
                    WHERE env_id = $1 AND active RETURNING 1), \
              n AS (UPDATE name_routes SET active = false, updated_at = now() \
                    WHERE env_id = $1 AND active RETURNING 1) \
         SELECT (SELECT count(*) FROM p) + (SELECT count(*) FROM n)",
    )
    .bind(env_id)
    .fetch_one(exec)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Deletes an environment's routes, by port and by name.
pub async fn delete_env<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<u64> {
    let (n,): (i64,) = sqlx::query_as(
        "WITH p AS (DELETE FROM routes WHERE env_id = $1 RETURNING 1), \
              n AS (DELETE FROM name_routes WHERE env_id = $1 RETURNING 1) \
         SELECT (SELECT count(*) FROM p) + (SELECT count(*) FROM n)",
    )
    .bind(env_id)
    .fetch_one(exec)
    .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Every name route (debug view).
pub async fn all_names(db: &Db) -> DbResult<Vec<NameRouteRow>> {
    sqlx::query_as(&format!("SELECT {NAME_COLUMNS} FROM name_routes ORDER BY env_id, service"))
        .fetch_all(db.pool())
        .await
}

/// The name routes of one environment.
pub async fn names_of_env<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<Vec<NameRouteRow>> {
    sqlx::query_as(&format!("SELECT {NAME_COLUMNS} FROM name_routes WHERE env_id = $1 ORDER BY service"))
        .bind(env_id)
        .fetch_all(exec)
        .await
}

/// What several name keys must hold; keys absent from the map must have no route.
pub async fn desired_names(db: &Db, keys: &[HostKey]) -> DbResult<BTreeMap<HostKey, Route>> {
    let envs: Vec<String> = keys.iter().map(|k| k.env_id.to_string()).collect();
    let svcs: Vec<String> = keys.iter().map(|k| k.service.as_str().to_string()).collect();
    let rows: Vec<NameRouteRow> = sqlx::query_as(&format!(
        "SELECT {NAME_COLUMNS} FROM name_routes r \
         JOIN unnest($1::text[], $2::text[]) AS k(env_id, service) USING (env_id, service) \
         WHERE r.active"
    ))
    .bind(envs)
    .bind(svcs)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.iter().filter_map(NameRouteRow::to_route).collect())
}

/// The revoke epochs name routes must have reached (all, or those of `keys`).
pub async fn name_revoke_epochs(db: &Db, keys: Option<&[HostKey]>) -> DbResult<BTreeMap<HostKey, u64>> {
    let envs: Option<Vec<String>> = keys.map(|ks| ks.iter().map(|k| k.env_id.to_string()).collect());
    let svcs: Option<Vec<String>> = keys.map(|ks| ks.iter().map(|k| k.service.as_str().to_string()).collect());
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT env_id, service, revoke_epoch FROM name_routes r WHERE active AND revoke_epoch > 0 \
         AND ($1::text[] IS NULL OR (env_id, service) IN \
              (SELECT * FROM unnest($1::text[], $2::text[])))",
    )
    .bind(envs)
    .bind(svcs)
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(e, s, n)| Some((HostKey::new(e.parse().ok()?, s.parse().ok()?), u64::try_from(n).ok()?)))
        .collect())
}

/// Asks the publisher to close the sessions open now on name routes of `env_id`: each
/// `(service, epoch)` as [`request_revoke`] does for ports; returns the services asked for.
pub async fn request_name_revoke(db: &Db, env_id: &str, targets: &[(Service, u64)]) -> DbResult<Vec<String>> {
    let svcs: Vec<String> = targets.iter().map(|(s, _)| s.as_str().to_string()).collect();
    let epochs: Vec<i64> = targets.iter().map(|(_, e)| i64::try_from(*e).unwrap_or(i64::MAX)).collect();
    let rows: Vec<(String,)> = sqlx::query_as(
        "UPDATE name_routes r SET revoke_epoch = GREATEST(r.revoke_epoch, t.epoch), updated_at = now() \
         FROM unnest($2::text[], $3::bigint[]) AS t(service, epoch) \
         WHERE r.service = t.service AND r.env_id = $1 AND r.active RETURNING r.service",
    )
    .bind(env_id)
    .bind(svcs)
    .bind(epochs)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(|(s,)| s).collect())
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

/// The table the publisher must hold: every active route, by port and by name.
pub async fn desired(db: &Db) -> DbResult<Desired> {
    let rows: Vec<RouteRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM routes WHERE active ORDER BY port"))
            .fetch_all(db.pool())
            .await?;
    let names: Vec<NameRouteRow> =
        sqlx::query_as(&format!("SELECT {NAME_COLUMNS} FROM name_routes WHERE active"))
            .fetch_all(db.pool())
            .await?;
    Ok(Desired {
        ports: rows.iter().filter_map(RouteRow::to_route).collect(),
        names: names.iter().filter_map(NameRouteRow::to_route).collect(),
    })
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

/// Repairs the routes tables (by port and by name) against environment states: active
/// routes of environments that are not running are disabled, rows of deleted or failed
/// environments are deleted. Returns (disabled, deleted).
pub async fn prune(db: &Db) -> DbResult<(u64, u64)> {
    let (mut disabled, mut deleted) = (0, 0);
    for table in ["routes", "name_routes"] {
        deleted += sqlx::query(&format!(
            "DELETE FROM {table} r USING environments e WHERE e.id = r.env_id \
             AND e.status IN ('deleted', 'failed') AND e.op_instance IS NULL"
        ))
        .execute(db.pool())
        .await?
        .rows_affected();
        disabled += sqlx::query(&format!(
            "UPDATE {table} r SET active = false, updated_at = now() FROM environments e \
             WHERE e.id = r.env_id AND r.active AND e.status NOT IN ('running', 'unreachable') AND e.op_instance IS NULL"
        ))
        .execute(db.pool())
        .await?
        .rows_affected();
    }
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
