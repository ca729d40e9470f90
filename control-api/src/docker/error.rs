//! What a Docker call can fail with, and the engine's answer read out of bollard's error.

use bollard::errors::Error as BollardError;
use gpugate_routes::Service;

/// A Docker failure, one variant per operation.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// Listing containers (or volumes) failed.
    #[error("list containers: {0}")]
    List(String),
    /// Creating or removing a home volume failed (removing one still in use, too).
    #[error("volume {0}: {1}")]
    Volume(String, String),
    /// The container lacks a published port for a service.
    #[error("container {0} publishes no host port for {1}")]
    NoPublishedPort(String, Service),
    /// Running a command inside a container failed (the engine's answer).
    #[error("exec in container {0}: {1}")]
    Exec(String, String),
    /// The workspace network is missing and cannot be made, or is not isolating.
    #[error("network {0}: {1}")]
    Network(String, String),
    /// A call took longer than the configured limit.
    #[error("Docker call {0} timed out")]
    Timeout(&'static str),
    /// The engine is still busy with an earlier request on the same object (a removal it
    /// carries on after its caller gave up, a volume its container still holds): nothing is
    /// wrong, the same call passes once that work is done.
    #[error("{0}")]
    Busy(String),
    /// The engine answering for a host is not the one recorded for it (the message names
    /// both): this process refuses to act for that host.
    #[error("{0}")]
    WrongEngine(String),
}

pub(super) fn server_status(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

pub(super) fn server_message(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
