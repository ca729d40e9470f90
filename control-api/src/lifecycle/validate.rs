//! Validation of create requests: every bad field is a 422 naming it, before anything changes.

use gpugate_routes::Service;

use crate::config::pool_service;
use crate::error::ApiError;
use crate::state::State;

use super::CreateSpec;

/// Checks a create request; returns the image and the services.
pub fn validate(st: &State, spec: &CreateSpec) -> Result<(String, Vec<Service>), ApiError> {
    let name = spec.name.trim();
    if name.is_empty() {
        return Err(ApiError::Validation("name must not be empty".into()));
    }
    let chars = name.chars().count();
    if chars > 64 {
        return Err(ApiError::Validation(format!("name is {chars} characters, at most 64 allowed")));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::Validation("name must not contain control characters".into()));
    }
    let image = spec.image.clone().unwrap_or_else(|| st.cfg.docker.default_image.clone());
    if image.is_empty() || image.len() > 255 || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::Validation(format!("image \"{image}\" is not a valid image reference")));
    }
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
    let total = st.cfg.gpu.devices.len();
    if spec.gpus as usize > total {
        return Err(ApiError::Validation(format!(
            "{} GPUs requested, this host has {total}",
            spec.gpus
        )));
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
    Ok((image, services))
}

