//! The Docker client of one deployment on one host: connecting, the workspace network, and
//! each container operation, every call bounded by the call time-out. Volumes
//! (`volume.rs`) and commands inside containers (`exec.rs`) add their methods beside it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bollard::container::{
    CreateContainerOptions, InspectContainerOptions,
    ListContainersOptions, RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::errors::Error as BollardError;
use bollard::network::{CreateNetworkOptions, ListNetworksOptions};
use bollard::Docker;
use gpugate_routes::Service;

use super::error::{server_message, server_status, DockerError};
use super::labels::{LABEL_DEPLOYMENT, LABEL_ENV, LABEL_HOST, LABEL_MANAGED};
use super::plan::{container_port, Limits, Plan, WorkspaceSpec};
use crate::config::Config;
use crate::gpu::{DriverProbe, EngineGpuFacts, GpuBackend};

/// A managed container as listed by label.
#[derive(Debug, Clone)]
pub struct Managed {
    /// Container id.
    pub id: String,
    /// Its `gpugate.env_id` label.
    pub env_id: String,
    /// Its `gpugate.host` label (none on containers made before fleets).
    pub host: Option<String>,
    /// Whether it is running.
    pub running: bool,
}

/// What inspecting a workspace container tells.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// Whether it is running.
    pub running: bool,
    /// Published host address per container port.
    pub published: HashMap<u16, SocketAddr>,
    /// Its memory, CPU and pids limits, when all three are set.
    pub limits: Option<Limits>,
}

/// Where a host's engine is and where its containers publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The host's name in the fleet (labels its containers and volumes).
    pub host: String,
    /// `unix:///path`, `tcp://host:port` (TLS), `https://`, `http://`; empty: local defaults.
    pub endpoint: String,
    /// Directory with `ca.pem`, `cert.pem`, `key.pem` for TLS endpoints.
    pub tls_dir: Option<String>,
    /// The address published ports bind to; routes point there.
    pub upstream: IpAddr,
}

/// The Docker client of one deployment on one host.
#[derive(Clone)]
pub struct DockerClient {
    pub(super) docker: Docker,
    pub(super) plan: Plan,
    stop_timeout_s: u32,
    call_timeout: Duration,
    /// The engine's CPU count: Docker refuses a CPU limit above it, so larger limits are
    /// clamped to it (a workspace can use the whole host's CPUs, but no more).
    host_cpus: Option<f64>,
    /// The engine's own ID (`docker info`), when it answered.
    engine_id: Option<String>,
    /// This engine's GPUs: how they are passed (also in `plan`) and where the inventory
    /// comes from.
    gpu: GpuBackend,
}

impl DockerClient {
    /// Connects to the configured endpoint (this API's own host) and negotiates the API
    /// version.
    pub async fn connect(cfg: &Config) -> Result<DockerClient, DockerError> {
        let target = Endpoint {
            host: cfg.fleet.host_name.clone(),
            endpoint: cfg.docker.endpoint.clone(),
            tls_dir: None,
            upstream: cfg.upstream_host,
        };
        DockerClient::connect_to(cfg, &target, GpuBackend::configured(&cfg.gpu)).await
    }

