//! The one wrapper over bollard: workspace containers, their labels, ports and GPUs.
//!
//! Only this module talks to Docker. Containers and home volumes are found by label
//! (`gpugate.managed=true`, `gpugate.deployment`, `gpugate.env_id`), never by guessing names.
//! The client (`client.rs`) with its volumes (`volume.rs`) and commands (`exec.rs`) builds
//! containers from the deployment's plan (`plan.rs`); its errors are in `error.rs`, the
//! labels in `labels.rs`. This file only names what the rest of the crate uses.

mod client;
mod error;
mod exec;
mod labels;
mod plan;
mod volume;

pub use client::{DockerClient, Endpoint, Inspected, Managed};
pub use error::DockerError;
pub use exec::ExecOutput;
pub use labels::{LABEL_DEPLOYMENT, LABEL_ENV, LABEL_HOST, LABEL_MANAGED};
pub use plan::{container_port, AccountLogin, Limits, Plan, WorkspaceSpec, WORKSPACE_CAPABILITIES};
pub use volume::ManagedVolume;
