//! The fleet: one Docker client per GPU host, made on first use from the host's row (the host
//! health loop that pings them is [`crate::host_health`], above the state this is part of).
//! Every lifecycle step reaches an environment's container through the client of the
//! environment's host.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::RwLock;

use crate::config::{Config, Placement};
use crate::db::{gpus, hosts, Db, DbResult, Tx};
use crate::gpu::GpuRef;
use crate::docker::{DockerClient, DockerError, Endpoint};

/// The Docker clients of the fleet's hosts.
#[derive(Clone)]
pub struct Fleet {
    cfg: Arc<Config>,
    db: Db,
    /// This API's own host (checked and prepared at start).
    local: DockerClient,
    /// Clients of the other hosts, with the endpoint each was made for (a changed row makes
    /// a new client).
    others: Arc<RwLock<HashMap<String, (Endpoint, DockerClient)>>>,
    /// One lock per host, held while its client is made, so a burst of creates connects to a
    /// host once; per host, so a host whose engine hangs delays no other host's. It guards the
    /// host's last failed connect: the callers that queued behind a connect that failed fail
    /// at once with its error, so a burst costs one time-out, not one per caller.
    connecting: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Failed>>>>>>,
}

/// A connect to a host's engine that failed: for which endpoint, when, and why.
struct Failed {
    endpoint: Endpoint,
    at: std::time::Instant,
    error: DockerError,
}

/// How long a failed connect answers for the host before the next one is tried.
fn failure_memory(cfg: &Config) -> std::time::Duration {
    std::time::Duration::from_secs(cfg.docker.call_timeout_s.clamp(1, 10))
}

impl Fleet {
    /// A fleet whose own host is `local` (named `cfg.fleet.host_name`).
    pub fn new(cfg: Arc<Config>, db: Db, local: DockerClient) -> Fleet {
        Fleet { cfg, db, local, others: Arc::default(), connecting: Arc::default() }
    }

    /// This API's own host's name.
    pub fn local_name(&self) -> &str {
        &self.cfg.fleet.host_name
    }

    /// This API's own engine.
    pub fn local(&self) -> &DockerClient {
        &self.local
    }

    /// The client of `host`: this API's own, or one made (and its workspace network checked)
    /// from the host's row on first use.
    pub async fn client(&self, host: &str) -> Result<DockerClient, DockerError> {
        if host == self.local_name() {
            return Ok(self.local.clone());
        }
        let row = hosts::get(self.db.pool(), host).await.map_err(|e| DockerError::Connect(format!("reading host {host}: {e}")))?;
        self.client_of(host, row).await
    }

    /// [`Fleet::client`] reading the host's row in `tx` (a create's transaction must not wait
    /// for a second pool connection while it holds one).
    pub async fn client_in(&self, tx: &mut Tx<'_>, host: &str) -> Result<DockerClient, DockerError> {
        if host == self.local_name() {
            return Ok(self.local.clone());
        }
        let row = hosts::get(&mut **tx, host).await.map_err(|e| DockerError::Connect(format!("reading host {host}: {e}")))?;
        self.client_of(host, row).await
    }

    async fn client_of(&self, host: &str, row: Option<hosts::HostRow>) -> Result<DockerClient, DockerError> {
        let row = row.ok_or_else(|| DockerError::Connect(format!("host {host} is not in the fleet")))?;
        let upstream: IpAddr = row
            .upstream_address
            .parse()
            .map_err(|_| DockerError::Connect(format!("host {host} has a bad upstream address")))?;
        let want = Endpoint { host: host.to_string(), endpoint: row.docker_endpoint.clone(), tls_dir: row.tls_dir.clone(), upstream };
        if let Some((had, client)) = self.others.read().await.get(host) {
            if *had == want {
                return Ok(client.clone());
            }
        }
        let lock = {
            let mut all = self.connecting.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            all.entry(host.to_string()).or_default().clone()
        };
        let mut last = lock.lock().await;
        if let Some((had, client)) = self.others.read().await.get(host) {
            if *had == want {
                return Ok(client.clone());
            }
        }
        if let Some(f) = last.as_ref().filter(|f| f.endpoint == want && f.at.elapsed() < failure_memory(&self.cfg)) {
            return Err(f.error.clone());
        }
        match self.connect(host, &want).await {
            Ok(client) => {
                *last = None;
                Ok(client)
            }
            Err(error) => {
                *last = Some(Failed { endpoint: want, at: std::time::Instant::now(), error: error.clone() });
                Err(error)
            }
        }
    }

    /// Makes the client of `host` at `want` (its engine recorded, its workspace network
    /// checked) and keeps it for the next callers.
    async fn connect(&self, host: &str, want: &Endpoint) -> Result<DockerClient, DockerError> {
        let upstream = want.upstream;
        let mut client = DockerClient::connect_to(&self.cfg, want, self.local.gpu().clone()).await?;
        if let Some(now) = client.engine_id() {
            let had = hosts::record_engine(&self.db, host, now)
                .await
                .map_err(|e| DockerError::Connect(format!("recording host {host}'s engine: {e}")))?;
            if let Some(had) = had.filter(|h| h != now) {
                return Err(DockerError::WrongEngine(format!(
                    "host {host} is Docker engine {had} in the database, but {} answers as engine {now}; refusing to act for it \
                     (if the host was rebuilt, run `gpugate-api host forget-engine {host}`)",
                    want.endpoint
                )));
            }
        }
        client.ensure_network().await?;
        tracing::info!(host, endpoint = %want.endpoint, upstream = %upstream, "connected to the host's Docker engine");
        self.others.write().await.insert(host.to_string(), (want.clone(), client.clone()));
        Ok(client)
    }
}

