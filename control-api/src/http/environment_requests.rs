//! What clients send to `/api/v1/environments`: request bodies and query parameters, each
//! checked as it is read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::AccessMode;
use crate::error::ApiError;

/// Body of `POST /api/v1/environments`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "train", "gpus": 1, "services": ["ssh", "jupyter"]}))]
pub struct CreateEnvironment {
    /// Display name, 1 to 64 characters (no control, bidirectional or zero-width characters).
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    /// Image (must be present on the Docker host and on the deployment's allow-list);
    /// default from configuration.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 255)]
    pub image: Option<String>,
    /// Number of GPUs (default 0; at most what the host has).
    #[serde(default)]
    pub gpus: Option<u32>,
    /// Part of the GPU model name the GPUs must have, e.g. `"A100"` (case-insensitive).
    /// Absent from the idempotency digest when not given, like before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 128)]
    pub gpu_model: Option<String>,
    /// Services, each at most once; default from configuration.
    #[serde(default)]
    #[schema(value_type = Option<Vec<ServiceName>>, min_items = 1, max_items = 4)]
    pub services: Option<Vec<String>>,
    /// OpenSSH public keys to authorise (single-line, at most 32).
    #[serde(default)]
    #[schema(max_items = 32)]
    pub ssh_public_keys: Option<Vec<String>>,
    /// Memory limit in MiB, at least 32 (default and maximum: `docker.limits`).
    #[serde(default)]
    #[schema(minimum = 32)]
    pub memory_mb: Option<u64>,
    /// CPU limit in cores, at least 0.01 (default and maximum: `docker.limits`).
    #[serde(default)]
    #[schema(minimum = 0.01)]
    pub cpus: Option<f64>,
    /// Process (pids) limit, at least 16 (default and maximum: `docker.limits`).
    #[serde(default)]
    #[schema(minimum = 16)]
    pub pids: Option<u32>,
    /// Seconds without activity after which the workspace is stopped (0: never), at most 30
    /// days; default and maximum from configuration (`idle`).
    #[serde(default)]
    #[schema(maximum = 2592000)]
    pub idle_stop_after_s: Option<u64>,
    /// How each service is reached: `ports` (a pool port), `hostname` (its name on the
    /// gateway's TLS port, no pool port) or `both`; services left out take the deployment's
    /// default (`[names]`). Names need the gateway's TLS port configured; RDP is by port only.
    /// Absent from the idempotency digest when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BTreeMap<String, AccessMode>>)]
    pub access: Option<BTreeMap<String, AccessMode>>,
    /// When to answer: `routes` (default) or `ready` (also `?wait=`). Not part of what the
    /// request asks for, so not of its idempotency digest: a retry may wait differently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Wait>,
}

/// When a create or start answers.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Wait {
    /// Once the routes are live in the route table (or the route wait passed): the services
    /// inside may still be starting; `ready` in the answer says.
    #[default]
    Routes,
    /// Once every service answered like itself or its readiness deadline passed; the answer
    /// shows each service's readiness either way.
    Ready,
}

// By hand, not derived: a derived enum makes serde_json call a number or object where the name
// belongs a syntax error (400, "expected value"); it is a well-formed body with a bad value (422).
impl<'de> Deserialize<'de> for Wait {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, Unexpected};
        let name = String::deserialize(d)?;
        match name.as_str() {
            "routes" => Ok(Wait::Routes),
            "ready" => Ok(Wait::Ready),
            other => Err(D::Error::invalid_value(Unexpected::Str(other), &"\"routes\" or \"ready\"")),
        }
    }
}

/// Query of create and start: `?wait=ready`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// When to answer: `routes` (default) or `ready` (see the environment's `readiness`).
    #[serde(default)]
    pub wait: Option<Wait>,
}

/// Optional body of `POST /api/v1/environments/{id}/start`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartEnvironment {
    /// When to answer: `routes` (default) or `ready`.
    #[serde(default)]
    pub wait: Option<Wait>,
}

/// The one `wait` of a request that may name it in its query and its body.
pub(super) fn wait_of(query: Option<Wait>, body: Option<Wait>) -> Result<Wait, ApiError> {
    match (query, body) {
        (Some(q), Some(b)) if q != b => {
            Err(ApiError::Validation("wait is given in the query and the body with different values".into()))
        }
        (q, b) => Ok(q.or(b).unwrap_or_default()),
    }
}

/// A service a workspace can offer (each needs a port pool in the deployment).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ServiceName {
    /// OpenSSH.
    Ssh,
    /// JupyterLab.
    Jupyter,
    /// code-server.
    Code,
    /// Remote desktop.
    Rdp,
}

/// Body of `PATCH /api/v1/environments/{id}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchEnvironment {
    /// New idle limit in seconds (0: never, where the deployment allows it), at most 30 days
    /// and the deployment's maximum.
    #[schema(maximum = 2592000)]
    pub idle_stop_after_s: u64,
}
