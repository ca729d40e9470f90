//! The reconciler: at start and every interval, makes Docker and the route table converge to
//! the database (the source of truth), and counts every repair (metrics and events).

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::db::envs::{self, EnvRow, Status};
use crate::db::{self, gpus, hosts, idempotency, ports, readiness, retention, routes};
use crate::docker::DockerClient;
use crate::lifecycle;
use crate::state::State;

/// What one pass repaired.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Repairs {
    /// Creates left half-done by a dead instance, undone.
    pub creates_undone: u64,
    /// Deletes left half-done, finished.
    pub deletes_finished: u64,
    /// Stop/start operations of a dead instance, released.
    pub operations_released: u64,
    /// Labelled containers with no environment, removed.
    pub containers_removed: u64,
    /// Labelled home volumes whose environment is deleted or unknown, removed.
    pub volumes_removed: u64,
    /// Running environments whose container vanished or exited, marked failed.
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
    /// GPUs held by no environment, or by a stopped one whose container is stopped, released.
    pub gpus_released: u64,
    /// GPUs discovery found that were not in the inventory, added.
    pub gpus_added: u64,
    /// GPUs discovery no longer reports, taken out of the inventory (never handed out again
    /// while gone; one an environment holds retires when released).
    pub gpus_retired: u64,
    /// Environments whose repair failed this pass (logged; the pass went on, and the next
    /// pass tries again).
    pub errors: u64,
}

impl Repairs {
    fn total(&self) -> u64 {
        self.creates_undone
            + self.deletes_finished
            + self.operations_released
            + self.containers_removed
            + self.volumes_removed
            + self.environments_failed
            + self.containers_stopped
            + self.routes_rewritten
            + self.routes_disabled
            + self.routes_deleted
            + self.ports_released
            + self.gpus_released
            + self.gpus_added
            + self.gpus_retired
    }

