//! The labels gpugate puts on every container and home volume it makes: how they are found
//! again (never by guessing names).

/// Label every gpugate container carries.
pub const LABEL_MANAGED: &str = "gpugate.managed";
/// Label naming the deployment (several deployments may share an engine).
pub const LABEL_DEPLOYMENT: &str = "gpugate.deployment";
/// Label naming the environment.
pub const LABEL_ENV: &str = "gpugate.env_id";
/// Label naming the fleet host that made the container or volume: an engine registered under
/// two names by mistake never has one name's reconciler remove the other's workspaces.
pub const LABEL_HOST: &str = "gpugate.host";