/// Chooses a host for a new environment `id` (already inserted in `tx`) and takes its GPUs
/// there, in the create's transaction: the candidates in `policy`'s order, each held against
/// removal and re-checked (still active, under its environment limit), the first whose GPUs
/// could all be taken (`FOR UPDATE SKIP LOCKED`: rows another create holds are skipped, so the
/// next host is tried rather than waited for). `None`: no host can take it now.
///
/// Each candidate is tried under a savepoint: a host that cannot take it is rolled back to
/// it, which also releases that host's row lock at once, so a create holds the lock of the
/// one host it placed on only, and two creates cannot wait for each other's hosts.
pub async fn place(
    tx: &mut Tx<'_>,
    id: &str,
    count: u32,
    model: Option<&str>,
    policy: Placement,
) -> DbResult<Option<(String, Vec<GpuRef>)>> {
    for c in hosts::candidates(tx, id, count, model, policy).await? {
        let mut sp = sqlx::Acquire::begin(&mut **tx).await?;
        if !hosts::hold_for_placement(&mut sp, &c).await? || !hosts::has_room(&mut sp, id, &c).await? {
            sp.rollback().await?;
            continue;
        }
        let got = gpus::allocate(&mut sp, &c.name, id, count, model).await?;
        if got.len() == count as usize {
            sp.commit().await?;
            return Ok(Some((c.name, got)));
        }
        // Another create took some meanwhile: give these back and try the next host.
        sp.rollback().await?;
    }
    Ok(None)
}

/// Checks a host to add (the API and the CLI both): the message names the field to fix.
pub fn check_new_host(h: &hosts::NewHost) -> Result<(), String> {
    if !crate::config::valid_host_name(&h.name) {
        return Err(format!(
            "name \"{}\" must be 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'",
            h.name
        ));
    }
    let ep = h.docker_endpoint.trim();
    let tls = h.tls_dir.as_deref().is_some_and(|d| !d.trim().is_empty());
    if ep.starts_with("tcp://") || ep.starts_with("https://") {
        if !tls {
            return Err(format!(
                "docker_endpoint \"{ep}\" is TCP: give tls_dir, a directory with ca.pem, cert.pem and key.pem (Docker's TLS client certificates)"
            ));
        }
        if tls && !h.tls_dir.as_deref().is_some_and(|d| d.starts_with('/')) {
            return Err("tls_dir must be an absolute path".into());
        }
    } else if ep.starts_with("unix:///") || ep.starts_with("http://") {
        if tls {
            return Err("tls_dir is only for tcp:// and https:// endpoints".into());
        }
    } else {
        return Err(format!(
            "docker_endpoint \"{ep}\" must start with unix:///, tcp:// or https:// (with tls_dir), or http:// (no TLS: a trusted lab network only)"
        ));
    }
    if ep.len() > 512 || ep.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("docker_endpoint must be one URL of at most 512 characters".into());
    }
    if h.upstream_address.is_unspecified() || h.upstream_address.is_multicast() {
        return Err(format!(
            "upstream_address {} must be an address gateways can dial (the host's published ports bind there)",
            h.upstream_address
        ));
    }
    if h.gpu_model.chars().count() > 128 || h.gpu_model.chars().any(char::is_control) {
        return Err("gpu_model must be at most 128 printable characters".into());
    }
    if h.max_environments == Some(0) || h.max_environments.is_some_and(|m| m > 1_000_000) {
        return Err("max_environments must be 1 to 1000000".into());
    }
    if h.gpus.len() > 1024 || h.gpus.iter().any(|i| *i > 65_535) {
        return Err("gpus must be at most 1024 indexes of 0 to 65535".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = h.gpus.iter().find(|i| !seen.insert(**i)) {
        return Err(format!("gpus lists index {dup} twice"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> hosts::NewHost {
        hosts::NewHost {
            name: "gpu-2".into(),
            docker_endpoint: "unix:///run/gpu2/docker.sock".into(),
            tls_dir: None,
            upstream_address: "10.0.0.2".parse().expect("ip"),
            gpu_model: "NVIDIA A100".into(),
            max_environments: Some(16),
            gpus: vec![0, 1, 2, 3],
        }
    }

    #[test]
    fn a_good_host_passes_and_each_bad_field_is_named() {
        assert_eq!(check_new_host(&host()), Ok(()));
        let tls = hosts::NewHost { docker_endpoint: "tcp://10.0.0.2:2376".into(), tls_dir: Some("/etc/gpugate/gpu-2".into()), ..host() };
        assert_eq!(check_new_host(&tls), Ok(()));
        let cases: Vec<(hosts::NewHost, &str)> = vec![
            (hosts::NewHost { name: "GPU_2".into(), ..host() }, "name"),
            (hosts::NewHost { docker_endpoint: "tcp://10.0.0.2:2375".into(), ..host() }, "tls_dir"),
            (hosts::NewHost { docker_endpoint: "tcp://10.0.0.2:2376".into(), tls_dir: Some("certs".into()), ..host() }, "absolute"),
            (hosts::NewHost { tls_dir: Some("/x".into()), ..host() }, "only for tcp"),
            (hosts::NewHost { docker_endpoint: "ssh://gpu2".into(), ..host() }, "must start with"),
            (hosts::NewHost { upstream_address: "0.0.0.0".parse().expect("ip"), ..host() }, "upstream_address"),
            (hosts::NewHost { max_environments: Some(0), ..host() }, "max_environments"),
            (hosts::NewHost { gpus: vec![0, 1, 1], ..host() }, "index 1 twice"),
            (hosts::NewHost { gpu_model: "x".repeat(129), ..host() }, "gpu_model"),
        ];
        for (h, want) in cases {
            let got = check_new_host(&h).expect_err(want);
            assert!(got.contains(want), "{got} should name {want}");
        }
    }
}
