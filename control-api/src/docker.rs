//! The one wrapper over bollard: workspace containers, their labels, ports and GPUs.
//!
//! Only this module talks to Docker. Containers are found by label (`gpugate.managed=true`,
//! `gpugate.deployment`, `gpugate.env_id`), never by guessing names.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bollard::container::{
    Config as ContainerConfig, CreateContainerOptions, InspectContainerOptions,
    ListContainersOptions, RemoveContainerOptions, StartContainerOptions, StopContainerOptions,
};
use bollard::errors::Error as BollardError;
use bollard::models::{DeviceMapping, DeviceRequest, HostConfig, PortBinding};
use bollard::Docker;
use gpugate_routes::Service;

use crate::config::{Config, GpuMode};

/// Label every gpugate container carries.
pub const LABEL_MANAGED: &str = "gpugate.managed";
/// Label naming the deployment (several deployments may share an engine).
pub const LABEL_DEPLOYMENT: &str = "gpugate.deployment";
/// Label naming the environment.
pub const LABEL_ENV: &str = "gpugate.env_id";

/// A Docker failure, one variant per operation.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The engine could not be reached or configured.
    #[error("cannot connect to Docker: {0}")]
    Connect(String),
    /// The image is not present locally (nothing is pulled).
    #[error("image \"{0}\" not found on the Docker host")]
    ImageMissing(String),
    /// Inspecting an image failed for another reason.
    #[error("inspect image \"{0}\": {1}")]
    InspectImage(String, String),
    /// Creating the container failed.
    #[error("create container: {0}")]
    Create(String),
    /// Starting the container failed.
    #[error("start container {0}: {1}")]
    Start(String, String),
    /// Stopping the container failed.
    #[error("stop container {0}: {1}")]
    Stop(String, String),
    /// Removing the container failed.
    #[error("remove container {0}: {1}")]
    Remove(String, String),
    /// Inspecting the container failed.
    #[error("inspect container {0}: {1}")]
    Inspect(String, String),
    /// Listing containers failed.
    #[error("list containers: {0}")]
    List(String),
    /// The container lacks a published port for a service.
    #[error("container {0} publishes no host port for {1}")]
    NoPublishedPort(String, Service),
    /// A call took longer than the configured limit.
    #[error("Docker call {0} timed out")]
    Timeout(&'static str),
}

/// The container port a service listens on inside a workspace.
pub fn container_port(service: Service) -> u16 {
    match service {
        Service::Ssh => 22,
        Service::Jupyter => 8888,
        Service::Code => 8080,
        Service::Rdp => 3389,
        Service::Other => 0,
    }
}

/// What a workspace container is made from.
pub struct WorkspaceSpec<'a> {
    pub env_id: &'a str,
    pub image: &'a str,
    pub services: &'a [(u16, Service)],
    pub gpus: &'a [u32],
    pub username: &'a str,
    pub password: &'a str,
    pub jupyter_token: &'a str,
    pub ssh_public_keys: &'a [String],
}

/// A managed container as listed by label.
#[derive(Debug, Clone)]
pub struct Managed {
    /// Container id.
    pub id: String,
    /// Its `gpugate.env_id` label.
    pub env_id: String,
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
}

/// How this deployment shapes its containers (pure: no Docker calls, unit-tested).
#[derive(Clone, Debug)]
pub struct Plan {
    deployment: String,
    upstream_host: IpAddr,
    gpu_mode: GpuMode,
    gpu_kind: String,
    gpu_node_path: String,
}

/// The Docker client of one deployment.
#[derive(Clone)]
pub struct DockerClient {
    docker: Docker,
    plan: Plan,
    stop_timeout_s: u32,
    call_timeout: Duration,
}

impl Plan {
    /// The plan of a configuration.
    pub fn from_config(cfg: &Config) -> Plan {
        Plan {
            deployment: cfg.deployment.clone(),
            upstream_host: cfg.upstream_host,
            gpu_mode: cfg.gpu.mode,
            gpu_kind: cfg.gpu.kind.clone(),
            gpu_node_path: cfg.gpu.node_path.clone(),
        }
    }

