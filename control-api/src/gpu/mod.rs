//! The GPUs of one GPU host: how its Docker engine passes devices to containers (the mode,
//! resolved and checked against the engine at start) and where its inventory comes from.
//!
//! Everything here is a value of one engine, [`GpuBackend`], held by that engine's
//! [`DockerClient`](crate::docker::DockerClient), which imports this module (never the other
//! way); nothing is global, so several hosts can each carry their own. The
//! decisions ([`resolve`], [`discover::parse`], [`utilization::parse`]) are pure and unit-tested.

pub mod discover;
pub mod utilization;

pub use discover::{Device, InventorySource};

use std::future::Future;

use crate::config::{Config, GpuConfig, GpuMode};

/// A GPU allocated to a workspace, as its container is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuRef {
    /// Its index on the host now.
    pub index: u32,
    /// Its UUID, when the inventory was discovered.
    pub uuid: Option<String>,
}

impl GpuRef {
    /// The id a device request names: the UUID when known (indexes can change across
    /// reboots and driver reloads), else the index.
    pub fn request_id(&self) -> String {
        self.uuid.clone().unwrap_or_else(|| self.index.to_string())
    }
}

/// How the allocated GPUs reach a container (the configured mode, resolved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DevicePassing {
    /// A device request with driver `nvidia`, ids (UUIDs when known, else indexes) and
    /// capabilities `gpu` + these; the NVIDIA Container Toolkit's hook does the rest.
    Nvidia { capabilities: Vec<String> },
    /// A device request with driver `cdi` and ids `<kind>=<index>`.
    Cdi { kind: String },
    /// Host device nodes (`node_path`, `{index}` replaced) mapped as `/dev/nvidia<index>`.
    Nodes { node_path: String },
}

impl DevicePassing {
    /// The passing a configuration names, unchecked (`auto` taken as `nvidia`): what a host
    /// without GPUs keeps, since it never passes any.
    pub fn configured(g: &GpuConfig) -> DevicePassing {
        match g.mode {
            GpuMode::Auto | GpuMode::Nvidia => DevicePassing::Nvidia { capabilities: g.capabilities.clone() },
            GpuMode::Cdi => DevicePassing::Cdi { kind: g.kind.clone() },
            GpuMode::Nodes => DevicePassing::Nodes { node_path: g.node_path.clone() },
        }
    }

    /// The mode's name.
    pub fn mode(&self) -> GpuMode {
        match self {
            DevicePassing::Nvidia { .. } => GpuMode::Nvidia,
            DevicePassing::Cdi { .. } => GpuMode::Cdi,
            DevicePassing::Nodes { .. } => GpuMode::Nodes,
        }
    }
}

/// Whether the engine has Docker's `nvidia` device driver (registered when dockerd finds
/// `nvidia-container-runtime-hook` on its `PATH`), as a trial container start told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverProbe {
    /// A container asking for it started (or failed later, for another reason).
    Present,
    /// The engine refused it; its message.
    Absent(String),
    /// Not tried, or the trial could not run (no image to try with); why.
    Unknown(String),
}

/// What the engine says about GPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineGpuFacts {
    /// The engine's version (`docker version`), e.g. `20.10.24+dfsg1`.
    pub version: String,
    /// `docker info` lists a runtime named `nvidia` (the NVIDIA Container Toolkit's).
    pub nvidia_runtime: bool,
    /// Whether the `nvidia` device driver is there.
    pub nvidia_driver: DriverProbe,
}

impl EngineGpuFacts {
    /// The engine's major version, when it parses.
    pub fn major(&self) -> Option<u32> {
        self.version.split('.').next()?.trim().parse().ok()
    }
}

/// Whether checking `mode` needs the trial container.
pub fn needs_driver_probe(mode: GpuMode) -> bool {
    matches!(mode, GpuMode::Auto | GpuMode::Nvidia)
}

