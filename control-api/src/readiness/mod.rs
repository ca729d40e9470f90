//! Readiness: "running" means a user can log in. After every start (create or start) each
//! service is probed at its **published address** — not through the gateway, so probes never
//! count as user activity for idle detection or in the gateway's counters — until it answers
//! like the service it is ([`probe`]) or its deadline (`[readiness]`) passes. Then it is
//! never probed again: a ready service is not re-checked, and one that missed its deadline is
//! reported once (event `service_not_ready`, metric) and left to its user; the workspace
//! keeps running. Stopped, failed and deleted workspaces are never probed.
//!
//! The state lives in `service_readiness`, tagged with the start's route generation, so a
//! prober of an earlier start can never mark the current one. Probers run in the process that
//! started the workspace; the reconcile pass of any process takes over the pending services of
//! an instance that died (its liveness lock is gone).

pub mod probe;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use gpugate_routes::Service;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::ReadinessConfig;
use crate::db::readiness::ReadinessRow;
use crate::db::{self, envs::Status, Db};
use crate::metrics::Metrics;

/// The first pause between two probes of one service; it doubles up to `max_backoff_ms`.
const FIRST_PAUSE: Duration = Duration::from_millis(100);

/// What the API shows per service.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ServiceReadiness {
    /// Whether the service answered like itself since the last start.
    pub ready: bool,
    /// When it first did (null while not ready).
    pub ready_at: Option<DateTime<Utc>>,
    /// Why it is not ready (absent when it is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ready_reason: Option<String>,
}

/// What a probe looks for, in words (each takes the article "an").
fn answer(service: Service) -> &'static str {
    match service {
        Service::Ssh => "SSH banner",
        Service::Jupyter | Service::Code | Service::Other => "HTTP answer",
        Service::Rdp => "RDP connection confirm",
    }
}

/// Per-service readiness of an environment in `env_status` with `services`, from its rows;
/// and whether all of them are ready.
pub fn view(env_status: Status, services: &[String], rows: &[ReadinessRow]) -> (bool, BTreeMap<String, ServiceReadiness>) {
    let mut out = BTreeMap::new();
    for name in services {
        let not = |reason: String| ServiceReadiness { ready: false, ready_at: None, not_ready_reason: Some(reason) };
        let r = if env_status != Status::Running {
            not(format!("the environment is {env_status}"))
        } else {
            match rows.iter().find(|r| &r.service == name) {
                Some(ReadinessRow { ready_at: Some(at), .. }) => {
                    ServiceReadiness { ready: true, ready_at: Some(*at), not_ready_reason: None }
                }
                Some(ReadinessRow { failed_at: Some(_), last_error, .. }) => {
                    not(last_error.clone().unwrap_or_else(|| "gave up at its deadline".into()))
                }
                Some(row) => {
                    let what = name.parse::<Service>().map(answer).unwrap_or("answer");
                    let last = row.last_error.as_deref().unwrap_or("no probe answered yet");
                    not(format!("waiting for an {what} until {} (last probe: {last})", row.deadline_at.format("%H:%M:%SZ")))
                }
                None => not("not probed since the last start".into()),
            }
        };
        out.insert(name.clone(), r);
    }
    let ready = !out.is_empty() && out.values().all(|r| r.ready);
    (ready, out)
}

/// The probers of this process.
pub struct Prober {
    db: Db,
    metrics: Metrics,
    cfg: ReadinessConfig,
    instance: i64,
    /// (environment, service) pairs probed by a task of this process now.
    running: Mutex<HashSet<(String, Service)>>,
    shutdown: watch::Receiver<bool>,
}

/// Takes a pair out of the running set when its task ends, however it ends.
struct Running(Arc<Prober>, (String, Service));

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

impl Prober {
    /// Probers of API instance `instance`; they end when `shutdown` turns true.
    pub fn new(db: Db, metrics: Metrics, cfg: ReadinessConfig, instance: i64, shutdown: watch::Receiver<bool>) -> Self {
        Prober { db, metrics, cfg, instance, running: Mutex::default(), shutdown }
    }

    /// The `[readiness]` settings.
    pub fn config(&self) -> &ReadinessConfig {
        &self.cfg
    }

