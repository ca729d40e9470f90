//! The per-environment home volumes: a named Docker volume per workspace, labelled like its
//! containers, made before the first container, kept across stop and start, removed after
//! the container on delete. Found by label, never by name guessing.

use std::collections::HashMap;

use bollard::volume::{CreateVolumeOptions, ListVolumesOptions, RemoveVolumeOptions};

use super::client::DockerClient;
use super::error::{server_message, server_status, DockerError};
use super::labels::{LABEL_DEPLOYMENT, LABEL_ENV, LABEL_HOST, LABEL_MANAGED};

/// A managed volume as listed by label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedVolume {
    /// Volume name.
    pub name: String,
    /// Its `gpugate.env_id` label.
    pub env_id: String,
    /// Its `gpugate.host` label (none on volumes made before fleets).
    pub host: Option<String>,
}

impl DockerClient {
    /// The name of an environment's home volume.
    pub fn volume_name(&self, env_id: &str) -> String {
        self.plan.volume_name(env_id)
    }

    /// Makes sure the environment's home volume exists (an existing one is kept as it is, with
    /// its files); returns its name.
    pub async fn ensure_volume(&self, env_id: &str) -> Result<String, DockerError> {
        let name = self.volume_name(env_id);
        let mut labels = HashMap::new();
        labels.insert(LABEL_MANAGED.to_string(), "true".to_string());
        labels.insert(LABEL_DEPLOYMENT.to_string(), self.plan.deployment.clone());
        labels.insert(LABEL_ENV.to_string(), env_id.to_string());
        labels.insert(LABEL_HOST.to_string(), self.plan.host.clone());
        let opts = CreateVolumeOptions { name: name.clone(), driver: "local".to_string(), labels, ..Default::default() };
        // Creating a volume that exists answers with the existing one.
        match self.timed("create volume", self.docker.create_volume(opts)).await? {
            Ok(_) => Ok(name),
            Err(e) => Err(DockerError::Volume(name, server_message(&e))),
        }
    }

    /// Removes the environment's home volume (gone is fine). Its containers must be removed
    /// first: Docker refuses to remove a volume in use.
    pub async fn remove_volume(&self, env_id: &str) -> Result<(), DockerError> {
        self.remove_volume_named(&self.volume_name(env_id)).await
    }

    /// Removes a volume by name (gone is fine).
    pub async fn remove_volume_named(&self, name: &str) -> Result<(), DockerError> {
        let opts = RemoveVolumeOptions { force: false };
        match self.timed("remove volume", self.docker.remove_volume(name, Some(opts))).await? {
            Ok(()) => Ok(()),
            Err(e) if server_status(&e) == Some(404) => Ok(()),
            // 409: a container still holds it (one whose removal the engine has not finished).
            Err(e) if server_status(&e) == Some(409) => {
                Err(DockerError::Busy(format!("volume {name} is still in use: {}", server_message(&e))))
            }
            Err(e) => Err(DockerError::Volume(name.into(), server_message(&e))),
        }
    }

    /// Every volume of this deployment, by label.
    pub async fn list_volumes(&self) -> Result<Vec<ManagedVolume>, DockerError> {
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_DEPLOYMENT}={}", self.plan.deployment)],
        );
        let list = self
            .timed("list volumes", self.docker.list_volumes(Some(ListVolumesOptions { filters })))
            .await?
            .map_err(|e| DockerError::List(format!("volumes: {}", server_message(&e))))?;
        Ok(list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| {
                let host = v.labels.get(LABEL_HOST).cloned();
                Some(ManagedVolume { env_id: v.labels.get(LABEL_ENV)?.clone(), host, name: v.name })
            })
            .collect())
    }
}
