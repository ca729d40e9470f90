//! The reconciler: at start and every interval, makes Docker and the route table converge to
//! the database (the source of truth), and counts every repair (metrics and events).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::db::envs::{self, status, EnvRow};
use crate::db::{self, gpus, ports, routes};
use crate::lifecycle;
use crate::state::State;

/// What one pass repaired.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Repairs {
    /// Creates left half-done by a dead instance, undone.
    pub creates_undone: u64,
    /// Deletes left half-done, finished.
    pub deletes_finished: u64,
    /// Stop/start operations of a dead instance, released.
    pub operations_released: u64,
    /// Labelled containers with no environment, removed.
    pub containers_removed: u64,
    /// Running environments whose container vanished or exited, and stopped ones whose
    /// container vanished, marked failed.
    pub environments_failed: u64,
    /// Containers of stopped environments that were running, stopped.
    pub containers_stopped: u64,
    /// Running environments whose routes were missing or wrong, rewritten.
    pub routes_rewritten: u64,
    /// Active routes of environments that are not running, disabled.
    pub routes_disabled: u64,
    /// Routes of failed or deleted environments, deleted.
    pub routes_deleted: u64,
    /// Ports held by no environment, released into quarantine.
    pub ports_released: u64,
    /// GPUs held by no environment, released.
    pub gpus_released: u64,
}

impl Repairs {
    fn total(&self) -> u64 {
        self.creates_undone
            + self.deletes_finished
            + self.operations_released
            + self.containers_removed
            + self.environments_failed
            + self.containers_stopped
            + self.routes_rewritten
            + self.routes_disabled
            + self.routes_deleted
            + self.ports_released
            + self.gpus_released
    }
}