    /// Starts probing each of `targets` (service and published address) of the start with
    /// route `generation`, unless this process probes it already.
    pub fn spawn(self: &Arc<Self>, env_id: &str, generation: i64, targets: &[(Service, SocketAddr)]) {
        for (service, addr) in targets {
            let key = (env_id.to_string(), *service);
            if !self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone()) {
                continue;
            }
            let guard = Running(self.clone(), key);
            tokio::spawn(self.clone().follow(guard, generation, *addr));
        }
    }

    /// Probes one service until it is decided, no longer wanted, or the process shuts down.
    async fn follow(self: Arc<Self>, guard: Running, generation: i64, addr: SocketAddr) {
        let (env_id, service) = guard.1.clone();
        let name = service.as_str();
        let timeout = Duration::from_millis(self.cfg.probe_timeout_ms);
        let max_pause = Duration::from_millis(self.cfg.max_backoff_ms);
        let mut pause = FIRST_PAUSE;
        let mut last: Option<String> = None;
        let mut shutdown = self.shutdown.clone();
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Each round asks the database first: a stop, delete, failure or new start ends
            // the probing before the next connection is made.
            let remaining_ms = match db::readiness::remaining_ms(self.db.pool(), &env_id, name, generation).await {
                Ok(Some(ms)) => ms,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(env_id = %env_id, service = name, error = %e, "readiness: database unavailable; probing paused");
                    if pause_or_shutdown(max_pause, &mut shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let result = probe::probe(service, addr, timeout).await;
            let label = if result.is_ok() { "ready" } else { "not_ready" };
            self.metrics.readiness_probes.with_label_values(&[name, label]).inc();
            let decided = match result {
                Ok(()) => self.ready(&env_id, service, generation).await,
                Err(f) if remaining_ms <= 0 => self.give_up(&env_id, service, generation, &f.to_string()).await,
                Err(f) => {
                    let why = f.to_string();
                    if last.as_deref() != Some(why.as_str()) {
                        if let Err(e) = db::readiness::set_last_error(self.db.pool(), &env_id, name, generation, &why).await {
                            tracing::debug!(env_id = %env_id, service = name, error = %e, "readiness: recording the last error");
                        }
                        last = Some(why);
                    }
                    false
                }
            };
            if decided {
                return;
            }
            let left = Duration::from_millis(u64::try_from(remaining_ms.max(0)).unwrap_or(0));
            if pause_or_shutdown(pause.min(left.max(Duration::from_millis(10))), &mut shutdown).await {
                return;
            }
            pause = (pause * 2).min(max_pause);
        }
    }

    /// Records a ready service; false when the database could not be told (probe again).
    async fn ready(&self, env_id: &str, service: Service, generation: i64) -> bool {
        let name = service.as_str();
        match db::readiness::mark_ready(self.db.pool(), env_id, name, generation).await {
            Ok(Some(secs)) => {
                self.metrics.service_ready_seconds.with_label_values(&[name]).observe(secs);
                tracing::info!(env_id, service = name, seconds = secs, "service ready");
                let detail = serde_json::json!({ "service": name, "seconds": secs });
                if let Err(e) = self.db.event(Some(env_id), "service_ready", detail).await {
                    tracing::warn!(env_id, error = %e, "recording a service_ready event");
                }
                true
            }
            Ok(None) => true,
            Err(e) => {
                tracing::warn!(env_id, service = name, error = %e, "readiness: recording a ready service");
                false
            }
        }
    }

    /// Gives up on a service past its deadline: reported once; false when the database could
    /// not be told.
    async fn give_up(&self, env_id: &str, service: Service, generation: i64, why: &str) -> bool {
        let name = service.as_str();
        let deadline = self.cfg.deadline_s(service);
        let reason = format!("no {} within {deadline} s of the start (last probe: {why})", answer(service));
        match db::readiness::mark_failed(self.db.pool(), env_id, name, generation, &reason).await {
            Ok(true) => {
                self.metrics.services_not_ready.with_label_values(&[name]).inc();
                tracing::warn!(env_id, service = name, reason, "service not ready by its deadline");
                let detail = serde_json::json!({ "service": name, "reason": reason });
                if let Err(e) = self.db.event(Some(env_id), "service_not_ready", detail).await {
                    tracing::warn!(env_id, error = %e, "recording a service_not_ready event");
                }
                true
            }
            Ok(false) => true,
            Err(e) => {
                tracing::warn!(env_id, service = name, error = %e, "readiness: recording a service that is not ready");
                false
            }
        }
    }

    /// Takes over the services still to probe whose prober died (or that nobody probes yet,
    /// e.g. after the migration) and probes them here; returns how many it took.
    pub async fn resume(self: &Arc<Self>) -> anyhow::Result<u64> {
        let mut taken = 0;
        for p in db::readiness::pending(self.db.pool()).await? {
            let (Ok(service), Ok(addr)) = (p.service.parse::<Service>(), p.upstream.parse::<SocketAddr>()) else {
                continue;
            };
            if self.running.lock().unwrap_or_else(|e| e.into_inner()).contains(&(p.env_id.clone(), service)) {
                continue;
            }
            match p.prober {
                Some(i) if i == self.instance => {}
                Some(i) if db::instance_alive(&self.db, i).await? => continue,
                from => {
                    if !db::readiness::take_over(self.db.pool(), &p.env_id, &p.service, p.generation, from, self.instance)
                        .await?
                    {
                        continue;
                    }
                }
            }
            taken += 1;
            self.spawn(&p.env_id, p.generation, &[(service, addr)]);
        }
        Ok(taken)
    }

    /// Waits until every service of `env_id` is decided (ready or past its deadline), the
    /// environment is no longer running, or `limit` passes; polls the database, so it sees
    /// probers of any process.
    pub async fn wait_decided(&self, env_id: &str, limit: Duration) -> Result<(), sqlx::Error> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let rows = db::readiness::of_env(self.db.pool(), env_id).await?;
            if rows.iter().all(|r| r.ready_at.is_some() || r.failed_at.is_some()) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= until {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The longest a `wait: ready` may take for `services`: the latest deadline, one probe
    /// and a pause after it.
    pub fn wait_limit(&self, services: &[String]) -> Duration {
        let deadline = services.iter().filter_map(|s| s.parse::<Service>().ok()).map(|s| self.cfg.deadline_s(s)).max().unwrap_or(0);
        Duration::from_secs(deadline) + Duration::from_millis(self.cfg.probe_timeout_ms + self.cfg.max_backoff_ms + 1000)
    }
}

/// Sleeps `d`; true if the process is shutting down meanwhile.
async fn pause_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
        r = shutdown.changed() => r.is_err() || *shutdown.borrow(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(service: &str, ready: bool, failed: Option<&str>, last: Option<&str>) -> ReadinessRow {
        let t = DateTime::<Utc>::from_timestamp(1_800_000_000, 0).expect("time");
        ReadinessRow {
            service: service.into(),
            started_at: t,
            deadline_at: t,
            ready_at: ready.then_some(t),
            failed_at: failed.map(|_| t),
            last_error: failed.or(last).map(String::from),
        }
    }

    #[test]
    fn the_environment_is_ready_only_when_every_service_is() {
        let services = vec!["ssh".to_string(), "jupyter".to_string()];
        let (ready, per) = view(Status::Running, &services, &[row("ssh", true, None, None), row("jupyter", true, None, None)]);
        assert!(ready);
        assert!(per["ssh"].ready && per["ssh"].ready_at.is_some() && per["ssh"].not_ready_reason.is_none());

        let rows = [row("ssh", true, None, None), row("jupyter", false, None, Some("connection refused"))];
        let (ready, per) = view(Status::Running, &services, &rows);
        assert!(!ready);
        let why = per["jupyter"].not_ready_reason.as_deref().expect("reason");
        assert!(why.contains("an HTTP answer") && why.contains("connection refused"), "{why}");

        let rows = [row("ssh", true, None, None), row("jupyter", false, Some("no HTTP answer within 3 s"), None)];
        let (_, per) = view(Status::Running, &services, &rows);
        assert_eq!(per["jupyter"].not_ready_reason.as_deref(), Some("no HTTP answer within 3 s"));

        // A missing row is not ready (never "ready by default").
        let (ready, per) = view(Status::Running, &services, &[row("ssh", true, None, None)]);
        assert!(!ready);
        assert!(!per["jupyter"].ready);
    }

    #[test]
    fn a_stopped_environment_has_no_ready_service() {
        let services = vec!["ssh".to_string()];
        let (ready, per) = view(Status::Stopped, &services, &[row("ssh", true, None, None)]);
        assert!(!ready);
        assert_eq!(per["ssh"].not_ready_reason.as_deref(), Some("the environment is stopped"));
        let (ready, _) = view(Status::Running, &[], &[]);
        assert!(!ready, "no services: nothing to log in to");
    }
}
