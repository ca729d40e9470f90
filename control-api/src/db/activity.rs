//! The `gateway_activity` table and the gateways' report times: what each gateway's
//! publisher last reported of its table's counters, and the fleet-wide sums the API reads.
//!
//! A gateway counts for activity while it is fresh twice over: its registry heartbeat within
//! [`super::gateways::STALE_AFTER_BEATS`] of its heartbeat interval, and its last activity
//! report within as many of its report interval. Rows of other gateways are kept (they come
//! back to the sum when the gateway does) but never summed.

use std::collections::BTreeMap;

use gpugate_routes::Counters;

use super::gateways::STALE_AFTER_BEATS;
use super::{Db, DbResult};

/// One route's counters on one gateway (its port route and its name route summed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub env_id: String,
    pub service: String,
    /// The public port (0: reached by name only).
    pub port: u16,
    /// The route generation the counters belong to.
    pub generation: u64,
    pub counters: Counters,
}

/// A row as both fresh tests (heartbeat and report), on `gateways g`, by the database's clock.
fn fresh_sql() -> String {
    format!(
        "g.heartbeat_at >= now() - {n} * g.heartbeat_ms * interval '1 millisecond' \
         AND g.activity_at IS NOT NULL \
         AND g.activity_at >= now() - {n} * g.activity_report_ms * interval '1 millisecond'",
        n = STALE_AFTER_BEATS
    )
}

fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Writes one report of gateway `gateway` in one transaction: with `replace`, every earlier
/// row of the gateway goes first (its first report, or the first after a failed one); then
/// the `changed` rows are upserted and the `gone` ones (environment id, service) deleted, and
/// the gateway's report time is renewed with its interval `report_ms`. Returns whether the
/// gateway's registry row exists (before its first heartbeat the report time has nowhere to
/// go; the next report renews it).
pub async fn report(
    db: &Db,
    gateway: &str,
    report_ms: u64,
    replace: bool,
    changed: &[Reported],
    gone: &[(String, String)],
) -> DbResult<bool> {
    let mut tx = db.begin().await?;
    if replace {
        sqlx::query("DELETE FROM gateway_activity WHERE gateway = $1").bind(gateway).execute(&mut *tx).await?;
    }
    if !gone.is_empty() {
        let (envs, services): (Vec<&str>, Vec<&str>) = gone.iter().map(|(e, s)| (e.as_str(), s.as_str())).unzip();
        sqlx::query(
            "DELETE FROM gateway_activity WHERE gateway = $1 \
             AND (env_id, service) IN (SELECT * FROM UNNEST($2::text[], $3::text[]))",
        )
        .bind(gateway)
        .bind(&envs)
        .bind(&services)
        .execute(&mut *tx)
        .await?;
    }
    if !changed.is_empty() {
        let envs: Vec<&str> = changed.iter().map(|r| r.env_id.as_str()).collect();
        let services: Vec<&str> = changed.iter().map(|r| r.service.as_str()).collect();
        let ports: Vec<i32> = changed.iter().map(|r| i32::from(r.port)).collect();
        let column = |f: fn(&Reported) -> u64| changed.iter().map(|r| big(f(r))).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO gateway_activity (gateway, env_id, service, port, generation, connections_active, \
                 connections_total, revoked_total, bytes_in, bytes_out, last_activity_ms) \
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::int4[], $5::int8[], $6::int8[], $7::int8[], \
                                      $8::int8[], $9::int8[], $10::int8[], $11::int8[]) \
             ON CONFLICT (gateway, env_id, service) DO UPDATE SET \
                 port = EXCLUDED.port, generation = EXCLUDED.generation, \
                 connections_active = EXCLUDED.connections_active, \
                 connections_total = EXCLUDED.connections_total, revoked_total = EXCLUDED.revoked_total, \
                 bytes_in = EXCLUDED.bytes_in, bytes_out = EXCLUDED.bytes_out, \
                 last_activity_ms = EXCLUDED.last_activity_ms",
        )
        .bind(gateway)
        .bind(&envs)
        .bind(&services)
        .bind(&ports)
        .bind(column(|r| r.generation))
        .bind(column(|r| r.counters.connections_active))
        .bind(column(|r| r.counters.connections_total))
        .bind(column(|r| r.counters.revoked_total))
        .bind(column(|r| r.counters.bytes_in))
        .bind(column(|r| r.counters.bytes_out))
        .bind(column(|r| r.counters.last_activity_ms))
        .execute(&mut *tx)
        .await?;
    }
    let registered = sqlx::query(
        "UPDATE gateways SET activity_at = now(), activity_report_ms = $2 WHERE name = $1",
    )
    .bind(gateway)
    .bind(i32::try_from(report_ms).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await?
    .rows_affected()
        > 0;
    tx.commit().await?;
    Ok(registered)
}

/// One service's counters summed over every fresh gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ServiceSum {
    pub service: String,
    pub connections_active: i64,
    pub connections_total: i64,
    pub revoked_total: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    pub last_activity_ms: i64,
}

/// `env_id`'s counters per service, summed over every fresh gateway (sessions and bytes
/// add up; the last activity is the latest).
pub async fn of_env(db: &Db, env_id: &str) -> DbResult<BTreeMap<String, ServiceSum>> {
    let rows: Vec<ServiceSum> = sqlx::query_as(&format!(
        "SELECT a.service, sum(a.connections_active)::int8 AS connections_active, \
                sum(a.connections_total)::int8 AS connections_total, sum(a.revoked_total)::int8 AS revoked_total, \
                sum(a.bytes_in)::int8 AS bytes_in, sum(a.bytes_out)::int8 AS bytes_out, \
                max(a.last_activity_ms) AS last_activity_ms \
         FROM gateway_activity a JOIN gateways g ON g.name = a.gateway \
         WHERE a.env_id = $1 AND {fresh} GROUP BY a.service",
        fresh = fresh_sql()
    ))
    .bind(env_id)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().map(|r| (r.service.clone(), r)).collect())
}

/// A registered gateway whose activity cannot be trusted now, and why.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Unfresh {
    pub name: String,
    /// `heartbeat_late`, `never_reported` or `report_late`.
    pub reason: String,
}

/// How the registry stands for activity: how many gateways are registered, and the ones
/// that are not fresh (their sessions are unknown).
pub async fn freshness(db: &Db) -> DbResult<(i64, Vec<Unfresh>)> {
    let registered: i64 = sqlx::query_scalar("SELECT count(*) FROM gateways").fetch_one(db.pool()).await?;
    let unfresh = sqlx::query_as(&format!(
        "SELECT g.name, CASE \
             WHEN g.heartbeat_at < now() - {n} * g.heartbeat_ms * interval '1 millisecond' THEN 'heartbeat_late' \
             WHEN g.activity_at IS NULL THEN 'never_reported' \
             ELSE 'report_late' END AS reason \
         FROM gateways g WHERE NOT COALESCE(({fresh}), false) ORDER BY g.name",
        n = STALE_AFTER_BEATS,
        fresh = fresh_sql()
    ))
    .fetch_all(db.pool())
    .await?;
    Ok((registered, unfresh))
}
