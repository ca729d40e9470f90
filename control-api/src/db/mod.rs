//! The database layer: connection pool, migrations, and every SQL statement of the API.
//!
//! Only this module runs SQL. Its submodules own one table family each.

pub mod account_keys;
pub mod activity;
pub mod close_requests;
pub mod env_status;
pub mod envs;
pub mod gateways;
pub mod gpus;
pub mod hosts;
pub mod idle;
pub mod idempotency;
pub mod ports;
pub mod quotas;
pub mod readiness;
pub mod retention;
pub mod routes;
pub mod ssh_identity;
pub mod users;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

use crate::config::Config;

/// Result alias of the database layer.
pub type DbResult<T> = Result<T, sqlx::Error>;

/// A transaction on the pool.
pub type Tx<'a> = Transaction<'a, Postgres>;

/// The database handle shared by the API, the publisher and the reconciler.
#[derive(Clone)]
pub struct Db {
    pool: PgPool,
    options: PgConnectOptions,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("size", &self.pool.size()).finish()
    }
}

impl Db {
    /// Connects (the URL comes from configuration) without running migrations.
    pub async fn connect(cfg: &Config) -> DbResult<Db> {
        let options: PgConnectOptions = cfg.database_url.expose().parse()?;
        let options = options.application_name("gpugate-api");
        let pool = PgPoolOptions::new()
            .max_connections(cfg.database_max_connections.max(2))
            // Bounded, so a down database is a 503 in about this long rather than a client
            // (or probe) time-out.
            .acquire_timeout(Duration::from_millis(cfg.database_acquire_timeout_ms))
            .connect_with(options.clone())
            .await?;
        Ok(Db { pool, options })
    }

    /// Applies the embedded migrations (idempotent; several instances may race safely, sqlx
    /// takes an advisory lock). Migrations applied by a newer binary are left alone (every
    /// migration is additive, so this binary's statements still work): a rolling upgrade
    /// does not stop the processes not yet upgraded. Their versions are logged.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&self.pool).await?;
        self.log_newer_schema().await;
        Ok(())
    }

    /// Checks, without changing anything, that the schema has every migration this binary
    /// knows (for a process that must not migrate: a gateway's publisher, whose role may not
    /// own the schema); newer ones are logged and tolerated.
    pub async fn check_schema(&self) -> Result<(), String> {
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| format!("reading the schema version: {e}"))?;
        let missing: Vec<i64> =
            sqlx::migrate!("./migrations").iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect();
        if !missing.is_empty() {
            return Err(format!(
                "the database lacks migrations {missing:?} this binary needs: run `gpugate-api migrate` (or start an API) with the schema owner's role first"
            ));
        }
        self.log_newer_schema().await;
        Ok(())
    }

    async fn log_newer_schema(&self) {
        let known: Vec<i64> = sqlx::migrate!("./migrations").iter().map(|m| m.version).collect();
        let newer: Vec<i64> = match sqlx::query_scalar::<_, i64>("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&self.pool)
            .await
        {
            Ok(v) => v.into_iter().filter(|v| !known.contains(v)).collect(),
            Err(_) => return,
        };
        if !newer.is_empty() {
            tracing::warn!(?newer, "the database has migrations newer than this binary (a rolling upgrade?); working with the schema as it is");
        }
    }

    /// The pool, for the listener and for submodules.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection outside the pool (for LISTEN and the instance lock).
    pub async fn dedicated(&self) -> DbResult<PgConnection> {
        PgConnection::connect_with(&self.options).await
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> DbResult<Tx<'static>> {
        self.pool.begin().await
    }

    /// Whether a dedicated connection still answers (the liveness connection).
    pub async fn ping_conn(conn: &mut PgConnection) -> DbResult<()> {
        sqlx::query("SELECT 1").execute(conn).await.map(|_| ())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> DbResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ())
    }

    /// Records an audit event (outside any transaction).
    pub async fn event(&self, env_id: Option<&str>, kind: &str, detail: serde_json::Value) -> DbResult<()> {
        event(&self.pool, env_id, kind, detail).await
    }
}

/// Records an audit event on `exec` (a transaction or the pool).
pub async fn event<'e, E: sqlx::PgExecutor<'e>>(
    exec: E,
    env_id: Option<&str>,
    kind: &str,
    detail: serde_json::Value,
) -> DbResult<()> {
    sqlx::query("INSERT INTO events (env_id, kind, detail) VALUES ($1, $2, $3)")
        .bind(env_id)
        .bind(kind)
        .bind(detail)
        .execute(exec)
        .await
        .map(|_| ())
}

/// Advisory-lock namespace of instance liveness locks (keeps clear of other applications).
const INSTANCE_LOCK_SPACE: i32 = 0x6770_7567;

/// The advisory lock (namespace, key) every transaction that takes a route generation holds
/// shared until it ends, so that a gateway barrier (exclusive) knows when every generation
/// handed out so far has committed or rolled back (see [`gateways`]).
pub(crate) const GENERATION_LOCK: (i32, i32) = (0x6767_656e, 1);

/// Takes this instance's liveness lock on `conn` (held until the connection closes).
pub async fn hold_instance_lock(conn: &mut PgConnection, instance: i32) -> DbResult<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
        .bind(INSTANCE_LOCK_SPACE)
        .bind(instance)
        .fetch_one(conn)
        .await
}

/// The host prober's advisory lock (one bigint key; the liveness locks use the two-key form,
/// so the two never collide).
const PROBER_LOCK: i64 = 0x6770_7567_686f_7374;

/// Takes the host prober's lock on `conn` (held until the connection closes): one API process
/// probes the fleet at a time, so two processes that see a host differently do not flap it.
pub async fn try_prober_lock(conn: &mut PgConnection) -> DbResult<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(PROBER_LOCK).fetch_one(conn).await
}

/// Whether the instance `instance` is alive (its liveness lock is held by some session).
pub async fn instance_alive(db: &Db, instance: i64) -> DbResult<bool> {
    let objid = i32::try_from(instance).unwrap_or(-1);
    let held: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 2)",
    )
    .bind(i64::from(INSTANCE_LOCK_SPACE))
    .bind(i64::from(objid as u32))
    .fetch_one(db.pool())
    .await?;
    Ok(held)
}
