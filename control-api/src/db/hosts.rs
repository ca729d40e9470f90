//! The `hosts` table: the GPU hosts of the fleet, their operator state and health, and the
//! placement query that chooses one for a create.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgExecutor;

use super::env_status::OCCUPYING_SQL;
use super::{Db, DbResult, Tx};
use crate::config::Placement;

/// Operator states (the `state` column).
pub mod state {
    /// Placements land here.
    pub const ACTIVE: &str = "active";
    /// No new placement; what runs there keeps running, stopping and starting.
    pub const DRAINING: &str = "draining";
    /// No placement and no probe.
    pub const DISABLED: &str = "disabled";
}

/// Health as the probes saw it (the `health` column).
pub mod health {
    /// Not probed yet.
    pub const UNKNOWN: &str = "unknown";
    /// The engine answered the last probe.
    pub const UP: &str = "up";
    /// The engine has not answered since `down_since`.
    pub const DOWN: &str = "down";
}

/// One host as an admin sees it, with its GPUs and environments counted.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct HostRow {
    pub name: String,
    /// The Docker endpoint (`unix://`, `tcp://` with TLS, `http://`; empty: local defaults).
    pub docker_endpoint: String,
    /// Directory of `ca.pem`, `cert.pem`, `key.pem` for a `tcp://` endpoint.
    pub tls_dir: Option<String>,
    /// Where its containers publish ports; gateways dial routes there.
    pub upstream_address: String,
    /// Model label of GPUs listed by index.
    pub gpu_model: String,
    /// Most environments at once; `None`: no limit.
    pub max_environments: Option<i32>,
    /// `active`, `draining` or `disabled`.
    pub state: String,
    /// `unknown`, `up` or `down`.
    pub health: String,
    /// Why the last probe failed.
    pub health_reason: Option<String>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub down_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// GPUs in its inventory now.
    pub gpus_total: i64,
    /// Of those, free.
    pub gpus_free: i64,
    /// Environments there (any status but deleted).
    pub environments: i64,
}

const SELECT: &str = "SELECT h.name, h.docker_endpoint, h.tls_dir, host(h.upstream_address) AS upstream_address, \
    h.gpu_model, h.max_environments, h.state, h.health, h.health_reason, h.last_seen_at, h.down_since, h.created_at, \
    (SELECT count(*) FROM gpu_devices g WHERE g.host = h.name AND g.in_inventory) AS gpus_total, \
    (SELECT count(*) FROM gpu_devices g WHERE g.host = h.name AND g.status = 'available') AS gpus_free, \
    (SELECT count(*) FROM environments e WHERE e.host = h.name AND e.status <> 'deleted') AS environments \
    FROM hosts h";

/// A host to add.
#[derive(Debug, Clone)]
pub struct NewHost {
    pub name: String,
    pub docker_endpoint: String,
    pub tls_dir: Option<String>,
    pub upstream_address: IpAddr,
    pub gpu_model: String,
    pub max_environments: Option<u32>,
    /// GPU indexes of its inventory (keys `index:<n>`, model `gpu_model`).
    pub gpus: Vec<u32>,
}

/// Every host, by name.
pub async fn list(db: &Db) -> DbResult<Vec<HostRow>> {
    sqlx::query_as(&format!("{SELECT} ORDER BY h.name")).fetch_all(db.pool()).await
}

/// One host.
pub async fn get<'e, E: PgExecutor<'e>>(exec: E, name: &str) -> DbResult<Option<HostRow>> {
    sqlx::query_as(&format!("{SELECT} WHERE h.name = $1")).bind(name).fetch_optional(exec).await
}