    /// The container name and configuration for a workspace.
    pub fn container(&self, spec: &WorkspaceSpec<'_>) -> (String, ContainerConfig<String>) {
        let mut labels = HashMap::new();
        labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
        labels.insert(LABEL_DEPLOYMENT.to_string(), self.deployment.clone());
        labels.insert(LABEL_ENV.to_string(), spec.env_id.to_string());

        let gpu_list = spec.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let mut env = vec![
            format!("GPUGATE_ENV_ID={}", spec.env_id),
            format!("GPUGATE_USER={}", spec.username),
            format!("GPUGATE_PASSWORD={}", spec.password),
            format!("JUPYTER_TOKEN={}", spec.jupyter_token),
            format!("GPUGATE_GPUS={gpu_list}"),
            format!("GPUGATE_SSH_PUBLIC_KEYS={}", spec.ssh_public_keys.join("\n")),
        ];
        for (port, service) in spec.services {
            env.push(format!("GPUGATE_{}_PORT={port}", service.as_str().to_ascii_uppercase()));
        }
        let mut exposed = HashMap::new();
        let mut bindings = HashMap::new();
        for (_, service) in spec.services {
            let key = format!("{}/tcp", container_port(*service));
            exposed.insert(key.clone(), HashMap::new());
            bindings.insert(
                key,
                Some(vec![PortBinding {
                    host_ip: Some(self.upstream_host.to_string()),
                    host_port: Some(String::new()),
                }]),
            );
        }
        let mut host = HostConfig { port_bindings: Some(bindings), ..Default::default() };
        if !spec.gpus.is_empty() {
            match self.gpu_mode {
                GpuMode::Cdi => {
                    host.device_requests = Some(vec![DeviceRequest {
                        driver: Some("cdi".into()),
                        device_ids: Some(
                            spec.gpus.iter().map(|g| format!("{}={g}", self.gpu_kind)).collect(),
                        ),
                        ..Default::default()
                    }]);
                }
                GpuMode::Nodes => {
                    env.push(format!("NVIDIA_VISIBLE_DEVICES={gpu_list}"));
                    host.devices = Some(
                        spec.gpus
                            .iter()
                            .map(|g| DeviceMapping {
                                path_on_host: Some(self.gpu_node_path.replace("{index}", &g.to_string())),
                                path_in_container: Some(format!("/dev/nvidia{g}")),
                                cgroup_permissions: Some("rwm".into()),
                            })
                            .collect(),
                    );
                }
            }
        }
        let config = ContainerConfig {
            image: Some(spec.image.to_string()),
            hostname: Some(spec.env_id.to_string()),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(exposed),
            host_config: Some(host),
            ..Default::default()
        };
        (format!("gpugate-{}-{}", self.deployment, spec.env_id), config)
    }
}

