//! The `port_pool` table: pool synchronisation from configuration, allocation, release,
//! quarantine and statistics.

use std::collections::{BTreeMap, BTreeSet};

use gpugate_routes::Service;
use serde::Serialize;
use sqlx::PgExecutor;

use super::{Db, DbResult, Tx};
use crate::config::Config;

/// Why a pool synchronisation was refused.
#[derive(Debug, thiserror::Error)]
pub enum PoolSyncError {
    /// The new pools would drop ports that environments hold.
    #[error("cannot shrink the pools: ports {ports} are allocated ({detail})")]
    InUse { ports: String, detail: String },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// What a synchronisation changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct PoolSyncReport {
    /// Ports added to a pool.
    pub added: u64,
    /// Free ports dropped from the pools.
    pub removed: u64,
    /// Ports newly marked reserved.
    pub reserved: u64,
    /// Ports no longer reserved.
    pub unreserved: u64,
}

/// Makes `port_pool` match the configured pools, in one transaction, idempotently.
/// Ports leaving the pools must be free (available, quarantined or reserved); otherwise
/// nothing changes and the error names the allocated ports.
pub async fn sync_pools(db: &Db, cfg: &Config) -> Result<PoolSyncReport, PoolSyncError> {
    let mut want: BTreeMap<i32, (&'static str, bool)> = BTreeMap::new();
    for (service, pool) in cfg.services() {
        let reserved: BTreeSet<u16> = pool.reserved.iter().copied().collect();
        for port in pool.range.ports() {
            want.insert(i32::from(port), (service.as_str(), reserved.contains(&port)));
        }
    }
    let ports: Vec<i32> = want.keys().copied().collect();
    let services: Vec<&str> = want.values().map(|v| v.0).collect();
    let reserved: Vec<bool> = want.values().map(|v| v.1).collect();

    let mut tx = db.begin().await?;
    // One pool change at a time across instances.
    sqlx::query("LOCK TABLE port_pool IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    let blocked: Vec<(i32, String, Option<String>)> = sqlx::query_as(
        "SELECT p.port, p.service, p.env_id FROM port_pool p \
         LEFT JOIN unnest($1::int[], $2::text[]) AS w(port, service) ON w.port = p.port \
         WHERE p.status = 'allocated' AND (w.port IS NULL OR w.service <> p.service) \
         ORDER BY p.port",
    )
    .bind(&ports)
    .bind(&services)
    .fetch_all(&mut *tx)
    .await?;
    if !blocked.is_empty() {
        let list: Vec<String> = blocked.iter().map(|b| b.0.to_string()).collect();
        let detail: Vec<String> = blocked
            .iter()
            .take(10)
            .map(|(p, s, e)| format!("{p} ({s}, environment {})", e.as_deref().unwrap_or("?")))
            .collect();
        return Err(PoolSyncError::InUse { ports: list.join(", "), detail: detail.join("; ") });
    }
    // Free ports that leave the pools, or move to another service, are dropped first.
    let removed = sqlx::query(
        "DELETE FROM port_pool p WHERE NOT EXISTS \
         (SELECT 1 FROM unnest($1::int[], $2::text[]) AS w(port, service) \
          WHERE w.port = p.port AND w.service = p.service) \
         AND NOT EXISTS (SELECT 1 FROM routes r WHERE r.port = p.port)",
    )
    .bind(&ports)
    .bind(&services)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let added = sqlx::query(
        "INSERT INTO port_pool (port, service, status, reserved) \
         SELECT port, service, CASE WHEN res THEN 'reserved' ELSE 'available' END, res \
         FROM unnest($1::int[], $2::text[], $3::bool[]) AS w(port, service, res) \
         ON CONFLICT (port) DO NOTHING",
    )
    .bind(&ports)
    .bind(&services)
    .bind(&reserved)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // Every port remembers whether it is reserved, whatever its status: an allocated port
    // listed as reserved becomes reserved when it is released, not available.
    sqlx::query(
        "UPDATE port_pool p SET reserved = w.res FROM unnest($1::int[], $2::bool[]) AS w(port, res) \
         WHERE w.port = p.port AND p.reserved <> w.res",
    )
    .bind(&ports)
    .bind(&reserved)
    .execute(&mut *tx)
    .await?;
    // Reserve free ports now listed as reserved.
    let newly_reserved = sqlx::query(
        "UPDATE port_pool p SET status = 'reserved', quarantine_until = NULL \
         FROM unnest($1::int[], $2::bool[]) AS w(port, res) \
         WHERE w.port = p.port AND w.res AND p.status IN ('available', 'quarantined')",
    )
    .bind(&ports)
    .bind(&reserved)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let unreserved = sqlx::query(
        "UPDATE port_pool p SET status = 'available' \
         FROM unnest($1::int[], $2::bool[]) AS w(port, res) \
         WHERE w.port = p.port AND NOT w.res AND p.status = 'reserved'",
    )
    .bind(&ports)
    .bind(&reserved)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let report = PoolSyncReport { added, removed, reserved: newly_reserved, unreserved };
    if report != PoolSyncReport::default() {
        super::event(&mut *tx, None, "pools_synced", serde_json::to_value(report).unwrap_or_default())
            .await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// Allocates one free port of `service` to `env_id` inside `tx`; `None` when the pool has
/// none. One statement, correct across API replicas: `FOR UPDATE SKIP LOCKED` makes concurrent
/// transactions pass over each other's candidate rows instead of queueing on (or sharing) them.
/// Ports that were never used or were released longest ago come first, so a just-released port
/// is the last to be reused even after its quarantine.
pub async fn allocate(tx: &mut Tx<'_>, service: Service, env_id: &str) -> DbResult<Option<u16>> {
    let port: Option<i32> = sqlx::query_scalar(
        "UPDATE port_pool SET status = 'allocated', env_id = $2, allocated_at = now(), \
             quarantine_until = NULL \
         WHERE port = ( \
             SELECT port FROM port_pool \
             WHERE service = $1 AND NOT reserved AND (status = 'available' \
                   OR (status = 'quarantined' AND quarantine_until <= now())) \
             ORDER BY released_at NULLS FIRST, port \
             LIMIT 1 FOR UPDATE SKIP LOCKED) \
         RETURNING port",
    )
    .bind(service.as_str())
    .bind(env_id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(port.and_then(|p| u16::try_from(p).ok()))
}

/// Returns `env_id`'s ports to the pool: into quarantine for `quarantine_s` seconds (0: at once
/// available). Ports listed as reserved meanwhile become reserved. Returns the ports released.
pub async fn release_env<'e, E: PgExecutor<'e>>(
    exec: E,
    env_id: &str,
    quarantine_s: u64,
) -> DbResult<Vec<u16>> {
    let ports: Vec<i32> = sqlx::query_scalar(
        "UPDATE port_pool SET env_id = NULL, released_at = now(), \
             status = CASE WHEN reserved THEN 'reserved' WHEN $2 > 0 THEN 'quarantined' ELSE 'available' END, \
             quarantine_until = CASE WHEN NOT reserved AND $2 > 0 THEN now() + make_interval(secs => $2) END \
         WHERE env_id = $1 AND status = 'allocated' RETURNING port",
    )
    .bind(env_id)
    .bind(quarantine_s as f64)
    .fetch_all(exec)
    .await?;
    Ok(ports.into_iter().filter_map(|p| u16::try_from(p).ok()).collect())
}

/// Marks quarantined ports whose quarantine has ended as available; returns how many.
pub async fn end_quarantine(db: &Db) -> DbResult<u64> {
    Ok(sqlx::query(
        "UPDATE port_pool SET status = CASE WHEN reserved THEN 'reserved' ELSE 'available' END, \
             quarantine_until = NULL \
         WHERE status = 'quarantined' AND quarantine_until <= now()",
    )
    .execute(db.pool())
    .await?
    .rows_affected())
}

/// Releases (into quarantine) ports allocated to environments that no longer hold ports:
/// deleted, or missing. Returns (port, env id) pairs released.
pub async fn release_orphans(db: &Db, quarantine_s: u64) -> DbResult<Vec<(u16, String)>> {
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "WITH orphan AS ( \
             SELECT p.port, p.env_id FROM port_pool p \
             LEFT JOIN environments e ON e.id = p.env_id \
             WHERE p.status = 'allocated' AND (e.id IS NULL OR e.status = 'deleted') \
             FOR UPDATE OF p SKIP LOCKED) \
         UPDATE port_pool p SET env_id = NULL, released_at = now(), \
             status = CASE WHEN p.reserved THEN 'reserved' ELSE 'quarantined' END, \
             quarantine_until = CASE WHEN p.reserved THEN NULL ELSE now() + make_interval(secs => $1) END \
         FROM orphan o WHERE p.port = o.port RETURNING p.port, o.env_id",
    )
    .bind(quarantine_s.max(1) as f64)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().filter_map(|(p, e)| Some((u16::try_from(p).ok()?, e))).collect())
}

/// One service's pool figures.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct PoolStats {
    /// The service.
    pub service: String,
    /// Ports in the pool.
    pub total: i64,
    /// Held by an environment.
    pub allocated: i64,
    /// Released and waiting out their quarantine.
    pub quarantined: i64,
    /// Free to hand out (including quarantined ports whose time is up).
    pub available: i64,
    /// Never handed out.
    pub reserved: i64,
    /// allocated / (total - reserved), 0..1.
    pub utilisation: f64,
}

/// Figures for every service that has a pool.
pub async fn stats(db: &Db) -> DbResult<Vec<PoolStats>> {
    let rows: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT service, count(*), \
             count(*) FILTER (WHERE status = 'allocated'), \
             count(*) FILTER (WHERE status = 'quarantined' AND quarantine_until > now()), \
             count(*) FILTER (WHERE status = 'available' \
                 OR (status = 'quarantined' AND quarantine_until <= now())), \
             count(*) FILTER (WHERE status = 'reserved') \
         FROM port_pool GROUP BY service ORDER BY service",
    )
    .fetch_all(db.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(service, total, allocated, quarantined, available, reserved)| {
            let usable = (total - reserved).max(1) as f64;
            PoolStats {
                service,
                total,
                allocated,
                quarantined,
                available,
                reserved,
                utilisation: (allocated as f64 / usable * 10_000.0).round() / 10_000.0,
            }
        })
        .collect())
}

/// The ports `env_id` holds, by service.
pub async fn env_ports<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<Vec<(u16, Service)>> {
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "SELECT port, service FROM port_pool WHERE env_id = $1 ORDER BY port",
    )
    .bind(env_id)
    .fetch_all(exec)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(p, s)| Some((u16::try_from(p).ok()?, s.parse().ok()?)))
        .collect())
}

/// Every service of an environment with its pool port, port 0 for a service reached by name
/// only (`services`: the environment's services, in its order).
pub async fn env_endpoints<'e, E: PgExecutor<'e>>(
    exec: E,
    env_id: &str,
    services: &[String],
) -> DbResult<Vec<(u16, Service)>> {
    let held = env_ports(exec, env_id).await?;
    Ok(endpoints(services, &held))
}

/// [`env_endpoints`] over ports already read.
pub fn endpoints(services: &[String], held: &[(u16, Service)]) -> Vec<(u16, Service)> {
    let mut out: Vec<(u16, Service)> = held.to_vec();
    for svc in services.iter().filter_map(|s| s.parse::<Service>().ok()) {
        if !out.iter().any(|(_, s)| *s == svc) {
            out.push((0, svc));
        }
    }
    out
}
