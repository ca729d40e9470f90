//! Create requests and their validation: every bad field is a 422 naming it, before anything
//! changes.

use gpugate_routes::Service;

use crate::config::{image_allowed, pool_service, AccessMode, MIN_CPUS, MIN_MEMORY_MB, MIN_PIDS};
use crate::docker::Limits;
use crate::error::ApiError;
use crate::state::State;

/// A create request (validated by [`validate`]).
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// The new environment's id, drawn before the operation starts (it names the operation).
    pub id: String,
    /// `Idempotency-Key` and the digest of the request it came with.
    pub idempotency: Option<IdempotencyKey>,
    pub name: String,
    pub image: Option<String>,
    pub gpus: u32,
    /// Part of the GPU model name the GPUs must have (e.g. `A100`, case-insensitive).
    pub gpu_model: Option<String>,
    pub services: Option<Vec<String>>,
    pub ssh_public_keys: Vec<String>,
    /// Memory limit in MiB (default and maximum from configuration).
    pub memory_mb: Option<u64>,
    /// CPU limit in cores.
    pub cpus: Option<f64>,
    /// Process limit.
    pub pids: Option<u32>,
    /// Seconds of inactivity after which the workspace stops (default from configuration).
    pub idle_stop_after_s: Option<u64>,
    /// How each service is reached (`ports`, `hostname`, `both`); default from `[names]`.
    pub access: Option<std::collections::BTreeMap<String, crate::config::AccessMode>>,
}

/// An `Idempotency-Key` header value and the digest of its request.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    /// The key, 1 to 255 printable ASCII characters.
    pub key: String,
    /// SHA-256 of the request body's fields.
    pub request: Vec<u8>,
}

/// A create request that passed validation.
#[derive(Debug)]
pub struct Valid {
    /// The image to run (allowed and well formed; presence is checked apart).
    pub image: String,
    /// The services, in request order.
    pub services: Vec<Service>,
    /// How each service (same order) is reached.
    pub access: Vec<AccessMode>,
    /// The workspace's resource limits.
    pub limits: Limits,
    /// Seconds of inactivity after which it is stopped (0: never).
    pub idle_stop_after_s: u64,
}

/// Characters a name may not hold although they print as nothing or reorder what follows:
/// controls, bidirectional overrides and isolates, zero-width characters, soft hyphen, line
/// and paragraph separators, interlinear annotation marks.
fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// The resource limits a request asks for, each between its floor and the configured maximum.
fn limits(st: &State, spec: &CreateSpec) -> Result<Limits, ApiError> {
    let l = &st.cfg.docker.limits;
    let memory_mb = spec.memory_mb.unwrap_or(l.memory_mb);
    if !(MIN_MEMORY_MB..=l.max_memory_mb).contains(&memory_mb) {
        return Err(ApiError::Validation(format!(
            "memory_mb {memory_mb} is outside {MIN_MEMORY_MB}..={} (the deployment's maximum)",
            l.max_memory_mb
        )));
    }
    let cpus = spec.cpus.unwrap_or(l.cpus);
    if !(cpus.is_finite() && cpus >= MIN_CPUS && cpus <= l.max_cpus) {
        return Err(ApiError::Validation(format!(
            "cpus {cpus} is outside {MIN_CPUS}..={} (the deployment's maximum)",
            l.max_cpus
        )));
    }
    let pids = spec.pids.unwrap_or(l.pids);
    if !(MIN_PIDS..=l.max_pids).contains(&pids) {
        return Err(ApiError::Validation(format!(
            "pids {pids} is outside {MIN_PIDS}..={} (the deployment's maximum)",
            l.max_pids
        )));
    }
    Ok(Limits { memory_mb, cpus, pids })
}