    /// Connects to another host's engine: its endpoint, TLS client certificates and upstream
    /// address, with `gpu` (the mode resolved on this API's own host: every host of a fleet
    /// passes GPUs the same way).
    pub async fn connect_to(cfg: &Config, target: &Endpoint, gpu: GpuBackend) -> Result<DockerClient, DockerError> {
        let timeout = cfg.docker.call_timeout_s.max(1);
        let ep = target.endpoint.trim();
        let docker = if ep.is_empty() {
            Docker::connect_with_local_defaults()
        } else if let Some(path) = ep.strip_prefix("unix://") {
            Docker::connect_with_unix(path, timeout, bollard::API_DEFAULT_VERSION)
        } else if ep.starts_with("tcp://") || ep.starts_with("https://") {
            let Some(dir) = target.tls_dir.as_deref() else {
                return Err(DockerError::Connect(format!(
                    "endpoint \"{ep}\" needs TLS client certificates (a directory with ca.pem, cert.pem and key.pem); use http:// only on a trusted lab network"
                )));
            };
            let dir = std::path::Path::new(dir);
            Docker::connect_with_ssl(
                ep,
                &dir.join("key.pem"),
                &dir.join("cert.pem"),
                &dir.join("ca.pem"),
                timeout,
                bollard::API_DEFAULT_VERSION,
            )
        } else if ep.starts_with("http://") {
            Docker::connect_with_http(ep, timeout, bollard::API_DEFAULT_VERSION)
        } else {
            return Err(DockerError::Connect(format!(
                "endpoint \"{ep}\" must start with unix://, tcp:// (TLS), https:// (TLS) or http://"
            )));
        }
        .map_err(|e| DockerError::Connect(e.to_string()))?;
        let docker = tokio::time::timeout(Duration::from_secs(timeout), docker.negotiate_version())
            .await
            .map_err(|_| DockerError::Timeout("version"))?
            .map_err(|e| DockerError::Connect(e.to_string()))?;
        let (host_cpus, engine_id) = match tokio::time::timeout(Duration::from_secs(timeout), docker.info()).await {
            Ok(Ok(info)) => (info.ncpu.filter(|n| *n > 0).map(|n| n as f64), info.id.filter(|id| !id.is_empty())),
            _ => {
                tracing::warn!(endpoint = %ep, "docker info failed; CPU limits are passed unclamped");
                (None, None)
            }
        };
        let mut plan = Plan::from_config(cfg);
        plan.upstream_host = target.upstream;
        plan.host = target.host.clone();
        plan.gpu = gpu.passing.clone();
        Ok(DockerClient {
            docker,
            plan,
            stop_timeout_s: cfg.docker.stop_timeout_s,
            call_timeout: Duration::from_secs(timeout),
            host_cpus,
            engine_id,
            gpu,
        })
    }

    /// The engine's own ID (`docker info`), if it told: what a host row records to know which
    /// engine its name stands for.
    pub fn engine_id(&self) -> Option<&str> {
        self.engine_id.as_deref()
    }

    /// This engine's GPU backend.
    pub fn gpu(&self) -> &GpuBackend {
        &self.gpu
    }

    /// Sets this engine's GPU backend (resolved at start by [`crate::gpu::prepare`]).
    pub fn set_gpu(&mut self, backend: GpuBackend) {
        self.plan.gpu = backend.passing.clone();
        self.gpu = backend;
    }

    /// What the engine says about GPUs: its version, whether it lists the `nvidia` runtime,
    /// and, with `probe`, whether it has the `nvidia` device driver. Docker lists device
    /// drivers nowhere; the only answer is a container start asking for one (the driver is
    /// chosen when the container's spec is made, at start), so a throw-away container of
    /// `image` asks for no device of driver `nvidia` (`NVIDIA_VISIBLE_DEVICES=void`: the
    /// toolkit's hook then exposes nothing) and is removed.
    pub async fn gpu_facts(&self, image: &str, probe: bool) -> EngineGpuFacts {
        let version = match self.timed("version", self.docker.version()).await {
            Ok(Ok(v)) => v.version.unwrap_or_default(),
            _ => String::new(),
        };
        let nvidia_runtime = match self.timed("info", self.docker.info()).await {
            Ok(Ok(info)) => info.runtimes.is_some_and(|r| r.contains_key("nvidia")),
            _ => false,
        };
        let nvidia_driver = if probe {
            self.probe_nvidia_driver(image).await
        } else {
            DriverProbe::Unknown("not checked".into())
        };
        EngineGpuFacts { version, nvidia_runtime, nvidia_driver }
    }

