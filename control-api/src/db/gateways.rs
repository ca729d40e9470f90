//! The `gateways` table (the gateway registry) and the generation barrier that tells a
//! publisher which route generations its table holds.
//!
//! Route generations come from `route_generation_seq` inside the transactions that commit
//! routes, so they commit in any order: a table holding generation 7 may still lack 6, whose
//! transaction is still open. A gateway therefore reports a watermark, never the newest
//! generation it saw, and learns it from a barrier: [`barrier`] waits until no transaction
//! holds a generation (each takes [`super::GENERATION_LOCK`] shared, in
//! [`super::envs::next_generation`], until it ends), reads the sequence, and notifies that
//! value on [`BARRIER_CHANNEL`]. Notifications arrive in commit order, so when a publisher
//! receives its barrier it has already received, and applied, every route change up to that
//! value.

use chrono::{DateTime, Utc};

use super::{Db, DbResult, GENERATION_LOCK};

/// The channel barriers are notified on (beside the routes channel, on the same listener).
pub const BARRIER_CHANNEL: &str = "gpugate_gateway_barriers";

/// A gateway is stale after this many heartbeat intervals without a beat.
pub const STALE_AFTER_BEATS: i32 = 3;

/// The newest generation handed out (0 before the first): the sequence's last value, which
/// counts generations of transactions still open or rolled back too.
const CURRENT: &str = "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM route_generation_seq)";

/// A row beat within [`STALE_AFTER_BEATS`] of its own interval (by the database's clock).
const FRESH: &str = "heartbeat_at >= now() - $STALE * heartbeat_ms * interval '1 millisecond'";

fn fresh() -> String {
    FRESH.replace("$STALE", &STALE_AFTER_BEATS.to_string())
}

/// One publisher's report.
#[derive(Debug, Clone)]
pub struct Beat<'a> {
    /// The gateway's name (`gateway_name`).
    pub name: &'a str,
    /// The watermark learned from this run's last barrier; `None`: none yet, keep the row's
    /// (still true: this run registers only after a whole sync, which holds everything the
    /// previous run had confirmed).
    pub applied_generation: Option<i64>,
    /// The gateway's heartbeat interval (ms).
    pub heartbeat_ms: u64,
    /// Seconds since the last whole-table sync finished.
    pub sync_age_s: f64,
    /// Seconds since this writer took the table.
    pub started_age_s: f64,
    /// The table's path on the gateway host.
    pub table_path: &'a str,
    /// The writer's process id.
    pub pid: u32,
    /// The writer's version.
    pub version: &'a str,
}

/// Inserts or renews a gateway's row (times by the database's clock); returns the newest
/// generation handed out, so the publisher sees when it lags.
pub async fn beat(db: &Db, b: &Beat<'_>) -> DbResult<i64> {
    sqlx::query_scalar(&format!(
        "INSERT INTO gateways (name, applied_generation, heartbeat_ms, heartbeat_at, last_sync_at, \
                               started_at, table_path, pid, version) \
         VALUES ($1, COALESCE($2, 0), $3, now(), now() - make_interval(secs => $4), \
                 now() - make_interval(secs => $5), $6, $7, $8) \
         ON CONFLICT (name) DO UPDATE SET \
             applied_generation = COALESCE($2, gateways.applied_generation), \
             heartbeat_ms = EXCLUDED.heartbeat_ms, heartbeat_at = EXCLUDED.heartbeat_at, \
             last_sync_at = EXCLUDED.last_sync_at, started_at = EXCLUDED.started_at, \
             table_path = EXCLUDED.table_path, pid = EXCLUDED.pid, version = EXCLUDED.version \
         RETURNING {CURRENT}"
    ))
    .bind(b.name)
    .bind(b.applied_generation)
    .bind(i32::try_from(b.heartbeat_ms).unwrap_or(i32::MAX))
    .bind(b.sync_age_s.max(0.0))
    .bind(b.started_age_s.max(0.0))
    .bind(b.table_path)
    .bind(i32::try_from(b.pid).unwrap_or(i32::MAX))
    .bind(b.version)
    .fetch_one(db.pool())
    .await
}