/// Resolves the configured mode against the engine: the passing to use and warnings to log,
/// or the refusal to start, naming the fix.
pub fn resolve(g: &GpuConfig, facts: &EngineGpuFacts) -> Result<(DevicePassing, Vec<String>), String> {
    let version = if facts.version.is_empty() { "of unknown version" } else { facts.version.as_str() };
    let cdi_ok = facts.major().map(|m| m >= 25);
    let nvidia = DevicePassing::Nvidia { capabilities: g.capabilities.clone() };
    let mut warnings = vec![];
    match g.mode {
        GpuMode::Nodes => Ok((DevicePassing::configured(g), warnings)),
        GpuMode::Nvidia => match &facts.nvidia_driver {
            DriverProbe::Present => Ok((nvidia, warnings)),
            DriverProbe::Absent(why) => Err(format!(
                "gpu.mode = \"nvidia\", but the Docker engine {version} has no \"nvidia\" device driver ({why}): \
                 install the NVIDIA Container Toolkit on the Docker host (its nvidia-container-runtime-hook \
                 must be on dockerd's PATH) and restart dockerd, or set gpu.mode to \"cdi\" (Docker 25+ with a \
                 CDI spec) or \"nodes\""
            )),
            DriverProbe::Unknown(why) => {
                if !facts.nvidia_runtime {
                    warnings.push(format!(
                        "gpu.mode = \"nvidia\": could not check the engine's \"nvidia\" device driver ({why}); \
                         GPU workspaces fail to start if the NVIDIA Container Toolkit is missing"
                    ));
                }
                Ok((nvidia, warnings))
            }
        },
        GpuMode::Cdi => match cdi_ok {
            Some(true) => Ok((DevicePassing::configured(g), warnings)),
            Some(false) => Err(format!(
                "gpu.mode = \"cdi\", but CDI device requests need Docker Engine 25 or newer and this engine is \
                 {version}: upgrade Docker (and generate a CDI spec: nvidia-ctk cdi generate \
                 --output=/etc/cdi/nvidia.yaml), or set gpu.mode to \"nvidia\" (NVIDIA Container Toolkit) or \"nodes\""
            )),
            None => {
                warnings.push(format!("gpu.mode = \"cdi\": the engine's version \"{}\" does not parse; CDI needs 25+", facts.version));
                Ok((DevicePassing::configured(g), warnings))
            }
        },
        GpuMode::Auto => {
            let why = match &facts.nvidia_driver {
                DriverProbe::Present => return Ok((nvidia, warnings)),
                _ if facts.nvidia_runtime => return Ok((nvidia, warnings)),
                DriverProbe::Absent(why) | DriverProbe::Unknown(why) => why.clone(),
            };
            if cdi_ok == Some(true) {
                return Ok((DevicePassing::Cdi { kind: g.kind.clone() }, warnings));
            }
            Err(format!(
                "gpu.mode = \"auto\", but the Docker engine {version} offers neither the \"nvidia\" device driver \
                 ({why}) nor CDI (Docker Engine 25+): install the NVIDIA Container Toolkit on the Docker host \
                 and restart dockerd, or set gpu.mode = \"nodes\", or gpu.nvidia_smi = [] and no gpu.devices on \
                 a host without GPUs"
            ))
        }
    }
}

/// One engine's GPUs: how they are passed and where the inventory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuBackend {
    /// How devices reach containers on this engine.
    pub passing: DevicePassing,
    /// Where this host's inventory comes from.
    pub source: InventorySource,
}

impl GpuBackend {
    /// The backend of a configuration, unchecked (tests and hosts without GPUs).
    pub fn configured(g: &GpuConfig) -> GpuBackend {
        GpuBackend {
            passing: DevicePassing::configured(g),
            source: InventorySource::from_config(&g.devices, &g.nvidia_smi),
        }
    }
}