/// Adds a host and its GPUs in one transaction; `Ok(None)` when the name is taken.
pub async fn add(db: &Db, h: &NewHost) -> DbResult<Option<HostRow>> {
    let mut tx = db.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO hosts (name, docker_endpoint, tls_dir, upstream_address, gpu_model, max_environments) \
         VALUES ($1, $2, $3, $4::inet, $5, $6) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&h.name)
    .bind(&h.docker_endpoint)
    .bind(&h.tls_dir)
    .bind(h.upstream_address.to_string())
    .bind(&h.gpu_model)
    .bind(h.max_environments.map(|m| i32::try_from(m).unwrap_or(i32::MAX)))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(None);
    }
    let idx: Vec<i32> = h.gpus.iter().map(|i| i32::try_from(*i).unwrap_or(i32::MAX)).collect();
    sqlx::query(
        "INSERT INTO gpu_devices (host, id, idx, name) \
         SELECT $1, 'index:' || i, i, $3 FROM unnest($2::int[]) AS i",
    )
    .bind(&h.name)
    .bind(&idx)
    .bind(&h.gpu_model)
    .execute(&mut *tx)
    .await?;
    super::event(&mut *tx, None, "host_added", serde_json::json!({ "host": h.name, "gpus": h.gpus, "endpoint": h.docker_endpoint }))
        .await?;
    let row = get(&mut *tx, &h.name).await?;
    tx.commit().await?;
    Ok(row)
}