/// Runs passes until `shutdown`: one at once, then every `interval`.
pub async fn run(st: std::sync::Arc<State>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        match pass(&st).await {
            Ok(r) if r.total() > 0 => tracing::info!(repairs = ?r, "reconcile pass repaired"),
            Ok(_) => tracing::debug!("reconcile pass: nothing to repair"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "reconcile pass failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Marks a running or stopped environment failed (only if no operation took it meanwhile) and deletes
/// its routes, in one transaction.
async fn mark_failed(st: &State, env: &EnvRow, reason: &str) -> anyhow::Result<bool> {
    let mut tx = st.db.begin().await?;
    let n = sqlx::query(
        "UPDATE environments SET status = 'failed', status_reason = $2, updated_at = now() \
         WHERE id = $1 AND status IN ('running', 'stopped') AND op_instance IS NULL",
    )
    .bind(&env.id)
    .bind(reason)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Ok(false);
    }
    routes::delete_env(&mut *tx, &env.id).await?;
    db::event(&mut *tx, Some(&env.id), "repair_failed_environment", serde_json::json!({ "reason": reason })).await?;
    tx.commit().await?;
    Ok(true)
}

/// One pass. Errors on one environment are logged and the pass goes on.
pub async fn pass(st: &State) -> anyhow::Result<Repairs> {
    let mut r = Repairs::default();

    // 1. Operations whose instance died (or that gave up): finish or undo them.
    for env in envs::list_live(&st.db).await? {
        let owned_by_dead = match env.op_instance {
            Some(op) if op == st.instance => continue,
            Some(op) => {
                if db::instance_alive(&st.db, op).await? {
                    continue;
                }
                if !envs::take_over(&st.db, &env.id, op, st.instance).await? {
                    continue;
                }
                true
            }
            None => false,
        };
        let outcome = match env.status.as_str() {
            status::CREATING => {
                if !owned_by_dead
                    && !envs::take_over_unowned(&st.db, &env.id, st.instance).await?
                {
                    continue;
                }
                let res = lifecycle::undo_create(st, &env.id, env.container_id.as_deref(), false, "create interrupted; undone by the reconciler").await;
                if res.is_ok() {
                    r.creates_undone += 1;
                }
                res
            }
            status::DELETING => {
                if !owned_by_dead
                    && !envs::take_over_unowned(&st.db, &env.id, st.instance).await?
                {
                    continue;
                }
                let res = lifecycle::finish_delete(st, &env).await;
                if res.is_ok() {
                    r.deletes_finished += 1;
                }
                res
            }
            _ if owned_by_dead => {
                envs::settle(st.db.pool(), &env.id, &env.status, env.status_reason.as_deref(), None).await?;
                r.operations_released += 1;
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = outcome {
            tracing::error!(env_id = %env.id, error = %format!("{e:#}"), "reconcile: repair failed");
            let _ = sqlx::query("UPDATE environments SET op_instance = NULL WHERE id = $1 AND op_instance = $2")
                .bind(&env.id)
                .bind(st.instance)
                .execute(st.db.pool())
                .await;
        }
    }

    // 2. Docker against the database.
    let live = envs::list_live(&st.db).await?;
    let known: HashSet<&str> = live.iter().map(|e| e.id.as_str()).collect();
    let containers = st.docker.list_managed().await?;
    let mut by_env: HashMap<&str, Vec<&crate::docker::Managed>> = HashMap::new();
    for c in &containers {
        if known.contains(c.env_id.as_str()) {
            by_env.entry(c.env_id.as_str()).or_default().push(c);
        } else {
            tracing::info!(container = %c.id, env_id = %c.env_id, "reconcile: removing container with no environment");
            st.docker.remove(&c.id).await?;
            st.db.event(Some(&c.env_id), "repair_container_removed", serde_json::json!({ "container": c.id })).await?;
            r.containers_removed += 1;
        }
    }
    for env in live.iter().filter(|e| e.op_instance.is_none()) {
        let mine = by_env.get(env.id.as_str()).cloned().unwrap_or_default();
        let recorded = mine.iter().find(|c| Some(&c.id) == env.container_id.as_ref()).copied();
        match env.status.as_str() {
            status::RUNNING => match recorded {
                Some(c) if c.running => {
                    if repair_routes(st, env, &c.id).await? {
                        r.routes_rewritten += 1;
                    }
                }
                Some(_) => {
                    if mark_failed(st, env, "container exited").await? {
                        r.environments_failed += 1;
                    }
                }
                None => {
                    if mark_failed(st, env, "container vanished").await? {
                        r.environments_failed += 1;
                    }
                }
            },
            status::STOPPED => match recorded {
                None => {
                    if mark_failed(st, env, "container vanished").await? {
                        r.environments_failed += 1;
                    }
                }
                Some(c) if c.running => {
                    routes::deactivate(st.db.pool(), &env.id).await?;
                    st.docker.stop(&c.id).await?;
                    st.db.event(Some(&env.id), "repair_container_stopped", serde_json::json!({ "container": c.id })).await?;
                    r.containers_stopped += 1;
                }
                Some(_) => {}
            },
            _ => {}
        }
    }

    // 3. The routes, ports and GPUs against the environments.
    let (disabled, deleted) = routes::prune(&st.db).await?;
    r.routes_disabled += disabled;
    r.routes_deleted += deleted;
    for (port, env_id) in ports::release_orphans(&st.db, st.cfg.quarantine_s).await? {
        st.db.event(Some(&env_id), "repair_port_released", serde_json::json!({ "port": port })).await?;
        r.ports_released += 1;
    }
    r.gpus_released += gpus::release_orphans(&st.db).await?;
    ports::end_quarantine(&st.db).await?;

    // 4. The table against the routes (the publisher counts what it rewrites).
    st.resync.request();

    for (kind, n) in [
        ("create_undone", r.creates_undone),
        ("delete_finished", r.deletes_finished),
        ("operation_released", r.operations_released),
        ("container_removed", r.containers_removed),
        ("environment_failed", r.environments_failed),
        ("container_stopped", r.containers_stopped),
        ("routes_rewritten", r.routes_rewritten),
        ("route_disabled", r.routes_disabled),
        ("route_deleted", r.routes_deleted),
        ("port_released", r.ports_released),
        ("gpu_released", r.gpus_released),
    ] {
        st.metrics.repaired(kind, n);
    }
    if r.total() > 0 {
        st.db.event(None, "reconciled", serde_json::to_value(&r).unwrap_or_default()).await?;
    }
    Ok(r)
}

/// Makes a running environment's routes match its container's published ports; returns
/// whether anything was rewritten.
async fn repair_routes(st: &State, env: &EnvRow, container: &str) -> anyhow::Result<bool> {
    let held = ports::env_ports(st.db.pool(), &env.id).await?;
    let upstreams = st.docker.upstreams(container, &held).await?;
    let rows = routes::of_env(st.db.pool(), &env.id).await?;
    let right = upstreams.iter().all(|(port, service, upstream)| {
        rows.iter().any(|row| {
            row.port == i32::from(*port)
                && row.active
                && row.service == service.as_str()
                && row.upstream == upstream.to_string()
        })
    });
    if right && rows.len() == upstreams.len() {
        return Ok(false);
    }
    let mut tx = st.db.begin().await?;
    let still: Option<(String, Option<i64>)> =
        sqlx::query_as("SELECT status, op_instance FROM environments WHERE id = $1 FOR UPDATE")
            .bind(&env.id)
            .fetch_optional(&mut *tx)
            .await?;
    if still != Some((status::RUNNING.to_string(), None)) {
        return Ok(false);
    }
    routes::delete_env(&mut *tx, &env.id).await?;
    let generation = envs::next_generation(&mut tx, &env.id).await?;
    routes::put(&mut tx, &env.id, generation, &upstreams).await?;
    db::event(&mut *tx, Some(&env.id), "repair_routes_rewritten", serde_json::json!({ "generation": generation })).await?;
    tx.commit().await?;
    Ok(true)
}
