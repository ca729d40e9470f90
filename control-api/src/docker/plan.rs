//! How this deployment shapes a workspace container (pure: no Docker calls, unit-tested):
//! labels, environment, published ports, GPUs, the home volume mounted on the login user's
//! home, and the isolation every tenant gets: memory,
//! CPU and pids limits, all capabilities dropped but the few its sshd needs,
//! no-new-privileges, a restart policy, and the deployment's bridge network on which
//! workspaces cannot reach each other.

use std::collections::HashMap;
use std::net::IpAddr;

use bollard::container::Config as ContainerConfig;
use bollard::models::{
    DeviceMapping, DeviceRequest, HostConfig, Mount, MountTypeEnum, PortBinding, ResourcesUlimits,
    RestartPolicy, RestartPolicyNameEnum,
};
use gpugate_routes::Service;

use super::labels::{LABEL_DEPLOYMENT, LABEL_ENV, LABEL_HOST, LABEL_MANAGED};
use crate::config::Config;
use crate::gpu::{DevicePassing, GpuRef};

/// The capabilities a workspace keeps; every other one (NET_RAW, MKNOD, SYS_ADMIN, ...) is
/// dropped. This is what an OpenSSH or dropbear server needs to log a user in and run their
/// session: change file owners and modes of the session's files (CHOWN, DAC_OVERRIDE,
/// FOWNER), switch to the user (SETUID, SETGID), bind port 22 (NET_BIND_SERVICE), chroot its
/// privilege-separated child (SYS_CHROOT), signal the session's processes (KILL) and write
/// the login audit record (AUDIT_WRITE).
pub const WORKSPACE_CAPABILITIES: [&str; 9] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETUID",
    "SETGID",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

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

/// The login user's home inside a workspace, where its volume is mounted: what the workspace
/// image's `useradd` makes (`/home/<user>`).
pub fn home_dir(username: &str) -> String {
    format!("/home/{username}")
}

/// Resource limits of one workspace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Memory in MiB, swap included.
    pub memory_mb: u64,
    /// CPU cores.
    pub cpus: f64,
    /// Processes and threads.
    pub pids: u32,
}

/// What a workspace container is made from.
pub struct WorkspaceSpec<'a> {
    pub env_id: &'a str,
    pub image: &'a str,
    pub services: &'a [(u16, Service)],
    pub gpus: &'a [GpuRef],
    pub username: &'a str,
    pub password: &'a str,
    pub jupyter_token: &'a str,
    pub ssh_public_keys: &'a [String],
    /// The workspace's SSH host key (OpenSSH private key) and its certificate; empty: the
    /// image makes keys of its own.
    pub ssh_host_key: &'a str,
    pub ssh_host_cert: &'a str,
    /// The owner's account keys and password setting as the container starts with them.
    pub account: &'a AccountLogin,
    pub limits: Limits,
}

/// The owner's account keys at one generation, and whether the password logs in over SSH;
/// later changes reach the running container by `crate::key_sync`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountLogin {
    pub generation: i64,
    pub keys: Vec<String>,
    pub password_login: bool,
}

impl AccountLogin {
    /// How the image's `GPUGATE_PASSWORD_LOGIN` and `gpugate-account-keys` spell the switch.
    pub fn password_word(&self) -> &'static str {
        if self.password_login {
            "yes"
        } else {
            "no"
        }
    }
}

/// How this deployment shapes its containers.
#[derive(Clone, Debug)]
pub struct Plan {
    pub(super) deployment: String,
    /// The fleet host this engine is (the `gpugate.host` label).
    pub(super) host: String,
    pub(super) network: String,
    pub(super) upstream_host: IpAddr,
    /// `RLIMIT_NOFILE` of every workspace (soft and hard).
    pub(super) open_files: u64,
    /// How GPUs reach this engine's containers (resolved against the engine at start).
    pub(super) gpu: DevicePassing,
}