/// Writes this API's own host from its configuration (endpoint and upstream address); its
/// state, health and GPUs are kept (GPUs come from discovery or `[gpu]`). When `name` is not
/// a host yet but the row the upgrade made (`local`, same endpoint) is, that row is renamed,
/// with its GPUs and environments: one engine never appears under two names.
///
/// The row records `engine` (this process's engine ID) the first time; a row that records
/// another engine is left as it is and that engine's ID is returned (`Some`): two engines
/// under one name would fail each other's workspaces, so the caller refuses to act for it.
pub async fn adopt_local(db: &Db, name: &str, endpoint: &str, upstream: IpAddr, engine: Option<&str>) -> DbResult<Option<String>> {
    let mut tx = db.begin().await?;
    sqlx::query("LOCK TABLE hosts IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await?;
    let recorded: Option<String> = sqlx::query_scalar("SELECT engine_id FROM hosts WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
    if let (Some(had), Some(now)) = (&recorded, engine) {
        if had != now {
            return Ok(Some(had.clone()));
        }
    }
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM hosts WHERE name = $1)")
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
    if !exists && name != LEGACY_LOCAL {
        let renamed = sqlx::query("UPDATE hosts SET name = $1 WHERE name = $2 AND (docker_endpoint = $3 OR docker_endpoint = '')")
            .bind(name)
            .bind(LEGACY_LOCAL)
            .bind(endpoint)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if renamed == 1 {
            sqlx::query("UPDATE environments SET host = $1 WHERE host = $2")
                .bind(name)
                .bind(LEGACY_LOCAL)
                .execute(&mut *tx)
                .await?;
            super::event(&mut *tx, None, "host_renamed", serde_json::json!({ "from": LEGACY_LOCAL, "to": name })).await?;
        }
    }
    sqlx::query(
        "INSERT INTO hosts (name, docker_endpoint, upstream_address, engine_id) VALUES ($1, $2, $3::inet, $4) \
         ON CONFLICT (name) DO UPDATE SET docker_endpoint = EXCLUDED.docker_endpoint, \
             upstream_address = EXCLUDED.upstream_address, tls_dir = NULL, \
             engine_id = COALESCE(hosts.engine_id, EXCLUDED.engine_id)",
    )
    .bind(name)
    .bind(endpoint)
    .bind(upstream.to_string())
    .bind(engine)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(None)
}

/// Records `engine` as the engine `name` stands for if none is recorded yet; returns the one
/// recorded before (`None`: none was, or the host is unknown).
pub async fn record_engine(db: &Db, name: &str, engine: &str) -> DbResult<Option<String>> {
    let mut tx = db.begin().await?;
    let had: Option<String> = sqlx::query_scalar("SELECT engine_id FROM hosts WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
    if had.is_none() {
        sqlx::query("UPDATE hosts SET engine_id = $2 WHERE name = $1").bind(name).bind(engine).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(had)
}

/// Forgets the engine recorded for `name` (a host rebuilt with a new engine: the next process
/// to reach it records the new one); false when there is no such host.
pub async fn forget_engine(db: &Db, name: &str) -> DbResult<bool> {
    Ok(sqlx::query("UPDATE hosts SET engine_id = NULL WHERE name = $1").bind(name).execute(db.pool()).await?.rows_affected() == 1)
}

/// The host name the upgrade to fleets gave the single host of before.
pub const LEGACY_LOCAL: &str = "local";

/// Sets the operator state; `None` when there is no such host.
pub async fn set_state(db: &Db, name: &str, to: &str) -> DbResult<Option<HostRow>> {
    let mut tx = db.begin().await?;
    let from: Option<String> = sqlx::query_scalar("SELECT state FROM hosts WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(from) = from else { return Ok(None) };
    if from != to {
        sqlx::query("UPDATE hosts SET state = $2 WHERE name = $1").bind(name).bind(to).execute(&mut *tx).await?;
        super::event(&mut *tx, None, "host_state", serde_json::json!({ "host": name, "from": from, "to": to })).await?;
    }
    let row = get(&mut *tx, name).await?;
    tx.commit().await?;
    Ok(row)
}

/// What a remove found.
#[derive(Debug, PartialEq, Eq)]
pub enum Removed {
    /// Gone, with its GPUs.
    Done,
    /// No such host.
    NotFound,
    /// Environments still live there (any status but deleted): how many.
    InUse(i64),
}

/// Removes a host and its GPU rows, refused while an environment lives there. The host's row
/// is locked first, so a create placing there concurrently either commits before (and the
/// remove is refused) or waits and finds no host.
pub async fn remove(db: &Db, name: &str) -> DbResult<Removed> {
    let mut tx = db.begin().await?;
    let found: Option<String> = sqlx::query_scalar("SELECT name FROM hosts WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    if found.is_none() {
        return Ok(Removed::NotFound);
    }
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM environments WHERE host = $1 AND status <> 'deleted'")
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
    if live > 0 {
        return Ok(Removed::InUse(live));
    }
    sqlx::query("DELETE FROM hosts WHERE name = $1").bind(name).execute(&mut *tx).await?;
    super::event(&mut *tx, None, "host_removed", serde_json::json!({ "host": name })).await?;
    tx.commit().await?;
    Ok(Removed::Done)
}

/// A host that can take a create, as placement ranks it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Candidate {
    pub name: String,
    /// Free GPUs of the asked model.
    pub free: i64,
    /// Environments there now (those in a status of `OCCUPYING_SQL`).
    pub environments: i64,
    pub max_environments: Option<i32>,
}

/// SQL condition on host row `h`: a create may be placed there now (active, not down, below
/// its environment limit). The 1008 answer counts the GPUs of these hosts only.
pub fn placeable_sql() -> String {
    format!(
        "h.state = 'active' AND h.health <> 'down' AND (h.max_environments IS NULL OR \
         (SELECT count(*) FROM environments e WHERE e.host = h.name AND e.status IN {OCCUPYING_SQL}) < h.max_environments)"
    )
}

/// The hosts that can take the environment `env_id` (being created in `tx`, not counted) with
/// `gpus` GPUs (of `model`, when given), best first by `policy`: active, not down, enough
/// free GPUs, under their environment limit. Counts are read without locks; the GPU rows
/// taken next are what makes a placement safe.
pub async fn candidates(
    tx: &mut Tx<'_>,
    env_id: &str,
    gpus: u32,
    model: Option<&str>,
    policy: Placement,
) -> DbResult<Vec<Candidate>> {
    let order = match policy {
        Placement::Pack => "free ASC, environments DESC, name",
        Placement::Spread => "environments ASC, free DESC, name",
    };
    sqlx::query_as(&format!(
        "SELECT * FROM (SELECT h.name, h.max_environments, \
             (SELECT count(*) FROM gpu_devices g WHERE g.host = h.name AND g.status = 'available' \
                 AND ($2::text IS NULL OR strpos(lower(g.name), lower($2)) > 0)) AS free, \
             (SELECT count(*) FROM environments e WHERE e.host = h.name AND e.id <> $3 \
                 AND e.status IN {OCCUPYING_SQL}) AS environments \
           FROM hosts h WHERE h.state = 'active' AND h.health <> 'down') c \
         WHERE free >= $1 AND (max_environments IS NULL OR environments < max_environments) \
         ORDER BY {order}"
    ))
    .bind(i64::from(gpus))
    .bind(model)
    .bind(env_id)
    .fetch_all(&mut **tx)
    .await
}

/// Holds the candidate's row against removal and state changes until the create commits and
/// tells whether it still takes placements. A host without an environment limit gets a
/// key-share lock (creates do not block each other); one with a limit is locked for update
/// at once (creates placing there queue here, and [`has_room`] counts under that lock). The
/// lock is taken once, in its final strength: upgrading a key-share lock that another create
/// also holds is a deadlock.
pub async fn hold_for_placement(tx: &mut Tx<'_>, c: &Candidate) -> DbResult<bool> {
    let sql = if c.max_environments.is_some() {
        "SELECT state, max_environments FROM hosts WHERE name = $1 FOR UPDATE"
    } else {
        "SELECT state, max_environments FROM hosts WHERE name = $1 FOR KEY SHARE"
    };
    let row: Option<(String, Option<i32>)> = sqlx::query_as(sql).bind(&c.name).fetch_optional(&mut **tx).await?;
    // A limit set since the candidates were read is honoured at the next create.
    Ok(row.is_some_and(|(state, _)| state == state::ACTIVE))
}

/// For a host with an environment limit (locked by [`hold_for_placement`]): tells whether it
/// still has room, counting committed environments. Always true without a limit.
pub async fn has_room(tx: &mut Tx<'_>, env_id: &str, c: &Candidate) -> DbResult<bool> {
    let Some(_) = c.max_environments else { return Ok(true) };
    let max: Option<i32> = sqlx::query_scalar("SELECT max_environments FROM hosts WHERE name = $1")
        .bind(&c.name)
        .fetch_optional(&mut **tx)
        .await?
        .flatten();
    let Some(max) = max else { return Ok(true) };
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM environments WHERE host = $1 AND id <> $2 AND status IN {OCCUPYING_SQL}"
    ))
    .bind(&c.name)
    .bind(env_id)
    .fetch_one(&mut **tx)
    .await?;
    Ok(n < i64::from(max))
}

/// Records a probe that reached the host; returns whether it had been down.
pub async fn mark_up(db: &Db, name: &str) -> DbResult<bool> {
    let was: Option<String> = sqlx::query_scalar(
        "UPDATE hosts h SET health = 'up', health_reason = NULL, last_seen_at = now(), down_since = NULL \
         FROM (SELECT name, health FROM hosts WHERE name = $1 FOR UPDATE) old \
         WHERE h.name = old.name RETURNING old.health",
    )
    .bind(name)
    .fetch_optional(db.pool())
    .await?;
    let was_down = was.as_deref() == Some(health::DOWN);
    if was_down {
        db.event(None, "host_up", serde_json::json!({ "host": name })).await?;
    }
    Ok(was_down)
}

/// Records a probe that failed; returns how long the host has been down (seconds).
pub async fn mark_down(db: &Db, name: &str, reason: &str) -> DbResult<f64> {
    let (was, secs): (String, f64) = sqlx::query_as(
        "UPDATE hosts h SET health = 'down', health_reason = $2, down_since = COALESCE(old.down_since, now()) \
         FROM (SELECT name, health, down_since FROM hosts WHERE name = $1 FOR UPDATE) old \
         WHERE h.name = old.name \
         RETURNING old.health, extract(epoch FROM now() - h.down_since)::float8",
    )
    .bind(name)
    .bind(reason)
    .fetch_one(db.pool())
    .await?;
    if was != health::DOWN {
        db.event(None, "host_down", serde_json::json!({ "host": name, "reason": reason })).await?;
    }
    Ok(secs)
}

/// Names of the hosts that are probed (all but disabled ones).
pub async fn probed(db: &Db) -> DbResult<Vec<HostRow>> {
    sqlx::query_as(&format!("{SELECT} WHERE h.state <> 'disabled' ORDER BY h.name")).fetch_all(db.pool()).await
}