/// Waits (at most half a second, below PostgreSQL's default `deadlock_timeout`, so a wait
/// here can never make the server cancel a create) until no transaction holds a route
/// generation, then notifies `<token>:<watermark>` on [`BARRIER_CHANNEL`], where every
/// generation up to the watermark has committed or rolled back. Returns the watermark.
pub async fn barrier(db: &Db, token: &str) -> DbResult<i64> {
    let mut tx = db.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '500ms'").execute(&mut *tx).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
        .bind(GENERATION_LOCK.0)
        .bind(GENERATION_LOCK.1)
        .execute(&mut *tx)
        .await?;
    // Read under the lock: no generation can be taken until this transaction ends.
    let watermark: i64 = sqlx::query_scalar(&format!("SELECT {CURRENT}")).fetch_one(&mut *tx).await?;
    // Delivered at commit, after every notification of the transactions that held the
    // generations up to the watermark (they committed before the lock was granted).
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(BARRIER_CHANNEL)
        .bind(format!("{token}:{watermark}"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(watermark)
}

/// Reads a barrier notification: `(token, watermark)`.
pub fn parse_barrier(payload: &str) -> Option<(&str, i64)> {
    let (token, watermark) = payload.rsplit_once(':')?;
    Some((token, watermark.parse().ok().filter(|w| *w >= 0)?))
}

/// One gateway as the registry sees it now.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct GatewayRow {
    /// The gateway's name (`gateway_name`).
    pub name: String,
    /// Every route change of a generation up to this one that committed is in the gateway's
    /// table (0: none confirmed yet).
    pub applied_generation: i64,
    /// The newest route generation handed out: `route_generation_seq`'s last value (it counts
    /// generations of transactions still open or rolled back, so a healthy gateway may lag by
    /// one for the milliseconds a create commits).
    pub current_generation: i64,
    /// `current_generation - applied_generation` (never negative).
    pub lag_generations: i64,
    /// Seconds since the gateway's last heartbeat (by the database's clock).
    pub heartbeat_age_s: f64,
    /// No heartbeat for three of the gateway's heartbeat intervals: its publisher is down,
    /// standing by without a successor, or cannot reach the database.
    pub stale: bool,
    /// The gateway's heartbeat interval (ms).
    pub heartbeat_ms: i32,
    /// When its last heartbeat was written.
    pub heartbeat_at: DateTime<Utc>,
    /// When its last whole-table sync finished.
    pub last_sync_at: DateTime<Utc>,
    /// When its writer took the table (a restart or take-over moves it).
    pub started_at: DateTime<Utc>,
    /// The table's path on the gateway host.
    pub table_path: String,
    /// The writer's process id on the gateway host.
    pub pid: i32,
    /// The writer's version.
    pub version: String,
}

/// Every registered gateway, by name.
pub async fn list(db: &Db) -> DbResult<Vec<GatewayRow>> {
    sqlx::query_as(&format!(
        "SELECT name, applied_generation, c.current_generation, \
                GREATEST(c.current_generation - applied_generation, 0) AS lag_generations, \
                EXTRACT(EPOCH FROM now() - heartbeat_at)::float8 AS heartbeat_age_s, \
                NOT ({fresh}) AS stale, heartbeat_ms, heartbeat_at, last_sync_at, started_at, \
                table_path, pid, version \
         FROM gateways, (SELECT {CURRENT} AS current_generation) c ORDER BY name",
        fresh = fresh()
    ))
    .fetch_all(db.pool())
    .await
}

/// The newest route generation handed out (see [`GatewayRow::current_generation`]).
pub async fn current_generation(db: &Db) -> DbResult<i64> {
    sqlx::query_scalar(&format!("SELECT {CURRENT}")).fetch_one(db.pool()).await
}

/// How many fresh (not stale) gateways hold every committed route change up to
/// `generation`: a create that committed its routes with `generation` is routed by this many
/// gateways.
pub async fn count_applied(db: &Db, generation: i64) -> DbResult<i64> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM gateways WHERE applied_generation >= $1 AND {fresh}",
        fresh = fresh()
    ))
    .bind(generation)
    .fetch_one(db.pool())
    .await
}

/// How many fresh (not stale) gateways are registered.
pub async fn count_fresh(db: &Db) -> DbResult<i64> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM gateways WHERE {fresh}", fresh = fresh()))
        .fetch_one(db.pool())
        .await
}

/// What [`remove`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Removal {
    Done,
    NotFound,
    /// The gateway beat this many seconds ago, within its stale bound: its publisher lives.
    Fresh(f64),
}

/// Removes gateway `name` from the registry with its activity reports, unless it is fresh (a
/// live publisher would write its row again at the next beat). For a gateway gone for good:
/// while its stale row stays, the idle task waits for it. Its close-request cursor stays, so
/// a gateway that comes back under the name still applies every close it missed.
pub async fn remove(db: &Db, name: &str) -> DbResult<Removal> {
    let mut tx = db.begin().await?;
    let row: Option<(bool, f64)> = sqlx::query_as(&format!(
        "SELECT {fresh}, EXTRACT(EPOCH FROM now() - heartbeat_at)::float8 FROM gateways WHERE name = $1 FOR UPDATE",
        fresh = fresh()
    ))
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        None => return Ok(Removal::NotFound),
        Some((true, age)) => return Ok(Removal::Fresh(age)),
        Some((false, _)) => {}
    }
    sqlx::query("DELETE FROM gateway_activity WHERE gateway = $1").bind(name).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM gateways WHERE name = $1").bind(name).execute(&mut *tx).await?;
    super::event(&mut *tx, None, "gateway_removed", serde_json::json!({ "gateway": name })).await?;
    tx.commit().await?;
    Ok(Removal::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barriers_parse_and_refuse_nonsense() {
        assert_eq!(parse_barrier("4f2a:17"), Some(("4f2a", 17)));
        assert_eq!(parse_barrier("a:b:0"), Some(("a:b", 0)));
        assert_eq!(parse_barrier("4f2a"), None);
        assert_eq!(parse_barrier("4f2a:-1"), None);
        assert_eq!(parse_barrier("4f2a:x"), None);
    }

    #[test]
    fn staleness_is_three_of_the_rows_own_intervals() {
        assert_eq!(fresh(), "heartbeat_at >= now() - 3 * heartbeat_ms * interval '1 millisecond'");
    }
}