/// Checks a create request.
pub fn validate(st: &State, spec: &CreateSpec) -> Result<Valid, ApiError> {
    let name = spec.name.trim();
    if name.is_empty() {
        return Err(ApiError::Validation("name must not be empty".into()));
    }
    let chars = name.chars().count();
    if chars > 64 {
        return Err(ApiError::Validation(format!("name is {chars} characters, at most 64 allowed")));
    }
    if let Some(c) = name.chars().find(|c| invisible(*c)) {
        return Err(ApiError::Validation(format!(
            "name must be printable: it contains U+{:04X} (a control, bidirectional or zero-width character)",
            u32::from(c)
        )));
    }
    let image = spec.image.clone().unwrap_or_else(|| st.cfg.docker.default_image.clone());
    if image.is_empty() || image.len() > 255 || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::Validation(format!("image \"{image}\" is not a valid image reference")));
    }
    image_allowed(&st.cfg.docker.allowed_images, &st.cfg.docker.default_image, &image)
        .map_err(ApiError::Validation)?;
    let limits = limits(st, spec)?;
    let names = spec.services.clone().unwrap_or_else(|| st.cfg.default_services.clone());
    if names.is_empty() {
        return Err(ApiError::Validation("services must name at least one service".into()));
    }
    let mut services = vec![];
    for n in &names {
        let svc = pool_service(n).map_err(ApiError::Validation)?;
        if !st.cfg.pools.contains_key(svc.as_str()) {
            return Err(ApiError::Validation(format!("service {n} is not offered here (no port pool)")));
        }
        if services.contains(&svc) {
            return Err(ApiError::Validation(format!("service {n} is listed twice")));
        }
        services.push(svc);
    }
    let mut access = vec![];
    for svc in &services {
        let a = match spec.access.as_ref().and_then(|m| m.get(svc.as_str())) {
            Some(a) => *a,
            None => st.cfg.names.default_access(*svc),
        };
        if a.by_name() && *svc == Service::Rdp {
            return Err(ApiError::Validation(format!(
                "access.rdp \"{}\": RDP cannot be routed by name (its connection starts in clear \
                 text, before any TLS server name); use \"ports\"",
                a.as_str()
            )));
        }
        if a.by_name() && st.cfg.names.tls_port.is_none() {
            return Err(ApiError::Validation(format!(
                "access.{svc} \"{}\": this gateway serves no names (names.tls_port is not set); use \"ports\"",
                a.as_str()
            )));
        }
        access.push(a);
    }
    if let Some(m) = &spec.access {
        if let Some(extra) = m.keys().find(|k| !services.iter().any(|s| s.as_str() == k.as_str())) {
            return Err(ApiError::Validation(format!(
                "access names \"{extra}\", which is not one of this request's services"
            )));
        }
    }
    // How many GPUs the host has is checked against the inventory in the create.
    if let Some(model) = &spec.gpu_model {
        let m = model.trim();
        if m.is_empty() || m.chars().count() > 128 || m.chars().any(invisible) {
            return Err(ApiError::Validation(
                "gpu_model must be 1 to 128 printable characters (part of the model name, e.g. \"A100\")".into(),
            ));
        }
        if spec.gpus == 0 {
            return Err(ApiError::Validation("gpu_model needs gpus of at least 1".into()));
        }
    }
    if spec.ssh_public_keys.len() > 32 {
        return Err(ApiError::Validation("at most 32 ssh_public_keys".into()));
    }
    for key in &spec.ssh_public_keys {
        let kind = key.split_whitespace().next().unwrap_or("");
        let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
        if !known || key.len() > 16384 || key.contains('\n') || key.split_whitespace().count() < 2 {
            return Err(ApiError::Validation(
                "ssh_public_keys must be single-line OpenSSH public keys (\"ssh-ed25519 AAAA... comment\")".into(),
            ));
        }
    }
    let idle_stop_after_s = spec.idle_stop_after_s.unwrap_or(st.cfg.idle.default_stop_after_s);
    st.cfg.idle.check(idle_stop_after_s).map_err(|e| ApiError::Validation(format!("idle_stop_after_s: {e}")))?;
    Ok(Valid { image, services, access, limits, idle_stop_after_s })
}

