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

const NAME_COLUMNS: &str = "env_id, service, upstream, generation, active";

/// A key of the route table: a pool port (`routes`) or a name, environment and service
/// (`name_routes`). What the table must hold and which revokes it must apply are read through
/// one path for both, which differs only by these.
pub trait RouteKey: Copy + Ord + Send + Sync + 'static {
    /// The table holding routes of this key.
    const TABLE: &'static str;
    /// SQL naming a row's key as text (as [`RouteKey::to_text`] writes it).
    const KEY_SQL: &'static str;
    /// SQL true for a row whose key is in the text array `$1` (using the table's key index).
    const IN_KEYS_SQL: &'static str;
    /// SQL giving a row's expiry.
    const EXPIRES_SQL: &'static str;

    fn to_text(&self) -> String;
    fn from_text(s: &str) -> Option<Self>;
}

impl RouteKey for u16 {
    const TABLE: &'static str = "routes";
    const KEY_SQL: &'static str = "port::text";
    const IN_KEYS_SQL: &'static str = "port = ANY($1::text[]::integer[])";
    const EXPIRES_SQL: &'static str = "expires_at";

    fn to_text(&self) -> String {
        self.to_string()
    }

    fn from_text(s: &str) -> Option<u16> {
        s.parse().ok().filter(|p| *p != 0)
    }
}

impl RouteKey for HostKey {
    const TABLE: &'static str = "name_routes";
    const KEY_SQL: &'static str = "env_id || ':' || service";
    const IN_KEYS_SQL: &'static str =
        "(env_id, service) IN (SELECT split_part(k, ':', 1), split_part(k, ':', 2) FROM unnest($1::text[]) AS k)";
    // Names do not expire: a name route lives as long as its environment runs.
    const EXPIRES_SQL: &'static str = "NULL::timestamptz";

    fn to_text(&self) -> String {
        format!("{}:{}", self.env_id, self.service.as_str())
    }

    fn from_text(s: &str) -> Option<HostKey> {
        let (env, svc) = s.split_once(':')?;
        Some(HostKey::new(env.parse().ok()?, svc.parse().ok()?))
    }
}

/// A route row of either table, by its key's text.
#[derive(sqlx::FromRow)]
struct KeyedRow {
    key: String,
    env_id: String,
    service: String,
    upstream: String,
    generation: i64,
    expires_at: Option<DateTime<Utc>>,
}

impl KeyedRow {
    /// The table route this row asks for, if the row is well formed and names its own key.
    fn to_route<K: RouteKey>(&self) -> Option<(K, Route)> {
        let route = Route {
            upstream: self.upstream.parse().ok()?,
            env_id: self.env_id.parse::<EnvId>().ok()?,
            service: self.service.parse::<Service>().ok()?,
            generation: u64::try_from(self.generation).ok()?,
            expires_ms: self.expires_at.map(|t| u64::try_from(t.timestamp_millis()).unwrap_or(0)),
        };
        Some((K::from_text(&self.key)?, route))
    }
}

/// The text keys to bind as `$1`, and the condition they stand for: the rows of those keys
/// (through the table's key index), or every row when `keys` is `None` (`$1` is then NULL).
fn key_filter<K: RouteKey>(keys: Option<&[K]>) -> (Option<Vec<String>>, &'static str) {
    match keys {
        Some(ks) => (Some(ks.iter().map(RouteKey::to_text).collect()), K::IN_KEYS_SQL),
        None => (None, "$1::text[] IS NULL"),
    }
}

/// What the table must hold for keys of one kind (all of them, or those of `keys`): every
/// active, well-formed route. Keys absent from the map must have no route.
pub async fn desired<K: RouteKey>(db: &Db, keys: Option<&[K]>) -> DbResult<BTreeMap<K, Route>> {
    let (texts, filter) = key_filter(keys);
    let rows: Vec<KeyedRow> = sqlx::query_as(&format!(
        "SELECT {key} AS key, env_id, service, upstream, generation, {expires} AS expires_at FROM {table} \
         WHERE active AND {filter}",
        key = K::KEY_SQL,
        expires = K::EXPIRES_SQL,
        table = K::TABLE,
    ))
    .bind(texts)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.iter().filter_map(KeyedRow::to_route).collect())
}

/// The revoke epochs the table must have reached, for active routes that ever had sessions
/// closed on request (all of them, or those of `keys`).
pub async fn revoke_epochs<K: RouteKey>(db: &Db, keys: Option<&[K]>) -> DbResult<BTreeMap<K, u64>> {
    let (texts, filter) = key_filter(keys);
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT {key} AS key, revoke_epoch FROM {table} WHERE active AND revoke_epoch > 0 AND {filter}",
        key = K::KEY_SQL,
        table = K::TABLE,
    ))
    .bind(texts)
    .fetch_all(db.pool())
    .await?;
    Ok(rows.into_iter().filter_map(|(k, e)| Some((K::from_text(&k)?, u64::try_from(e).ok()?))).collect())
}

/// What the table must hold: routes by port and routes by name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Desired {
    pub ports: BTreeMap<u16, Route>,
    pub names: BTreeMap<HostKey, Route>,
}

/// The whole table the publisher must hold: every active route, by port and by name.
pub async fn desired_table(db: &Db) -> DbResult<Desired> {
    Ok(Desired { ports: desired(db, None).await?, names: desired(db, None).await? })
}

/// Reads a notification payload: a port number, or `n:<env-id>:<service>` for a name route.
pub fn parse_notice(payload: &str) -> Option<Result<u16, HostKey>> {
    if let Some(rest) = payload.strip_prefix("n:") {
        return HostKey::from_text(rest).map(Err);
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
