//! The fleet's invariants, checked from outside: PostgreSQL rows, each gateway's route table
//! (read as nginx reads it) and each Docker engine (`docker ps` / `inspect` / `volume ls`).
//! A check takes one snapshot of all three and returns every violation as a sentence naming
//! the environment, port, host, container and GPU concerned, so a failure is its own evidence.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use sqlx::Connection;

/// A Docker engine as the checker reaches it.
#[derive(Clone)]
pub struct EngineView {
    /// The host row's name.
    pub host: String,
    /// Arguments before the command (`-H unix://…`, or none for the machine's engine).
    pub args: Vec<String>,
}

/// One gateway: its name and the table its nginx reads.
#[derive(Clone)]
pub struct GatewayView {
    pub name: String,
    pub table: PathBuf,
}

/// What the checker looks at.
#[derive(Clone)]
pub struct Checker {
    /// This test database's URL (a fresh connection per snapshot: the server may have been
    /// restarted since the last one).
    pub db_url: String,
    pub deployment: String,
    pub engines: Vec<EngineView>,
    pub gateways: Vec<GatewayView>,
    /// The pool the gateways bind (inclusive).
    pub ports: (u16, u16),
}

/// An environment row.
#[derive(Debug, Clone)]
pub struct EnvRow {
    pub id: String,
    pub status: String,
    pub host: String,
    /// Non-null claim columns (`op_instance` today; whatever names a claim after fencing).
    pub claims: Vec<String>,
}

/// A container of the deployment on one engine.
#[derive(Debug, Clone)]
pub struct ContainerView {
    pub id: String,
    pub env_id: String,
    pub running: bool,
    /// Published host addresses (`ip:port`).
    pub published: BTreeSet<String>,
    /// GPU indexes from its device nodes (`…/nvidia<N>` on the host side).
    pub gpus: Vec<u32>,
}

/// One look at everything.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub envs: BTreeMap<String, EnvRow>,
    /// port → env id, for allocated ports.
    pub port_owner: BTreeMap<u16, String>,
    /// host → containers (None: the engine did not answer).
    pub containers: BTreeMap<String, Option<Vec<ContainerView>>>,
    /// host → env ids with a home volume (None: the engine did not answer).
    pub volumes: BTreeMap<String, Option<BTreeSet<String>>>,
    /// gateway → port → (env id, upstream) of live routes (None: no table).
    pub tables: BTreeMap<String, Option<BTreeMap<u16, (String, String)>>>,
}

/// Marks a violation that must never be seen at all, not even for a moment: a port that may
/// reach another tenant, a GPU in two containers. The fault test counts these from the first
/// look after a fault, without waiting for the fleet to settle.
pub const HARD: &str = "[hard] ";

/// Whether `violation` is marked [`HARD`].
pub fn is_hard(violation: &str) -> bool {
    violation.starts_with(HARD)
}

/// Statuses in the middle of an operation.
pub const TRANSITIONAL: [&str; 4] = ["creating", "deleting", "stopping", "starting"];
/// Column names that mark a claimed row.
const CLAIM_KEYS: [&str; 6] = ["op_instance", "claim", "claim_token", "op_token", "op_claim", "claimed_by"];