    /// Counts and logs a repair of environment `env_id` that failed; the pass goes on.
    fn failed(&mut self, env_id: &str, what: &str, e: &anyhow::Error) {
        self.errors += 1;
        tracing::error!(env_id = %env_id, error = %format!("{e:#}"), "reconcile: {what} failed; the next pass tries again");
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
        // Readiness probes of an instance that died (or of none yet) continue here.
        match st.readiness.resume().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(services = n, "readiness probes taken over"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "taking over readiness probes failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Marks a running or stopped environment failed (only if no operation took it meanwhile) and
/// deletes its routes, in one transaction.
async fn mark_failed(st: &State, env: &EnvRow, reason: &str) -> anyhow::Result<bool> {
    let mut tx = st.db.begin().await?;
    if !envs::mark_failed(&mut tx, &env.id, env.container_id.as_deref(), reason).await? {
        return Ok(false);
    }
    routes::delete_env(&mut *tx, &env.id).await?;
    readiness::clear(&mut *tx, &env.id).await?;
    db::event(&mut *tx, Some(&env.id), "repair_failed_environment", serde_json::json!({ "reason": reason })).await?;
    tx.commit().await?;
    Ok(true)
}

/// Takes the row of an operation that is not running anywhere: claimed by a dead process, or
/// by this one with no operation registered here (it ended without settling). Registers the
/// repair as an operation of this process while it runs; returns the new claim's epoch, if the
/// row was taken (the old operation, should it still run somewhere, is fenced off by it).
async fn take_orphan(st: &State, env: &EnvRow, op: i64) -> anyhow::Result<Option<i64>> {
    let mut active = st.ops.lock_active().await;
    if active.contains(&env.id) {
        return Ok(None);
    }
    if op != st.instance && db::instance_alive(&st.db, op).await? {
        return Ok(None);
    }
    let Some(epoch) = envs::take_over(&st.db, &env.id, op, st.instance).await? else {
        return Ok(None);
    };
    active.insert(env.id.clone());
    Ok(Some(epoch))
}

/// Takes the row of an environment that no operation holds, registering the repair; returns
/// the claim's epoch if it was taken.
async fn take_unowned(st: &State, env: &EnvRow) -> anyhow::Result<Option<i64>> {
    let mut active = st.ops.lock_active().await;
    if active.contains(&env.id) {
        return Ok(None);
    }
    let Some(epoch) = envs::take_over_unowned(&st.db, &env.id, st.instance).await? else {
        return Ok(None);
    };
    active.insert(env.id.clone());
    Ok(Some(epoch))
}

/// Ends a repair registered by [`take_orphan`] or [`take_unowned`], releasing the row if the
/// repair left it claimed.
async fn end_repair(st: &State, id: &str) {
    if let Err(e) = envs::release_claim(&st.db, id, st.instance).await {
        tracing::warn!(env_id = %id, error = %e, "reconcile: releasing a repaired row failed");
    }
    st.ops.lock_active().await.remove(id);
}

/// One pass. Errors on one environment are logged and the pass goes on. A process that does
/// not hold its liveness lock repairs nothing (another process may be taking over its rows).
pub async fn pass(st: &State) -> anyhow::Result<Repairs> {
    let mut r = Repairs::default();
    if !st.liveness.holding() {
        anyhow::bail!("this process does not hold its liveness lock; skipping the pass");
    }

    // 1. Operations that are not running in any live process: finish or undo them.
    for env in envs::list_live(&st.db).await? {
        let transitional = env.status.is_transient();
        let taken = match env.op_instance {
            Some(op) => take_orphan(st, &env, op).await,
            None if transitional => take_unowned(st, &env).await,
            None => Ok(None),
        };
        let epoch = match taken {
            Ok(Some(epoch)) => epoch,
            Ok(None) => continue,
            Err(e) => {
                r.failed(&env.id, "taking over an orphaned operation", &e);
                continue;
            }
        };
        let env = EnvRow { op_epoch: Some(epoch), ..env };
        if let Err(e) = finish_orphan(st, &env, epoch, &mut r).await {
            r.failed(&env.id, "repairing an interrupted operation", &e);
        }
        end_repair(st, &env.id).await;
    }

    // 2. Docker against the database, host by host; a host that does not answer is left
    // alone (the health probes deal with it: its environments are not failed for a listing
    // that timed out).
    for host in hosts::probed(&st.db).await? {
        if host.health == hosts::health::DOWN {
            continue;
        }
        let client = match st.fleet.client(&host.name).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(host = %host.name, error = %e, "reconcile: host not reachable; skipped this pass");
                continue;
            }
        };
        if let Err(e) = reconcile_host(st, &host.name, &client, &mut r).await {
            tracing::warn!(host = %host.name, error = %format!("{e:#}"), "reconcile: host pass failed");
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
    rediscover(st, &mut r).await;
    ports::end_quarantine(&st.db).await?;
    idempotency::purge(&st.db, st.cfg.idempotency_retention_s).await?;
    if st.cfg.retention_days > 0 {
        match retention::purge(&st.db, st.cfg.retention_days).await {
            Ok(p) if p != retention::Purged::default() => tracing::info!(
                events = p.events,
                environments = p.environments,
                close_requests = p.close_requests,
                "retention: old rows removed"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention: removing old rows failed; the next pass tries again"),
        }
    }

    // 4. The table against the routes (the publisher counts what it rewrites).
    st.resync.request();

    for (kind, n) in [
        ("create_undone", r.creates_undone),
        ("delete_finished", r.deletes_finished),
        ("operation_released", r.operations_released),
        ("container_removed", r.containers_removed),
        ("volume_removed", r.volumes_removed),
        ("environment_failed", r.environments_failed),
        ("container_stopped", r.containers_stopped),
        ("routes_rewritten", r.routes_rewritten),
        ("route_disabled", r.routes_disabled),
        ("route_deleted", r.routes_deleted),
        ("port_released", r.ports_released),
        ("gpu_released", r.gpus_released),
        ("gpu_added", r.gpus_added),
        ("gpu_retired", r.gpus_retired),
    ] {
        st.metrics.repaired(kind, n);
    }
    st.metrics.reconcile_errors.inc_by(r.errors);
    if r.total() > 0 {
        st.db.event(None, "reconciled", serde_json::to_value(&r).unwrap_or_default()).await?;
    }
    Ok(r)
}

/// Finishes or undoes the interrupted operation on `env`, now claimed by this process with
/// epoch `epoch`: a create is undone, a delete and a stop finished, a start undone (the
/// environment is stopped, its home kept).
async fn finish_orphan(st: &State, env: &EnvRow, epoch: i64, r: &mut Repairs) -> anyhow::Result<()> {
    match env.status {
        Status::Creating => {
            let reason = "create interrupted; undone by the reconciler";
            let dk = st.fleet.client(&env.host).await?;
            lifecycle::undo_create(st, &dk, &env.id, epoch, env.container_id.as_deref(), false, reason).await?;
            r.creates_undone += 1;
        }
        Status::Deleting => {
            lifecycle::finish_delete(st, env).await?;
            r.deletes_finished += 1;
        }
        Status::Stopping => {
            lifecycle::stop_env(st, env, "interrupted stop finished by the reconciler", env.status_reason.as_deref()).await?;
            r.operations_released += 1;
        }
        Status::Starting => {
            let dk = st.fleet.client(&env.host).await?;
            lifecycle::undo_start(st, &dk, &env.id, epoch, "start interrupted; undone by the reconciler").await?;
            r.operations_released += 1;
        }
        _ => r.operations_released += 1,
    }
    Ok(())
}

/// Makes one host's containers and home volumes converge to the database: removes those of
/// environments that do not live there (deleted, unknown, placed elsewhere) and stray
/// containers of settled environments (not the one recorded: a host lost and back), fails
/// running environments whose container vanished or exited, stops containers of stopped ones.
async fn reconcile_host(st: &State, host: &str, docker: &DockerClient, r: &mut Repairs) -> anyhow::Result<()> {
    // Docker is listed first: a create inserts its row before it makes its container, so
    // every container listed here whose row is missing from the later database listing
    // really has no environment (listing the database first would remove the container of a
    // create in flight).
    // Removed are only containers and volumes this host name made (unlabelled: made before
    // fleets, by this API's own host): an engine registered under two names by mistake keeps
    // the other name's. Matched to this host's environments is every container of the engine
    // whatever its label (a host renamed keeps its workspaces).
    let ours = |label: &Option<String>| label.as_deref().map_or(host == st.fleet.local_name(), |h| h == host);
    let containers = docker.list_managed().await?;
    st.pause_point("reconcile_listed").await;
    let volumes: Vec<_> = docker.list_volumes().await?.into_iter().filter(|v| ours(&v.host)).collect();
    let live: Vec<EnvRow> = envs::list_live(&st.db).await?.into_iter().filter(|e| e.host == host).collect();
    let known: HashMap<&str, &EnvRow> = live.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut by_env: HashMap<&str, Vec<&crate::docker::Managed>> = HashMap::new();
    for c in &containers {
        let stray = match known.get(c.env_id.as_str()) {
            None if !ours(&c.host) => continue,
            None => Some("no environment on this host"),
            // Settled (no operation in flight) and not its recorded container: left from
            // before the environment failed with its host, or from an interrupted start.
            Some(env)
                if env.op_instance.is_none()
                    && env.container_id.as_deref() != Some(c.id.as_str())
                    && env.status != Status::Creating
                    && env.status != Status::Deleting =>
            {
                if !ours(&c.host) {
                    continue;
                }
                Some("not the environment's container")
            }
            Some(_) => None,
        };
        match stray {
            None => by_env.entry(c.env_id.as_str()).or_default().push(c),
            Some(why) => {
                tracing::info!(host, container = %c.id, env_id = %c.env_id, why, "reconcile: removing container");
                let removed: anyhow::Result<()> = async {
                    docker.remove(&c.id).await?;
                    let detail = serde_json::json!({ "container": c.id, "host": host, "why": why });
                    st.db.event(Some(&c.env_id), "repair_container_removed", detail).await?;
                    Ok(())
                }
                .await;
                match removed {
                    Ok(()) => r.containers_removed += 1,
                    Err(e) => r.failed(&c.env_id, "removing a stray container", &e),
                }
            }
        }
    }
    // Home volumes after the containers (a volume in use cannot go): those of environments
    // deleted or never known here. One that cannot go now is tried again at the next pass.
    for v in volumes.iter().filter(|v| !known.contains_key(v.env_id.as_str())) {
        match docker.remove_volume_named(&v.name).await {
            Ok(()) => {
                tracing::info!(host, volume = %v.name, env_id = %v.env_id, "reconcile: removed a home volume with no environment");
                st.db.event(Some(&v.env_id), "repair_volume_removed", serde_json::json!({ "volume": v.name, "host": host })).await?;
                r.volumes_removed += 1;
            }
            Err(e) => tracing::warn!(volume = %v.name, error = %e, "reconcile: removing an orphaned home volume failed"),
        }
    }
    for env in live.iter().filter(|e| e.op_instance.is_none()) {
        let mine = by_env.get(env.id.as_str()).cloned().unwrap_or_default();
        if let Err(e) = reconcile_env(st, docker, env, &mine, r).await {
            r.failed(&env.id, "reconciling its container", &e);
        }
    }
    Ok(())
}

/// One settled environment of a host against its containers there (`mine`, listed before the
/// environment was read).
async fn reconcile_env(
    st: &State,
    docker: &DockerClient,
    env: &EnvRow,
    mine: &[&crate::docker::Managed],
    r: &mut Repairs,
) -> anyhow::Result<()> {
    if st.fail_point(&format!("reconcile_env:{}", env.name)) {
        anyhow::bail!("fault injection: reconcile_env:{}", env.name);
    }
    let recorded = mine.iter().find(|c| Some(&c.id) == env.container_id.as_ref()).copied();
    match env.status {
        Status::Running => match recorded {
            Some(c) if c.running => {
                if repair_routes(st, docker, env, &c.id).await? {
                    r.routes_rewritten += 1;
                }
            }
            _ => {
                // The listing is older than the row: the recorded container may have been
                // made (or started) since. Asked by id, now, before anything is failed.
                let why = match env.container_id.as_deref() {
                    Some(c) => match docker.inspect(c).await? {
                        Some(now) if now.running => return Ok(()),
                        Some(_) => "container exited",
                        None => "container vanished",
                    },
                    None => "container vanished",
                };
                if mark_failed(st, env, why).await? {
                    r.environments_failed += 1;
                }
            }
        },
        // A stopped or failed environment needs no container (a start makes a new one), but
        // one that runs is stopped; its GPUs go back once none of its containers runs.
        Status::Stopped | Status::Failed => {
            if let Some(c) = recorded.filter(|c| c.running) {
                // Claimed like an operation, so a start in flight cannot interleave.
                if take_unowned(st, env).await?.is_none() {
                    return Ok(());
                }
                let res: anyhow::Result<()> = async {
                    routes::deactivate(st.db.pool(), &env.id).await?;
                    docker.stop(&c.id).await?;
                    st.db.event(Some(&env.id), "repair_container_stopped", serde_json::json!({ "container": c.id })).await?;
                    Ok(())
                }
                .await;
                end_repair(st, &env.id).await;
                res?;
                r.containers_stopped += 1;
            } else if mine.iter().any(|c| c.running) {
                // Another of its containers runs (a stray, removed above unless the listing
                // raced): its GPUs stay until the next pass sees none.
                return Ok(());
            }
            if !env.gpus.is_empty() || env.status == Status::Failed {
                r.gpus_released += release_settled_gpus(st, env).await?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Removes the containers and volumes on `host` that no environment there owns (a host back
/// after being down: environments that failed meanwhile forgot their containers, whose GPUs
/// may already be promised elsewhere on that host). Returns how many containers went.
pub async fn host_strays(st: &State, host: &str, docker: &DockerClient) -> anyhow::Result<u64> {
    let mut r = Repairs::default();
    reconcile_host(st, host, docker, &mut r).await?;
    st.metrics.repaired("container_removed", r.containers_removed);
    st.metrics.repaired("volume_removed", r.volumes_removed);
    st.metrics.repaired("environment_failed", r.environments_failed);
    st.metrics.repaired("routes_rewritten", r.routes_rewritten);
    Ok(r.containers_removed)
}

/// Re-reads a discovered inventory (`nvidia-smi`) and syncs it: new GPUs join, GPUs gone
/// leave (each environment still holding one is logged and gets a `gpu_vanished` event). A
/// discovery that fails changes nothing: an unreadable `nvidia-smi` never empties the
/// inventory.
async fn rediscover(st: &State, r: &mut Repairs) {
    let source = &st.fleet.local().gpu().source;
    if !source.is_discovered() {
        return;
    }
    let devices = match source.read().await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "GPU discovery failed; the inventory is left as it was");
            return;
        }
    };
    match gpus::sync_inventory(&st.db, st.fleet.local_name(), &devices).await {
        Ok(change) => {
            for g in &change.added {
                tracing::info!(gpu = %g, "GPU joined the inventory");
            }
            for g in &change.retired {
                match &g.env_id {
                    Some(env) => tracing::warn!(gpu = %g.id, env_id = %env, "GPU disappeared while an environment holds it; it retires when released"),
                    None => tracing::warn!(gpu = %g.id, "GPU disappeared; retired"),
                }
            }
            r.gpus_added += change.added.len() as u64;
            r.gpus_retired += change.retired.len() as u64;
        }
        Err(e) => tracing::error!(error = %e, "syncing the discovered GPU inventory failed"),
    }
}

/// Gives back the GPUs a stopped or failed environment still holds (a stop that failed
/// half-way, a workspace whose host was lost and is back), if it is still in that state with
/// no operation; none of its containers has been seen running on its host. Returns how many.
async fn release_settled_gpus(st: &State, env: &EnvRow) -> anyhow::Result<u64> {
    let mut tx = st.db.begin().await?;
    if !envs::lock_if_idle_in(&mut tx, &env.id, env.status).await? {
        return Ok(0);
    }
    let n = gpus::release_env(&mut *tx, &env.id).await?;
    if n == 0 && env.gpus.is_empty() {
        return Ok(0);
    }
    envs::set_gpus(&mut tx, &env.id, &[]).await?;
    db::event(&mut *tx, Some(&env.id), "repair_gpus_released", serde_json::json!({ "gpus": env.gpus })).await?;
    tx.commit().await?;
    Ok(n)
}

/// Makes a running environment's routes match its container's published ports; returns
/// whether anything was rewritten.
async fn repair_routes(st: &State, docker: &DockerClient, env: &EnvRow, container: &str) -> anyhow::Result<bool> {
    let held = ports::env_endpoints(st.db.pool(), &env.id, &env.services).await?;
    let upstreams = docker.upstreams(container, &held).await?;
    let names = crate::lifecycle::name_services(env);
    let rows = routes::of_env(st.db.pool(), &env.id).await?;
    let name_rows = routes::names_of_env(st.db.pool(), &env.id).await?;
    let by_port: Vec<_> = upstreams.iter().filter(|(p, _, _)| *p != 0).collect();
    let by_name: Vec<_> = upstreams.iter().filter(|(_, s, _)| names.contains(s)).collect();
    let right = by_port.iter().all(|(port, service, upstream)| {
        rows.iter().any(|row| {
            row.port == i32::from(*port)
                && row.active
                && row.service == service.as_str()
                && row.upstream == upstream.to_string()
        })
    }) && by_name.iter().all(|(_, service, upstream)| {
        name_rows.iter().any(|row| row.active && row.service == service.as_str() && row.upstream == upstream.to_string())
    });
    if right && rows.len() == by_port.len() && name_rows.len() == by_name.len() {
        return Ok(false);
    }
    let mut tx = st.db.begin().await?;
    if !envs::lock_if_idle_running(&mut tx, &env.id).await? {
        return Ok(false);
    }
    routes::delete_env(&mut *tx, &env.id).await?;
    let generation = envs::next_generation(&mut tx, &env.id).await?;
    if let Some(port) = routes::put(&mut tx, &env.id, generation, &upstreams, &names).await? {
        anyhow::bail!("port {port} is routed to another environment; not rewriting environment {}'s routes", env.id);
    }
    db::event(&mut *tx, Some(&env.id), "repair_routes_rewritten", serde_json::json!({ "generation": generation })).await?;
    tx.commit().await?;
    Ok(true)
}
