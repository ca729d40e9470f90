//! The `service_readiness` table: per service of a running environment, whether it answered
//! like the service it is since the environment's last start.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::{DbResult, Tx};

/// One service's readiness as the API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReadinessRow {
    pub service: String,
    pub started_at: DateTime<Utc>,
    pub deadline_at: DateTime<Utc>,
    pub ready_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// A service still to probe: what a prober needs to go on with it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pending {
    pub env_id: String,
    pub service: String,
    pub generation: i64,
    pub upstream: String,
    pub prober: Option<i64>,
}

/// Starts readiness over for a start with route `generation`: one row per service, probed by
/// `prober`, each with its deadline in seconds from now.
pub async fn reset(
    tx: &mut Tx<'_>,
    env_id: &str,
    generation: i64,
    services: &[(&str, u64)],
    prober: i64,
) -> DbResult<()> {
    sqlx::query("DELETE FROM service_readiness WHERE env_id = $1").bind(env_id).execute(&mut **tx).await?;
    for (service, deadline_s) in services {
        sqlx::query(
            "INSERT INTO service_readiness (env_id, service, generation, deadline_at, prober) \
             VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5)",
        )
        .bind(env_id)
        .bind(service)
        .bind(generation)
        .bind(i64::try_from(*deadline_s).unwrap_or(i64::MAX) as f64)
        .bind(prober)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Forgets an environment's readiness (stopped, failed, deleted): nothing probes it any more.
pub async fn clear<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<u64> {
    Ok(sqlx::query("DELETE FROM service_readiness WHERE env_id = $1").bind(env_id).execute(exec).await?.rows_affected())
}

/// The readiness rows of one environment, by service.
pub async fn of_env<'e, E: PgExecutor<'e>>(exec: E, env_id: &str) -> DbResult<Vec<ReadinessRow>> {
    sqlx::query_as(
        "SELECT service, started_at, deadline_at, ready_at, failed_at, last_error \
         FROM service_readiness WHERE env_id = $1 ORDER BY service",
    )
    .bind(env_id)
    .fetch_all(exec)
    .await
}

/// Milliseconds left to the deadline of a service still to probe (negative: past it), or
/// `None` when it is not to be probed any more: decided, started again (another generation),
/// or its environment is no longer running.
pub async fn remaining_ms<'e, E: PgExecutor<'e>>(
    exec: E,
    env_id: &str,
    service: &str,
    generation: i64,
) -> DbResult<Option<i64>> {
    sqlx::query_scalar(
        "SELECT (extract(epoch FROM r.deadline_at - now()) * 1000)::bigint \
         FROM service_readiness r JOIN environments e ON e.id = r.env_id \
         WHERE r.env_id = $1 AND r.service = $2 AND r.generation = $3 \
           AND r.ready_at IS NULL AND r.failed_at IS NULL AND e.status = 'running'",
    )
    .bind(env_id)
    .bind(service)
    .bind(generation)
    .fetch_optional(exec)
    .await
}

/// Records that the service answered; returns the seconds since its start if this call
/// decided it.
pub async fn mark_ready<'e, E: PgExecutor<'e>>(
    exec: E,
    env_id: &str,
    service: &str,
    generation: i64,
) -> DbResult<Option<f64>> {
    sqlx::query_scalar(
        "UPDATE service_readiness SET ready_at = now(), last_error = NULL \
         WHERE env_id = $1 AND service = $2 AND generation = $3 AND ready_at IS NULL AND failed_at IS NULL \
         RETURNING extract(epoch FROM now() - started_at)::float8",
    )
    .bind(env_id)
    .bind(service)
    .bind(generation)
    .fetch_optional(exec)
    .await
}

/// Records that the service did not answer within its deadline; whether this call decided it.
pub async fn mark_failed<'e, E: PgExecutor<'e>>(
    exec: E,
    env_id: &str,
    service: &str,
    generation: i64,
    reason: &str,
) -> DbResult<bool> {
    Ok(sqlx::query(
        "UPDATE service_readiness SET failed_at = now(), last_error = $4 \
         WHERE env_id = $1 AND service = $2 AND generation = $3 AND ready_at IS NULL AND failed_at IS NULL",
    )
    .bind(env_id)
    .bind(service)
    .bind(generation)
    .bind(reason)
    .execute(exec)
    .await?
    .rows_affected()
        == 1)
}

/// Records the last probe's failure while the service is still being probed.
pub async fn set_last_error<'e, E: PgExecutor<'e>>(
    exec: E,
    env_id: &str,
    service: &str,
    generation: i64,
    error: &str,
) -> DbResult<()> {
    sqlx::query(
        "UPDATE service_readiness SET last_error = $4 \
         WHERE env_id = $1 AND service = $2 AND generation = $3 AND ready_at IS NULL AND failed_at IS NULL",
    )
    .bind(env_id)
    .bind(service)
    .bind(generation)
    .bind(error)
    .execute(exec)
    .await?;
    Ok(())
}

/// Services of running environments still to probe, with the upstream their active route
/// points at.
pub async fn pending<'e, E: PgExecutor<'e>>(exec: E) -> DbResult<Vec<Pending>> {
    sqlx::query_as(
        "SELECT r.env_id, r.service, r.generation, ro.upstream, r.prober \
         FROM service_readiness r \
         JOIN environments e ON e.id = r.env_id \
         JOIN routes ro ON ro.env_id = r.env_id AND ro.service = r.service AND ro.active \
         WHERE r.ready_at IS NULL AND r.failed_at IS NULL AND e.status = 'running' \
         ORDER BY r.env_id, r.service",
    )
    .fetch_all(exec)
    .await
}

/// Takes a pending service over from `from` (a dead instance, or nobody); whether it is
/// now `to`'s to probe.
pub async fn take_over<'e, E: PgExecutor<'e>>(
    exec: E,
    env_id: &str,
    service: &str,
    generation: i64,
    from: Option<i64>,
    to: i64,
) -> DbResult<bool> {
    Ok(sqlx::query(
        "UPDATE service_readiness SET prober = $5 \
         WHERE env_id = $1 AND service = $2 AND generation = $3 AND prober IS NOT DISTINCT FROM $4",
    )
    .bind(env_id)
    .bind(service)
    .bind(generation)
    .bind(from)
    .bind(to)
    .execute(exec)
    .await?
    .rows_affected()
        == 1)
}