fn server_status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn server_message(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

impl DockerClient {
    /// Connects to the configured endpoint and negotiates the API version.
    pub async fn connect(cfg: &Config) -> Result<DockerClient, DockerError> {
        let timeout = cfg.docker.call_timeout_s.max(1);
        let ep = cfg.docker.endpoint.trim();
        let docker = if ep.is_empty() {
            Docker::connect_with_local_defaults()
        } else if let Some(path) = ep.strip_prefix("unix://") {
            Docker::connect_with_unix(path, timeout, bollard::API_DEFAULT_VERSION)
        } else if ep.starts_with("tcp://") || ep.starts_with("http://") {
            Docker::connect_with_http(ep, timeout, bollard::API_DEFAULT_VERSION)
        } else {
            return Err(DockerError::Connect(format!(
                "endpoint \"{ep}\" must start with unix://, tcp:// or http://"
            )));
        }
        .map_err(|e| DockerError::Connect(e.to_string()))?;
        let docker = docker.negotiate_version().await.map_err(|e| DockerError::Connect(e.to_string()))?;
        if cfg.gpu.mode == GpuMode::Cdi && !cfg.gpu.devices.is_empty() {
            // CDI device requests need Docker Engine 25 or newer; older engines refuse them
            // only when a container starts, so say it once now.
            if let Ok(v) = docker.version().await {
                let version = v.version.unwrap_or_default();
                let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
                if major < 25 {
                    tracing::warn!(
                        "Docker Engine {version} has no CDI support: GPU workspaces will fail to start; \
                         upgrade to 25+ or set gpu.mode = \"nodes\""
                    );
                }
            }
        }
        Ok(DockerClient {
            docker,
            plan: Plan::from_config(cfg),
            stop_timeout_s: cfg.docker.stop_timeout_s,
            call_timeout: Duration::from_secs(timeout),
        })
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, BollardError>>,
    ) -> Result<Result<T, BollardError>, DockerError> {
        tokio::time::timeout(self.call_timeout, fut).await.map_err(|_| DockerError::Timeout(op))
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
        let (name, config) = self.plan.container(spec);
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
            // 409: removal already in progress (another instance or the reconciler).
            Err(e) if server_status(&e) == Some(409) && server_message(&e).contains("in progress") => Ok(()),
            Err(e) => Err(DockerError::Remove(id.into(), server_message(&e))),
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
        Ok(Some(Inspected { running, published }))
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
                Some(Managed {
                    id: c.id?,
                    env_id,
                    running: c.state.as_deref() == Some("running"),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(gpus: &'a [u32], services: &'a [(u16, Service)]) -> WorkspaceSpec<'a> {
        WorkspaceSpec {
            env_id: "abc",
            image: "img",
            services,
            gpus,
            username: "u",
            password: "p",
            jupyter_token: "t",
            ssh_public_keys: &[],
        }
    }

    #[test]
    fn cdi_mode_requests_devices_by_cdi_name() {
        let mut cfg = Config::default();
        cfg.gpu.kind = "gpugate.test/gpu".into();
        let (name, c) = Plan::from_config(&cfg).container(&spec(&[0, 2], &[(20001, Service::Ssh)]));
        assert_eq!(name, "gpugate-default-abc");
        let host = c.host_config.expect("host config");
        let req = &host.device_requests.expect("device requests")[0];
        assert_eq!(req.driver.as_deref(), Some("cdi"));
        assert_eq!(req.device_ids.clone().expect("ids"), vec!["gpugate.test/gpu=0", "gpugate.test/gpu=2"]);
        assert!(host.devices.is_none());
        let env = c.env.expect("env");
        assert!(env.contains(&"GPUGATE_GPUS=0,2".to_string()) && env.contains(&"GPUGATE_SSH_PORT=20001".to_string()));
        let binds = host.port_bindings.expect("bindings");
        let b = &binds["22/tcp"].as_ref().expect("22")[0];
        assert_eq!((b.host_ip.as_deref(), b.host_port.as_deref()), (Some("127.0.0.1"), Some("")));
    }

    #[test]
    fn nodes_mode_maps_device_nodes_and_no_gpus_means_no_devices() {
        let mut cfg = Config::default();
        cfg.gpu.mode = GpuMode::Nodes;
        cfg.gpu.node_path = "/dev/fake{index}".into();
        let plan = Plan::from_config(&cfg);
        let (_, c) = plan.container(&spec(&[1], &[]));
        let host = c.host_config.expect("host config");
        let d = &host.devices.expect("devices")[0];
        assert_eq!(d.path_on_host.as_deref(), Some("/dev/fake1"));
        assert_eq!(d.path_in_container.as_deref(), Some("/dev/nvidia1"));
        assert!(c.env.expect("env").contains(&"NVIDIA_VISIBLE_DEVICES=1".to_string()));
        let (_, c) = plan.container(&spec(&[], &[]));
        let host = c.host_config.expect("host config");
        assert!(host.devices.is_none() && host.device_requests.is_none());
    }
}