    async fn probe_nvidia_driver(&self, image: &str) -> DriverProbe {
        if let Err(e) = self.image_exists(image).await {
            return DriverProbe::Unknown(format!("no image to try it with: {e}"));
        }
        let mut labels = HashMap::new();
        labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
        labels.insert(LABEL_DEPLOYMENT.to_string(), self.plan.deployment.clone());
        let config = bollard::container::Config {
            image: Some(image.to_string()),
            entrypoint: Some(vec!["sh".to_string(), "-c".to_string(), "exit 0".to_string()]),
            cmd: Some(vec![]),
            env: Some(vec!["NVIDIA_VISIBLE_DEVICES=void".to_string()]),
            labels: Some(labels),
            network_disabled: Some(true),
            host_config: Some(bollard::models::HostConfig {
                network_mode: Some("none".into()),
                device_requests: Some(vec![bollard::models::DeviceRequest {
                    driver: Some("nvidia".into()),
                    capabilities: Some(vec![vec!["gpu".into()]]),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let name = format!("gpugate-{}-gpu-probe-{}", self.plan.deployment, &crate::ids::env_id()[..8]);
        let opts = CreateContainerOptions { name: name.clone(), platform: None };
        let id = match self.timed("create", self.docker.create_container(Some(opts), config)).await {
            Ok(Ok(r)) => r.id,
            Ok(Err(e)) => return DriverProbe::Unknown(format!("creating a trial container: {}", server_message(&e))),
            Err(e) => return DriverProbe::Unknown(e.to_string()),
        };
        let started = self.timed("start", self.docker.start_container(&id, None::<StartContainerOptions<String>>)).await;
        let _ = self.remove(&id).await;
        match started {
            Ok(Err(e)) if server_message(&e).contains("could not select device driver") => {
                DriverProbe::Absent(server_message(&e).trim().to_string())
            }
            // Started, or failed after the driver was chosen (the hook or the command): the
            // driver is there.
            Ok(_) => DriverProbe::Present,
            Err(e) => DriverProbe::Unknown(e.to_string()),
        }
    }

    pub(super) async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, BollardError>>,
    ) -> Result<Result<T, BollardError>, DockerError> {
        // What says the engine did not answer (bollard's own time-out, a broken connection)
        // is the engine being unavailable, never the operation's own failure: callers see
        // Timeout or Connect (a 503 and a retry), and only the engine's answers as theirs.
        match tokio::time::timeout(self.call_timeout, fut).await {
            Err(_) | Ok(Err(BollardError::RequestTimeoutError)) => Err(DockerError::Timeout(op)),
            Ok(Err(
                e @ (BollardError::IOError { .. }
                | BollardError::HyperResponseError { .. }
                | BollardError::HyperLegacyError { .. }
                | BollardError::SocketNotFoundError(_)),
            )) => Err(DockerError::Connect(format!("{op}: {e}"))),
            Ok(r) => Ok(r),
        }
    }

    /// Makes sure the workspace network exists as a bridge with inter-container traffic
    /// disabled: workspaces reach the outside and are reached through their published ports,
    /// but not each other. One network for the deployment (not one per workspace) because
    /// Docker's default address pools hold only a few dozen bridge networks, while a host
    /// runs hundreds of workspaces. An existing network that lets containers talk is refused.
    ///
    /// Docker does not make network names unique under concurrent creates, so processes
    /// starting together may make two; every process then keeps the oldest (ties: lowest id),
    /// removes the others, and attaches containers by id.
    pub async fn ensure_network(&mut self) -> Result<(), DockerError> {
        let name = self.plan.network.clone();
        let icc = "com.docker.network.bridge.enable_icc";
        let mut found = self.networks_named(&name).await?;
        if found.is_empty() {
            let mut options = HashMap::new();
            options.insert(icc.to_string(), "false".to_string());
            let mut labels = HashMap::new();
            labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
            labels.insert(LABEL_DEPLOYMENT.to_string(), self.plan.deployment.clone());
            let opts = CreateNetworkOptions {
                name: name.clone(),
                check_duplicate: true,
                driver: "bridge".to_string(),
                options,
                labels,
                ..Default::default()
            };
            match self.timed("create network", self.docker.create_network(opts)).await? {
                Ok(_) => tracing::info!(network = %name, "created the workspace network (inter-container traffic disabled)"),
                Err(e) if server_status(&e) == Some(409) => {}
                Err(e) => return Err(DockerError::Network(name, server_message(&e))),
            }
            found = self.networks_named(&name).await?;
        }
        // The oldest is kept, by its parsed time: Docker prints a variable number of fractional
        // digits, so the strings do not sort by time.
        found.sort_by_key(|n| {
            let at = n.created.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
            (at.map(|t| t.timestamp_nanos_opt().unwrap_or(i64::MAX)).unwrap_or(i64::MAX), n.id.clone())
        });
        let Some(keep) = found.first().cloned() else {
            return Err(DockerError::Network(name, "missing right after it was created".into()));
        };
        for extra in &found[1..] {
            if let Some(id) = &extra.id {
                let _ = self.timed("remove network", self.docker.remove_network(id)).await;
            }
        }
        let options = keep.options.unwrap_or_default();
        if keep.driver.as_deref() != Some("bridge") || options.get(icc).map(String::as_str) != Some("false") {
            return Err(DockerError::Network(
                name,
                format!("exists but is not a bridge with {icc}=false; remove it (docker network rm) or set docker.network to another name"),
            ));
        }
        // Containers name the network, not the id this process saw: two processes starting
        // together may each have created one, and the one that removes the younger may remove
        // the one the other first saw; by name, both end up on the one that stays.
        Ok(())
    }

    /// The networks named exactly `name`.
    async fn networks_named(&self, name: &str) -> Result<Vec<bollard::models::Network>, DockerError> {
        let mut filters = HashMap::new();
        filters.insert("name".to_string(), vec![name.to_string()]);
        let list = self
            .timed("list networks", self.docker.list_networks(Some(ListNetworksOptions { filters })))
            .await?
            .map_err(|e| DockerError::Network(name.into(), server_message(&e)))?;
        Ok(list.into_iter().filter(|n| n.name.as_deref() == Some(name)).collect())
    }

    /// Whether the engine answers.
    pub async fn ping(&self) -> Result<(), DockerError> {
        self.timed("ping", self.docker.ping())
            .await?
            .map(|_| ())
            .map_err(|e| DockerError::Connect(e.to_string()))
    }

    /// Checks that `image` exists locally (no pull is ever attempted).
    pub async fn image_exists(&self, image: &str) -> Result<(), DockerError> {
        match self.timed("inspect image", self.docker.inspect_image(image)).await? {
            Ok(_) => Ok(()),
            Err(e) if server_status(&e) == Some(404) => Err(DockerError::ImageMissing(image.into())),
            Err(e) => Err(DockerError::InspectImage(image.into(), server_message(&e))),
        }
    }

    /// Creates (does not start) the workspace container; returns its id.
    pub async fn create(&self, spec: &WorkspaceSpec<'_>) -> Result<String, DockerError> {
        let mut limits = spec.limits;
        if let Some(n) = self.host_cpus {
            limits.cpus = limits.cpus.min(n);
        }
        let spec = WorkspaceSpec { limits, ..*spec };
        let (name, config) = self.plan.container(&spec);
        let opts = CreateContainerOptions { name, platform: None };
        match self.timed("create", self.docker.create_container(Some(opts), config)).await? {
            Ok(r) => Ok(r.id),
            Err(e) if server_status(&e) == Some(404) => Err(DockerError::ImageMissing(spec.image.into())),
            Err(e) => Err(DockerError::Create(server_message(&e))),
        }
    }

    /// Starts a container (already running is fine).
    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        match self.timed("start", self.docker.start_container(id, None::<StartContainerOptions<String>>)).await? {
            Ok(()) => Ok(()),
            Err(e) if server_status(&e) == Some(304) => Ok(()),
            Err(e) => Err(DockerError::Start(id.into(), server_message(&e))),
        }
    }

    /// Stops a container (already stopped or gone is fine).
    pub async fn stop(&self, id: &str) -> Result<(), DockerError> {
        let opts = StopContainerOptions { t: i64::from(self.stop_timeout_s) };
        let call = tokio::time::timeout(
            self.call_timeout + Duration::from_secs(u64::from(self.stop_timeout_s)),
            self.docker.stop_container(id, Some(opts)),
        )
        .await
        .map_err(|_| DockerError::Timeout("stop"))?;
        match call {
            Ok(()) => Ok(()),
            Err(BollardError::RequestTimeoutError) => Err(DockerError::Timeout("stop")),
            Err(e) if matches!(server_status(&e), Some(304) | Some(404)) => Ok(()),
            Err(e) => Err(DockerError::Stop(id.into(), server_message(&e))),
        }
    }

    /// Removes a container with its anonymous volumes, killing it if needed. Gone is fine.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let opts = RemoveContainerOptions { force: true, v: true, link: false };
        match self.timed("remove", self.docker.remove_container(id, Some(opts))).await? {
            Ok(()) => Ok(()),
            Err(e) if server_status(&e) == Some(404) => Ok(()),
            // 409: a removal already in progress (another instance, the reconciler, or an
            // earlier call of ours that timed out while the engine carried on): done only once
            // the container is gone, since its home volume cannot go before it.
            Err(e) if server_status(&e) == Some(409) && server_message(&e).contains("in progress") => {
                self.wait_gone(id).await
            }
            Err(e) => Err(DockerError::Remove(id.into(), server_message(&e))),
        }
    }

    /// Waits up to the call time-out for a container being removed to be gone.
    async fn wait_gone(&self, id: &str) -> Result<(), DockerError> {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        loop {
            if self.inspect(id).await?.is_none() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DockerError::Busy(format!("container {id} is still being removed")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Inspects a container; `None` if it does not exist.
    pub async fn inspect(&self, id: &str) -> Result<Option<Inspected>, DockerError> {
        let r = match self.timed("inspect", self.docker.inspect_container(id, None::<InspectContainerOptions>)).await? {
            Ok(r) => r,
            Err(e) if server_status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(DockerError::Inspect(id.into(), server_message(&e))),
        };
        let running = r.state.as_ref().and_then(|s| s.running).unwrap_or(false);
        let limits = r.host_config.as_ref().and_then(|h| {
            let memory_mb = u64::try_from(h.memory?).ok().filter(|m| *m > 0)? / (1024 * 1024);
            let cpus = h.nano_cpus.filter(|n| *n > 0)? as f64 / 1e9;
            let pids = u32::try_from(h.pids_limit?).ok().filter(|p| *p > 0)?;
            Some(Limits { memory_mb, cpus, pids })
        });
        let mut published = HashMap::new();
        let ports = r.network_settings.and_then(|n| n.ports).unwrap_or_default();
        for (key, binds) in ports {
            let Some(cport) = key.strip_suffix("/tcp").and_then(|p| p.parse::<u16>().ok()) else {
                continue;
            };
            for b in binds.unwrap_or_default() {
                let host_port = b.host_port.as_deref().and_then(|p| p.parse::<u16>().ok());
                let host_ip = b.host_ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok());
                if let (Some(port), Some(ip)) = (host_port, host_ip) {
                    // Prefer the configured upstream address if Docker lists several.
                    if ip == self.plan.upstream_host || !published.contains_key(&cport) {
                        published.insert(cport, SocketAddr::new(ip, port));
                    }
                }
            }
        }
        Ok(Some(Inspected { running, published, limits }))
    }

    /// The published upstream of each of the services, read back from a running container.
    pub async fn upstreams(
        &self,
        id: &str,
        services: &[(u16, Service)],
    ) -> Result<Vec<(u16, Service, SocketAddr)>, DockerError> {
        let Some(info) = self.inspect(id).await? else {
            return Err(DockerError::Inspect(id.into(), "container vanished".into()));
        };
        let mut out = vec![];
        for (port, service) in services {
            let Some(addr) = info.published.get(&container_port(*service)) else {
                return Err(DockerError::NoPublishedPort(id.into(), *service));
            };
            out.push((*port, *service, *addr));
        }
        Ok(out)
    }

    /// Every container of this deployment (running or not), by label.
    pub async fn list_managed(&self) -> Result<Vec<Managed>, DockerError> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_DEPLOYMENT}={}", self.plan.deployment),
            ],
        );
        let opts = ListContainersOptions::<String> { all: true, filters, ..Default::default() };
        let list = self
            .timed("list", self.docker.list_containers(Some(opts)))
            .await?
            .map_err(|e| DockerError::List(server_message(&e)))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let env_id = c.labels.as_ref()?.get(LABEL_ENV)?.clone();
                let host = c.labels.as_ref()?.get(LABEL_HOST).cloned();
                Some(Managed {
                    id: c.id?,
                    env_id,
                    host,
                    running: c.state.as_deref() == Some("running"),
                })
            })
            .collect())
    }
}