impl Plan {
    /// The plan of a configuration.
    pub fn from_config(cfg: &Config) -> Plan {
        Plan {
            deployment: cfg.deployment.clone(),
            host: cfg.fleet.host_name.clone(),
            network: cfg.network(),
            upstream_host: cfg.upstream_host,
            open_files: cfg.docker.limits.open_files,
            gpu: DevicePassing::configured(&cfg.gpu),
        }
    }

    /// The name of an environment's home volume: per deployment and environment, so that
    /// deployments sharing an engine never share one.
    pub fn volume_name(&self, env_id: &str) -> String {
        format!("gpugate-{}-{env_id}-home", self.deployment)
    }

    /// The container name and configuration for a workspace.
    pub fn container(&self, spec: &WorkspaceSpec<'_>) -> (String, ContainerConfig<String>) {
        let mut labels = HashMap::new();
        labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
        labels.insert(LABEL_DEPLOYMENT.to_string(), self.deployment.clone());
        labels.insert(LABEL_ENV.to_string(), spec.env_id.to_string());
        labels.insert(LABEL_HOST.to_string(), self.host.clone());

        let gpu_list = spec.gpus.iter().map(|g| g.index.to_string()).collect::<Vec<_>>().join(",");
        let mut env = vec![
            format!("GPUGATE_ENV_ID={}", spec.env_id),
            format!("GPUGATE_USER={}", spec.username),
            format!("GPUGATE_PASSWORD={}", spec.password),
            format!("JUPYTER_TOKEN={}", spec.jupyter_token),
            format!("GPUGATE_GPUS={gpu_list}"),
            format!("GPUGATE_SSH_PUBLIC_KEYS={}", spec.ssh_public_keys.join("\n")),
            format!("GPUGATE_ACCOUNT_KEYS={}", spec.account.keys.join("\n")),
            format!("GPUGATE_ACCOUNT_KEYS_GENERATION={}", spec.account.generation),
            format!("GPUGATE_PASSWORD_LOGIN={}", spec.account.password_word()),
        ];
        if !spec.ssh_host_key.is_empty() {
            env.push(format!("GPUGATE_SSH_HOST_KEY={}", spec.ssh_host_key));
            env.push(format!("GPUGATE_SSH_HOST_CERT={}", spec.ssh_host_cert));
        }
        // The public pool port of each service that has one (a service reached by name only
        // has none), and which services to run: all of them, by port or by name (the image
        // would otherwise run only those with a port).
        for (port, service) in spec.services.iter().filter(|(p, _)| *p != 0) {
            env.push(format!("GPUGATE_{}_PORT={port}", service.as_str().to_ascii_uppercase()));
        }
        let run: Vec<&str> = spec.services.iter().map(|(_, s)| s.as_str()).collect();
        env.push(format!("GPUGATE_SERVICES={}", run.join(" ")));
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
        let memory = i64::try_from(spec.limits.memory_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
        let mut host = HostConfig {
            port_bindings: Some(bindings),
            memory: Some(memory),
            // Equal to the memory limit: no swap beyond it, so a process past the limit is
            // killed instead of pushing the host into swap.
            memory_swap: Some(memory),
            nano_cpus: Some((spec.limits.cpus * 1e9).round() as i64),
            pids_limit: Some(i64::from(spec.limits.pids)),
            ulimits: (self.open_files > 0).then(|| {
                vec![ResourcesUlimits {
                    name: Some("nofile".into()),
                    soft: i64::try_from(self.open_files).ok(),
                    hard: i64::try_from(self.open_files).ok(),
                }]
            }),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(WORKSPACE_CAPABILITIES.iter().map(|c| c.to_string()).collect()),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            // Back after a Docker daemon restart or a crash; a workspace the user stopped
            // stays stopped.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            network_mode: Some(self.network.clone()),
            // The user's files live in the environment's volume: they survive a stop and start
            // (which re-creates the container) and go only with a delete.
            mounts: Some(vec![Mount {
                target: Some(home_dir(spec.username)),
                source: Some(self.volume_name(spec.env_id)),
                typ: Some(MountTypeEnum::VOLUME),
                read_only: Some(false),
                ..Default::default()
            }]),
            ..Default::default()
        };
        if spec.gpus.is_empty() {
            // No GPU: none visible either. On a host whose default runtime is nvidia, an
            // image's own `ENV NVIDIA_VISIBLE_DEVICES=all` (CUDA base images set it) would
            // otherwise expose every GPU of the host, other tenants' included; `void` tells
            // the toolkit to pass none (no device request, no device node either).
            env.push("NVIDIA_VISIBLE_DEVICES=void".to_string());
        } else {
            match &self.gpu {
                DevicePassing::Nvidia { capabilities } => {
                    // What `docker run --gpus device=...` sends. Docker sets
                    // NVIDIA_VISIBLE_DEVICES (and NVIDIA_DRIVER_CAPABILITIES) from it and runs
                    // the toolkit's hook, which mounts the devices and driver libraries.
                    let mut caps = vec!["gpu".to_string()];
                    caps.extend(capabilities.iter().cloned());
                    host.device_requests = Some(vec![DeviceRequest {
                        driver: Some("nvidia".into()),
                        device_ids: Some(spec.gpus.iter().map(GpuRef::request_id).collect()),
                        capabilities: Some(vec![caps]),
                        ..Default::default()
                    }]);
                }
                DevicePassing::Cdi { kind } => {
                    host.device_requests = Some(vec![DeviceRequest {
                        driver: Some("cdi".into()),
                        device_ids: Some(spec.gpus.iter().map(|g| format!("{kind}={}", g.index)).collect()),
                        ..Default::default()
                    }]);
                }
                DevicePassing::Nodes { node_path } => {
                    env.push(format!("NVIDIA_VISIBLE_DEVICES={gpu_list}"));
                    host.devices = Some(
                        spec.gpus
                            .iter()
                            .map(|g| DeviceMapping {
                                path_on_host: Some(node_path.replace("{index}", &g.index.to_string())),
                                path_in_container: Some(format!("/dev/nvidia{}", g.index)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::RestartPolicyNameEnum;

    fn refs(ix: &[u32]) -> Vec<GpuRef> {
        ix.iter().map(|i| GpuRef { index: *i, uuid: None }).collect()
    }

    static ACCOUNT: AccountLogin = AccountLogin { generation: 7, keys: Vec::new(), password_login: false };

    fn spec<'a>(gpus: &'a [GpuRef], services: &'a [(u16, Service)]) -> WorkspaceSpec<'a> {
        WorkspaceSpec {
            env_id: "abc",
            image: "img",
            services,
            gpus,
            username: "u",
            password: "p",
            jupyter_token: "t",
            ssh_public_keys: &[],
            ssh_host_key: "",
            ssh_host_cert: "",
            account: &ACCOUNT,
            limits: Limits { memory_mb: 512, cpus: 1.5, pids: 100 },
        }
    }

    #[test]
    fn cdi_mode_requests_devices_by_cdi_name() {
        let mut cfg = Config::default();
        cfg.gpu.mode = crate::config::GpuMode::Cdi;
        cfg.gpu.kind = "gpugate.test/gpu".into();
        let (name, c) = Plan::from_config(&cfg).container(&spec(&refs(&[0, 2]), &[(20001, Service::Ssh)]));
        assert_eq!(name, "gpugate-default-abc");
        let host = c.host_config.expect("host config");
        let req = &host.device_requests.expect("device requests")[0];
        assert_eq!(req.driver.as_deref(), Some("cdi"));
        assert_eq!(req.device_ids.clone().expect("ids"), vec!["gpugate.test/gpu=0", "gpugate.test/gpu=2"]);
        assert!(host.devices.is_none());
        let env = c.env.expect("env");
        assert!(env.contains(&"GPUGATE_GPUS=0,2".to_string()) && env.contains(&"GPUGATE_SSH_PORT=20001".to_string()));
        // The owner's account keys as of their generation, and password login as settled.
        assert!(env.contains(&"GPUGATE_ACCOUNT_KEYS_GENERATION=7".to_string()), "{env:?}");
        assert!(env.contains(&"GPUGATE_PASSWORD_LOGIN=no".to_string()), "{env:?}");
        let binds = host.port_bindings.expect("bindings");
        let b = &binds["22/tcp"].as_ref().expect("22")[0];
        assert_eq!((b.host_ip.as_deref(), b.host_port.as_deref()), (Some("127.0.0.1"), Some("")));
    }

    #[test]
    fn a_service_reached_by_name_only_is_run_and_published_without_a_pool_port() {
        let cfg = Config::default();
        let services = [(20001, Service::Ssh), (0, Service::Jupyter)];
        let (_, c) = Plan::from_config(&cfg).container(&spec(&[], &services));
        let env = c.env.expect("env");
        assert!(env.contains(&"GPUGATE_SERVICES=ssh jupyter".to_string()), "{env:?}");
        assert!(env.contains(&"GPUGATE_SSH_PORT=20001".to_string()));
        assert!(!env.iter().any(|e| e.starts_with("GPUGATE_JUPYTER_PORT")), "no port to show: {env:?}");
        let binds = c.host_config.expect("host config").port_bindings.expect("bindings");
        assert!(binds.contains_key("8888/tcp"), "Jupyter is published for the gateway: {binds:?}");
    }

    #[test]
    fn nvidia_mode_requests_the_nvidia_driver_by_uuid_with_capabilities() {
        let cfg = Config::default();
        let gpus = vec![
            GpuRef { index: 2, uuid: Some("GPU-bbbb".into()) },
            GpuRef { index: 0, uuid: None },
        ];
        let (_, c) = Plan::from_config(&cfg).container(&spec(&gpus, &[]));
        let host = c.host_config.expect("host config");
        let req = &host.device_requests.expect("device requests")[0];
        assert_eq!(req.driver.as_deref(), Some("nvidia"));
        assert_eq!(req.device_ids.clone().expect("ids"), vec!["GPU-bbbb", "0"], "UUID when known, else index");
        assert_eq!(req.capabilities, Some(vec![vec!["gpu".to_string(), "compute".into(), "utility".into()]]));
        assert_eq!(req.count, None, "Docker refuses a count beside device ids");
        assert!(host.devices.is_none());
        let env = c.env.expect("env");
        assert!(env.contains(&"GPUGATE_GPUS=2,0".to_string()), "{env:?}");
        assert!(!env.iter().any(|e| e.starts_with("NVIDIA_VISIBLE_DEVICES")), "Docker sets it from the request: {env:?}");
    }

    #[test]
    fn nodes_mode_maps_device_nodes_and_no_gpus_means_no_devices() {
        let mut cfg = Config::default();
        cfg.gpu.mode = crate::config::GpuMode::Nodes;
        cfg.gpu.node_path = "/dev/fake{index}".into();
        let plan = Plan::from_config(&cfg);
        let (_, c) = plan.container(&spec(&refs(&[1]), &[]));
        let host = c.host_config.expect("host config");
        let d = &host.devices.expect("devices")[0];
        assert_eq!(d.path_on_host.as_deref(), Some("/dev/fake1"));
        assert_eq!(d.path_in_container.as_deref(), Some("/dev/nvidia1"));
        assert!(c.env.expect("env").contains(&"NVIDIA_VISIBLE_DEVICES=1".to_string()));
        let (_, c) = plan.container(&spec(&[], &[]));
        let host = c.host_config.expect("host config");
        assert!(host.devices.is_none() && host.device_requests.is_none());
    }

    #[test]
    fn a_workspace_without_gpus_sees_none_in_every_mode() {
        for mode in [crate::config::GpuMode::Nvidia, crate::config::GpuMode::Cdi, crate::config::GpuMode::Nodes] {
            let mut cfg = Config::default();
            cfg.gpu.mode = mode;
            let (_, c) = Plan::from_config(&cfg).container(&spec(&[], &[(20001, Service::Ssh)]));
            let env = c.env.expect("env");
            // Set by the container config, it overrides an image's ENV NVIDIA_VISIBLE_DEVICES=all.
            assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=void".to_string()), "{mode:?}: {env:?}");
            let host = c.host_config.expect("host config");
            assert!(host.devices.is_none() && host.device_requests.is_none(), "{mode:?}");
        }
        // With GPUs, the nvidia mode leaves the variable to Docker (set from the request).
        let (_, c) = Plan::from_config(&Config::default()).container(&spec(&refs(&[0]), &[]));
        assert!(!c.env.expect("env").iter().any(|e| e == "NVIDIA_VISIBLE_DEVICES=void"));
    }

    #[test]
    fn every_workspace_is_limited_confined_and_on_the_deployment_network() {
        let cfg = Config { deployment: "prod".into(), ..Config::default() };
        let (_, c) = Plan::from_config(&cfg).container(&spec(&[], &[(20001, Service::Ssh)]));
        let host = c.host_config.expect("host config");
        assert_eq!(host.memory, Some(512 * 1024 * 1024));
        assert_eq!(host.memory_swap, host.memory, "no swap beyond the memory limit");
        assert_eq!(host.nano_cpus, Some(1_500_000_000));
        assert_eq!(host.pids_limit, Some(100));
        let nofile = host.ulimits.as_deref().unwrap_or_default();
        assert_eq!(nofile.len(), 1, "{nofile:?}");
        assert_eq!((nofile[0].name.as_deref(), nofile[0].soft, nofile[0].hard), (Some("nofile"), Some(16384), Some(16384)));
        let mut daemons = Config::default();
        daemons.docker.limits.open_files = 0;
        let (_, c0) = Plan::from_config(&daemons).container(&spec(&[], &[(20001, Service::Ssh)]));
        assert!(c0.host_config.expect("host config").ulimits.is_none(), "0 leaves open files to the daemon");
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_string()]));
        let added = host.cap_add.expect("cap_add");
        assert!(!added.iter().any(|c| c == "NET_RAW" || c == "SYS_ADMIN" || c == "MKNOD"), "{added:?}");
        assert_eq!(host.security_opt, Some(vec!["no-new-privileges:true".to_string()]));
        assert_eq!(host.restart_policy.and_then(|r| r.name), Some(RestartPolicyNameEnum::UNLESS_STOPPED));
        assert_eq!(host.network_mode.as_deref(), Some("gpugate-prod"));
    }

    #[test]
    fn the_home_volume_of_the_environment_is_mounted_on_the_users_home() {
        let cfg = Config { deployment: "prod".into(), ..Config::default() };
        let plan = Plan::from_config(&cfg);
        let (_, c) = plan.container(&spec(&[], &[(20001, Service::Ssh)]));
        let mounts = c.host_config.expect("host config").mounts.expect("mounts");
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        let m = &mounts[0];
        assert_eq!(m.typ, Some(MountTypeEnum::VOLUME));
        assert_eq!(m.source.as_deref(), Some("gpugate-prod-abc-home"));
        assert_eq!(m.target.as_deref(), Some("/home/u"));
        assert_ne!(m.read_only, Some(true));
        // Another deployment on the same engine names another volume.
        let other = Plan::from_config(&Config { deployment: "dev".into(), ..Config::default() });
        assert_ne!(other.volume_name("abc"), plan.volume_name("abc"));
    }
}