/// At start: reads the inventory and, when the host has GPUs (or a discovery command), checks
/// the configured mode against the engine's facts, which `engine_facts` asks for (with the
/// driver probe or without: `DockerClient::gpu_facts`). Returns the backend and the GPUs
/// found, or the refusal to start naming the fix.
pub async fn prepare<F>(cfg: &Config, engine_facts: impl FnOnce(bool) -> F) -> Result<(GpuBackend, Vec<Device>), String>
where
    F: Future<Output = EngineGpuFacts>,
{
    let g = &cfg.gpu;
    let mut backend = GpuBackend::configured(g);
    let devices = backend.source.read().await.map_err(|e| {
        format!(
            "GPU discovery: {e}; fix the command (gpu.nvidia_smi, GPUGATE_NVIDIA_SMI), or list the GPUs in \
             gpu.devices, or set gpu.nvidia_smi = [] on a host without GPUs"
        )
    })?;
    if devices.is_empty() && !backend.source.is_discovered() {
        // No GPUs: nothing is ever passed, so the engine need not support any mode.
        return Ok((backend, devices));
    }
    let facts = engine_facts(needs_driver_probe(g.mode)).await;
    let (passing, warnings) = resolve(g, &facts)?;
    for w in warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(
        mode = passing.mode().as_str(),
        configured = g.mode.as_str(),
        source = backend.source.describe(),
        gpus = devices.len(),
        engine = %facts.version,
        "GPU backend ready"
    );
    backend.passing = passing;
    Ok((backend, devices))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(version: &str, runtime: bool, driver: DriverProbe) -> EngineGpuFacts {
        EngineGpuFacts { version: version.into(), nvidia_runtime: runtime, nvidia_driver: driver }
    }

    fn cfg(mode: GpuMode) -> GpuConfig {
        GpuConfig { mode, ..GpuConfig::default() }
    }

    #[test]
    fn nvidia_needs_the_driver_and_names_the_toolkit_when_it_is_missing() {
        let ok = resolve(&cfg(GpuMode::Nvidia), &facts("20.10.24", false, DriverProbe::Present)).expect("usable");
        assert_eq!(ok.0, DevicePassing::Nvidia { capabilities: vec!["compute".into(), "utility".into()] });
        let absent = DriverProbe::Absent("could not select device driver \"nvidia\"".into());
        let e = resolve(&cfg(GpuMode::Nvidia), &facts("20.10.24", false, absent)).expect_err("refused");
        assert!(e.contains("NVIDIA Container Toolkit") && e.contains("could not select device driver"), "{e}");
        // Not checkable (no image to try): accepted, with a warning.
        let (p, w) = resolve(&cfg(GpuMode::Nvidia), &facts("24.0.7", false, DriverProbe::Unknown("no image".into()))).expect("accepted");
        assert_eq!(p.mode(), GpuMode::Nvidia);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn cdi_needs_engine_25() {
        let e = resolve(&cfg(GpuMode::Cdi), &facts("20.10.24+dfsg1", false, DriverProbe::Unknown("not tried".into())))
            .expect_err("refused");
        assert!(e.contains("Docker Engine 25 or newer") && e.contains("20.10.24+dfsg1"), "{e}");
        let (p, _) = resolve(&cfg(GpuMode::Cdi), &facts("27.3.1", false, DriverProbe::Unknown("not tried".into()))).expect("ok");
        assert_eq!(p, DevicePassing::Cdi { kind: "nvidia.com/gpu".into() });
    }

    #[test]
    fn auto_prefers_nvidia_then_cdi_and_refuses_neither() {
        let absent = || DriverProbe::Absent("could not select device driver".into());
        let nv = resolve(&cfg(GpuMode::Auto), &facts("20.10.24", false, DriverProbe::Present)).expect("ok").0;
        assert_eq!(nv.mode(), GpuMode::Nvidia);
        let rt = resolve(&cfg(GpuMode::Auto), &facts("20.10.24", true, DriverProbe::Unknown("x".into()))).expect("ok").0;
        assert_eq!(rt.mode(), GpuMode::Nvidia, "the NVIDIA runtime is advertised");
        let cdi = resolve(&cfg(GpuMode::Auto), &facts("26.1.0", false, absent())).expect("ok").0;
        assert_eq!(cdi.mode(), GpuMode::Cdi);
        let e = resolve(&cfg(GpuMode::Auto), &facts("20.10.24", false, absent())).expect_err("refused");
        assert!(e.contains("neither") && e.contains("gpu.mode = \"nodes\""), "{e}");
    }

    #[test]
    fn nodes_is_never_checked() {
        let (p, w) = resolve(&cfg(GpuMode::Nodes), &facts("", false, DriverProbe::Unknown("x".into()))).expect("ok");
        assert_eq!((p.mode(), w.len()), (GpuMode::Nodes, 0));
        assert!(!needs_driver_probe(GpuMode::Nodes) && needs_driver_probe(GpuMode::Auto));
    }
}
