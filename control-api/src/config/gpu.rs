//! The `[gpu]` section: how GPUs reach a workspace container and where the inventory comes
//! from (a discovery command, or a list of indexes for hosts without `nvidia-smi`).

use std::str::FromStr;

use serde::Deserialize;

/// The NVIDIA driver capabilities a device request may ask for besides `gpu` (what the
/// NVIDIA Container Toolkit mounts into the container: `compute` for CUDA, `utility` for
/// `nvidia-smi` and NVML, ...). `all` stands for every one.
pub const NVIDIA_CAPABILITIES: [&str; 7] = ["compute", "compat32", "graphics", "utility", "video", "display", "all"];

/// How GPUs reach a workspace container.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum GpuMode {
    /// `nvidia` where the engine has the NVIDIA runtime or hook, else `cdi` where the engine
    /// supports it (Docker 25+); refused at start when neither is usable and the host has GPUs.
    #[default]
    Auto,
    /// Docker device requests with driver `nvidia`, what `docker run --gpus device=...` sends
    /// (Docker 19.03+ with the NVIDIA Container Toolkit, whose hook mounts the devices and
    /// driver libraries when the container starts). Ids are UUIDs when known, else indexes.
    Nvidia,
    /// Docker device requests with CDI names `<kind>=<index>` (Docker Engine 25 or newer with a
    /// CDI spec, e.g. from `nvidia-ctk cdi generate`).
    Cdi,
    /// Map host device nodes (`node_path` with `{index}` replaced) into the container as
    /// `/dev/nvidia<index>`, and set `NVIDIA_VISIBLE_DEVICES`. Gives no driver libraries: for
    /// engines with neither the toolkit nor CDI, and images that bring their own.
    Nodes,
}

impl GpuMode {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            GpuMode::Auto => "auto",
            GpuMode::Nvidia => "nvidia",
            GpuMode::Cdi => "cdi",
            GpuMode::Nodes => "nodes",
        }
    }
}

impl FromStr for GpuMode {
    type Err = String;
    fn from_str(s: &str) -> Result<GpuMode, String> {
        match s.trim() {
            "auto" => Ok(GpuMode::Auto),
            "nvidia" => Ok(GpuMode::Nvidia),
            "cdi" => Ok(GpuMode::Cdi),
            "nodes" => Ok(GpuMode::Nodes),
            other => Err(format!("\"{other}\": expected auto, nvidia, cdi or nodes")),
        }
    }
}

/// The GPU inventory and how devices are passed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Device indexes this host offers, e.g. `[0, 1, 2, 3]`, for hosts without `nvidia-smi`.
    /// Empty: the inventory is discovered with `nvidia_smi` (none if it is not installed).
    pub devices: Vec<u32>,
    /// How devices are passed to containers.
    pub mode: GpuMode,
    /// CDI device kind (mode `cdi`): devices are requested as `<kind>=<index>`.
    pub kind: String,
    /// Host device node per GPU (mode `nodes`); `{index}` is replaced by the index.
    pub node_path: String,
    /// NVIDIA driver capabilities requested besides `gpu` (mode `nvidia`).
    pub capabilities: Vec<String>,
    /// The discovery command and its first arguments; gpugate appends
    /// `--query-gpu=index,uuid,name,memory.total --format=csv,noheader`. Run at start and on
    /// every reconcile pass when `devices` is empty. Empty: no discovery.
    pub nvidia_smi: Vec<String>,
    /// The utilisation command run inside a GPU workspace (gpugate appends
    /// `--query-gpu=uuid,utilization.gpu --format=csv,noheader,nounits`) for GPUs no API
    /// process samples on their own host: hosts without one, and hosts whose GPUs are listed
    /// by index. The host prober runs it. Empty: such GPUs are never sampled (never busy).
    pub workspace_nvidia_smi: Vec<String>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            devices: vec![],
            mode: GpuMode::Auto,
            kind: "nvidia.com/gpu".into(),
            node_path: "/dev/nvidia{index}".into(),
            capabilities: vec!["compute".into(), "utility".into()],
            nvidia_smi: vec!["nvidia-smi".into()],
            workspace_nvidia_smi: vec!["nvidia-smi".into()],
        }
    }
}

impl GpuConfig {
    /// Checks the section; the message names the field to fix.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        if let Some(d) = self.devices.iter().find(|d| !seen.insert(**d)) {
            return Err(format!("gpu.devices lists index {d} twice"));
        }
        if self.mode == GpuMode::Cdi && !self.kind.contains('/') {
            return Err(format!("gpu.kind \"{}\" is not a CDI kind (vendor/class)", self.kind));
        }
        if self.mode == GpuMode::Nodes && !self.node_path.contains("{index}") {
            return Err(format!("gpu.node_path \"{}\" lacks {{index}}", self.node_path));
        }
        if let Some(c) = self.capabilities.iter().find(|c| !NVIDIA_CAPABILITIES.contains(&c.as_str())) {
            return Err(format!(
                "gpu.capabilities: \"{c}\" is not an NVIDIA driver capability (expected some of {})",
                NVIDIA_CAPABILITIES.join(", ")
            ));
        }
        if self.nvidia_smi.first().is_some_and(|c| c.trim().is_empty()) {
            return Err("gpu.nvidia_smi: the command is empty (use [] to turn discovery off)".into());
        }
        if self.workspace_nvidia_smi.first().is_some_and(|c| c.trim().is_empty()) {
            return Err("gpu.workspace_nvidia_smi: the command is empty (use [] to turn sampling in workspaces off)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn modes_parse_and_bad_values_name_the_field() {
        assert_eq!("nvidia".parse::<GpuMode>(), Ok(GpuMode::Nvidia));
        assert!("gpus".parse::<GpuMode>().expect_err("refused").contains("auto, nvidia, cdi or nodes"));
        let cfg = Config::from_toml("[gpu]\nmode = \"nvidia\"\ncapabilities = [\"compute\", \"cuda\"]\n").expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("gpu.capabilities: \"cuda\""));
        let cfg = Config::from_toml("[gpu]\nnvidia_smi = [\"\"]\n").expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("gpu.nvidia_smi"));
        let cfg = Config::from_toml("[gpu]\ndevices = [1, 1]\n").expect("parses");
        assert!(cfg.validate().expect_err("refused").to_string().contains("index 1 twice"));
        assert!(Config::from_toml("[gpu]\nmode = \"vfio\"\n").is_err());
    }

    #[test]
    fn the_default_is_auto_with_compute_and_utility_and_discovery() {
        let g = GpuConfig::default();
        assert_eq!(g.mode, GpuMode::Auto);
        assert_eq!(g.capabilities, vec!["compute", "utility"]);
        assert_eq!(g.nvidia_smi, vec!["nvidia-smi"]);
    }
}