fn docker(args: &[String], cmd: &[&str]) -> Option<String> {
    let out = Command::new("timeout").arg("20").arg("docker").args(args).args(cmd).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Checker {
    async fn rows(&self, snap: &mut Snapshot) -> Result<(), String> {
        let mut conn = sqlx::PgConnection::connect(&self.db_url).await.map_err(|e| format!("database: {e}"))?;
        let rows: Vec<(String, String, Option<String>, Value)> =
            sqlx::query_as("SELECT id, status, host, to_jsonb(e) FROM environments e WHERE status <> 'deleted'")
                .fetch_all(&mut conn)
                .await
                .map_err(|e| format!("environments: {e}"))?;
        for (id, status, host, all) in rows {
            let claims = CLAIM_KEYS
                .iter()
                .filter(|k| all.get(**k).is_some_and(|v| !v.is_null()))
                .map(|k| format!("{k}={}", all[*k]))
                .collect();
            snap.envs.insert(id.clone(), EnvRow { id, status, host: host.unwrap_or_default(), claims });
        }
        let ports: Vec<(i32, String)> =
            sqlx::query_as("SELECT port, env_id FROM port_pool WHERE status = 'allocated' AND env_id IS NOT NULL")
                .fetch_all(&mut conn)
                .await
                .map_err(|e| format!("port_pool: {e}"))?;
        snap.port_owner = ports.into_iter().map(|(p, e)| (p as u16, e)).collect();
        let _ = conn.close().await;
        Ok(())
    }

    fn engine(&self, e: &EngineView, snap: &mut Snapshot) {
        let label = format!("label=gpugate.deployment={}", self.deployment);
        let ids = docker(&e.args, &["ps", "-aq", "--filter", &label]);
        let containers = ids.and_then(|ids| {
            let ids: Vec<&str> = ids.lines().filter(|l| !l.is_empty()).collect();
            if ids.is_empty() {
                return Some(vec![]);
            }
            let mut cmd = vec!["inspect"];
            cmd.extend(ids);
            // A container removed between ps and inspect makes inspect fail: one retry.
            let text = docker(&e.args, &cmd)?;
            let all: Vec<Value> = serde_json::from_str(&text).ok()?;
            Some(all.iter().map(container_view).collect())
        });
        snap.containers.insert(e.host.clone(), containers);
        let vols = docker(&e.args, &["volume", "ls", "--filter", &label, "--format", "{{.Label \"gpugate.env_id\"}}"]);
        snap.volumes.insert(e.host.clone(), vols.map(|t| t.lines().map(str::to_string).collect()));
    }

    fn tables(&self, snap: &mut Snapshot) {
        let now = gpugate_routes::now_ms();
        for g in &self.gateways {
            let t = gpugate_routes::Table::open_read_only(&g.table).ok().map(|t| {
                t.routes()
                    .filter(|(p, r)| (self.ports.0..=self.ports.1).contains(p) && !r.expired_at(now))
                    .map(|(p, r)| (p, (r.env_id.as_str().to_string(), r.upstream.to_string())))
                    .collect()
            });
            snap.tables.insert(g.name.clone(), t);
        }
    }

    /// Takes a snapshot: database first, then the engines, then the tables (an operation that
    /// completes in between shows as a change the next snapshot no longer has).
    pub async fn snapshot(&self) -> Result<Snapshot, String> {
        let mut snap = Snapshot::default();
        self.rows(&mut snap).await?;
        for e in &self.engines {
            let mut tries = 0;
            loop {
                self.engine(e, &mut snap);
                tries += 1;
                if snap.containers[&e.host].is_some() || tries >= 2 {
                    break;
                }
            }
        }
        self.tables(&mut snap);
        Ok(snap)
    }

    /// The invariants that hold at any moment once in-flight operations have finished
    /// (`settled`), and, with `converged`, also those that hold only after the reconciler's
    /// passes (nothing transitional or claimed, no stray container, every running workspace
    /// routed by every gateway). `frozen`: hosts whose engine is known not to answer.
    pub fn violations(&self, s: &Snapshot, converged: bool, frozen: &BTreeSet<String>) -> Vec<String> {
        let mut v = vec![];
        // 1. Every port in every gateway's table belongs to a running environment whose
        //    container is on that host and publishes that upstream.
        for (gw, table) in &s.tables {
            let Some(table) = table else {
                v.push(format!("gateway {gw}: its route table cannot be read"));
                continue;
            };
            for (port, (env, upstream)) in table {
                let Some(row) = s.envs.get(env) else {
                    v.push(format!("gateway {gw}: port {port} routes to {upstream} for environment {env}, which is deleted or unknown"));
                    continue;
                };
                // `unreachable` keeps its routes for the grace period by design.
                if row.status != "running" && row.status != "unreachable" {
                    v.push(format!("gateway {gw}: port {port} routes to environment {env} in status {}", row.status));
                }
                if s.port_owner.get(port) != Some(env) {
                    v.push(format!(
                        "{HARD}gateway {gw}: port {port} routes to environment {env} but the port is allocated to {:?}",
                        s.port_owner.get(port)
                    ));
                }
                if frozen.contains(&row.host) {
                    continue;
                }
                match s.containers.get(&row.host) {
                    Some(Some(cs)) => {
                        let mine: Vec<&ContainerView> = cs.iter().filter(|c| &c.env_id == env && c.running).collect();
                        if mine.is_empty() {
                            v.push(format!(
                                "gateway {gw}: port {port} routes to environment {env} (host {}), which has no running container there",
                                row.host
                            ));
                        } else if !mine.iter().any(|c| c.published.contains(upstream)) {
                            let p: Vec<_> = mine.iter().map(|c| (&c.id[..12], &c.published)).collect();
                            v.push(format!(
                                "{HARD}gateway {gw}: port {port} routes to {upstream}, which no container of environment {env} on host {} publishes (it publishes {p:?})",
                                row.host
                            ));
                        }
                    }
                    Some(None) => v.push(format!("host {}: its engine did not answer the checker", row.host)),
                    None => v.push(format!("gateway {gw}: port {port}: environment {env} is on unknown host {:?}", row.host)),
                }
            }
        }
        // A port that reaches a container of another environment (on any engine) is the
        // worst case: a client lands in a stranger's workspace.
        for (gw, table) in &s.tables {
            for (port, (env, upstream)) in table.iter().flatten() {
                for (host, cs) in &s.containers {
                    for c in cs.iter().flatten().filter(|c| c.running && &c.env_id != env && c.published.contains(upstream)) {
                        v.push(format!(
                            "{HARD}gateway {gw}: port {port} (environment {env}) reaches {upstream}, container {} of environment {} on host {host}",
                            &c.id[..12],
                            c.env_id
                        ));
                    }
                }
            }
        }
        // 2. No GPU held by two live containers (per host: the stand-in index).
        for (host, cs) in &s.containers {
            let Some(cs) = cs else { continue };
            let mut held: BTreeMap<u32, Vec<String>> = BTreeMap::new();
            for c in cs.iter().filter(|c| c.running) {
                for g in &c.gpus {
                    held.entry(*g).or_default().push(format!("{} (environment {})", &c.id[..12], c.env_id));
                }
            }
            for (g, who) in held {
                if who.len() > 1 {
                    v.push(format!("{HARD}host {host}: GPU {g} is held by {} running containers: {}", who.len(), who.join(", ")));
                }
            }
            // One environment, one container.
            let mut per_env: BTreeMap<&str, usize> = BTreeMap::new();
            for c in cs {
                *per_env.entry(&c.env_id).or_default() += 1;
            }
            for (env, n) in per_env {
                if n > 1 {
                    v.push(format!("host {host}: environment {env} has {n} containers"));
                }
            }
        }
        // 3. Every existing environment has its home volume on its host.
        for row in s.envs.values() {
            if row.status == "creating" || frozen.contains(&row.host) {
                continue;
            }
            if let Some(Some(vols)) = s.volumes.get(&row.host) {
                if !vols.contains(&row.id) {
                    v.push(format!("environment {} ({}) on host {} has no home volume there", row.id, row.status, row.host));
                }
            }
        }
        // Every container belongs to a live environment of its host, and a running one to a
        // running workspace (strays and doubles are how a lost operation shows).
        for (host, cs) in &s.containers {
            let Some(cs) = cs else { continue };
            for c in cs {
                match s.envs.get(&c.env_id) {
                    None => v.push(format!(
                        "host {host}: container {} ({}) belongs to environment {}, which is deleted or unknown",
                        &c.id[..12],
                        if c.running { "running" } else { "not running" },
                        c.env_id
                    )),
                    Some(row) if &row.host != host => v.push(format!(
                        "host {host}: container {} belongs to environment {}, which is on host {}",
                        &c.id[..12],
                        c.env_id,
                        row.host
                    )),
                    Some(row) if converged && c.running && row.status != "running" => v.push(format!(
                        "host {host}: container {} of environment {} runs while the environment is {}",
                        &c.id[..12],
                        c.env_id,
                        row.status
                    )),
                    _ => {}
                }
            }
        }
        if converged {
            // 4. Nothing transitional, nothing claimed.
            for row in s.envs.values() {
                if TRANSITIONAL.contains(&row.status.as_str()) {
                    v.push(format!("environment {} is still {} after convergence", row.id, row.status));
                }
                if !row.claims.is_empty() {
                    v.push(format!("environment {} ({}) is still claimed after convergence: {}", row.id, row.status, row.claims.join(", ")));
                }
            }
            // 5. Nothing lost: a running workspace is routed by every gateway and has its
            //    running container.
            let mut routed: BTreeMap<&str, BTreeSet<&String>> = BTreeMap::new();
            for (gw, t) in &s.tables {
                for (env, _) in t.iter().flat_map(|t| t.values()) {
                    routed.entry(gw.as_str()).or_default().insert(env);
                }
            }
            for row in s.envs.values().filter(|r| r.status == "running") {
                for gw in s.tables.keys() {
                    if !routed.get(gw.as_str()).is_some_and(|r| r.contains(&row.id)) {
                        v.push(format!("environment {} is running but gateway {gw} has no route to it", row.id));
                    }
                }
                if let Some(Some(cs)) = s.containers.get(&row.host) {
                    if !cs.iter().any(|c| c.env_id == row.id && c.running) {
                        v.push(format!("environment {} is running but has no running container on host {}", row.id, row.host));
                    }
                }
            }
        }
        v
    }
}

fn container_view(c: &Value) -> ContainerView {
    let mut published = BTreeSet::new();
    if let Some(ports) = c["NetworkSettings"]["Ports"].as_object() {
        for bindings in ports.values().filter_map(Value::as_array) {
            for b in bindings {
                if let (Some(ip), Some(port)) = (b["HostIp"].as_str(), b["HostPort"].as_str()) {
                    published.insert(format!("{ip}:{port}"));
                }
            }
        }
    }
    let mut gpus: Vec<u32> = c["HostConfig"]["Devices"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .filter_map(|d| d["PathOnHost"].as_str())
                .filter_map(|p| p.rsplit('/').next()?.strip_prefix("nvidia")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // The nvidia device driver's requests (CDI or runtime hook) name GPUs too.
    if let Some(reqs) = c["HostConfig"]["DeviceRequests"].as_array() {
        for r in reqs {
            for id in r["DeviceIDs"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if let Ok(i) = id.parse() {
                    gpus.push(i);
                }
            }
        }
    }
    gpus.sort_unstable();
    gpus.dedup();
    ContainerView {
        id: c["Id"].as_str().unwrap_or("????????????").to_string(),
        env_id: c["Config"]["Labels"]["gpugate.env_id"].as_str().unwrap_or("").to_string(),
        running: c["State"]["Running"].as_bool().unwrap_or(false),
        published,
        gpus,
    }
}
