//! The control API over HTTP(S): one request, its envelope unwrapped. Answers are read as the
//! API's own JSON (the OpenAPI document at `/api/v1/openapi.json` describes them); the client
//! keeps no second copy of its types, only the field names it reads.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::config::Config;
use crate::exit::Failure;

/// A client of one API with one token.
pub struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

/// The certificates (DER) of a CA file, or `None` without one (then Mozilla's roots count).
pub fn ca_certificates(ca_file: Option<&std::path::Path>) -> Result<Option<Vec<Vec<u8>>>, Failure> {
    let Some(path) = ca_file else { return Ok(None) };
    let pem = std::fs::read(path).map_err(|e| Failure::Config(format!("ca_file {}: {e}", path.display())))?;
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut pem.as_slice())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| Failure::Config(format!("ca_file {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Failure::Config(format!("ca_file {} holds no PEM certificate", path.display())));
    }
    Ok(Some(certs))
}

impl Api {
    /// A client for `cfg`.
    pub fn new(cfg: &Config) -> Result<Api, Failure> {
        let roots = match ca_certificates(cfg.ca_file.as_deref())? {
            Some(certs) => RootCerts::Specific(Arc::new(certs.into_iter().map(|c| Certificate::from_der(&c).to_owned()).collect())),
            None => RootCerts::WebPki,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            // Long enough for a create or start that waits for its services.
            .timeout_global(Some(Duration::from_secs(300)))
            .tls_config(TlsConfig::builder().root_certs(roots).build())
            .user_agent(concat!("gpugate/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Api { base: cfg.api.trim_end_matches('/').to_string(), token: cfg.token.clone(), agent })
    }

    /// `method path` with an optional JSON body; the envelope's `data` on success.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let sent = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &auth).call(),
            (_, body) => {
                let text = body.map_or_else(|| "{}".to_string(), Value::to_string);
                let req = match method {
                    "PATCH" => self.agent.patch(&url),
                    "PUT" => self.agent.put(&url),
                    _ => self.agent.post(&url),
                };
                req.header("Authorization", &auth).content_type("application/json").send(text.as_bytes())
            }
        };
        let mut resp = sent.map_err(|e| Failure::Unreachable(format!("the API at {} did not answer: {e}", self.base)))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| Failure::Unreachable(format!("reading the API's answer: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|_| Failure::Api {
            status,
            code: 0,
            message: format!("{} answered something that is not the API's JSON: {:.200}", self.base, text.trim()),
        })?;
        if (200..300).contains(&status) && v["code"] == 0 {
            return Ok(v["data"].clone());
        }
        Err(Failure::Api {
            status,
            code: v["code"].as_u64().unwrap_or(0),
            message: v["message"].as_str().unwrap_or("the API refused the request").to_string(),
        })
    }

    /// The caller's workspaces.
    pub fn environments(&self) -> Result<Vec<Value>, Failure> {
        Ok(self.call("GET", "/api/v1/environments", None)?.as_array().cloned().unwrap_or_default())
    }

    /// The caller's workspace named (or with the id) `name`.
    pub fn find(&self, name: &str) -> Result<Value, Failure> {
        let all = self.environments()?;
        let mut matching: Vec<&Value> = all.iter().filter(|e| e["id"] == name).collect();
        if matching.is_empty() {
            matching = all.iter().filter(|e| e["name"] == name).collect();
        }
        match matching.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Failure::NoSuchWorkspace(name.to_string())),
            many => Err(Failure::Other(format!("{} workspaces are named {name:?}: use the id", many.len()))),
        }
    }
}
