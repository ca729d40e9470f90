//! The client's own files, in its configuration directory (`$GPUGATE_CONFIG_DIR`, else
//! `$XDG_CONFIG_HOME/gpugate`, else `~/.config/gpugate`; made 0700): `config.json` (the API's
//! address and the token, written 0600 by `login`) and `known_hosts` (the deployment's SSH
//! host CA line, written by `config-ssh` and `ssh`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exit::Failure;

/// What `login` stores.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The API's base URL (`https://api.gpu.example.com` or `http://127.0.0.1:8080`).
    pub api: String,
    /// The API token.
    pub token: String,
    /// Where the gateway's names lead, when DNS does not say (an address or host name); unset:
    /// each workspace's own host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// A PEM file of the CA that signed the API's and the gateway's certificates, when it is not
    /// one of Mozilla's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// The configuration directory.
pub fn dir() -> Result<PathBuf, Failure> {
    if let Some(d) = std::env::var_os("GPUGATE_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("gpugate"));
    }
    Ok(home()?.join(".config").join("gpugate"))
}

/// The user's home directory.
pub fn home() -> Result<PathBuf, Failure> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| Failure::Config("HOME is not set".into()))
}

fn config_path() -> Result<PathBuf, Failure> {
    Ok(dir()?.join("config.json"))
}

/// The managed known_hosts file.
pub fn known_hosts_path() -> Result<PathBuf, Failure> {
    Ok(dir()?.join("known_hosts"))
}

/// The stored configuration; a clear error when there is none (run `gpugate login`).
pub fn load() -> Result<Config, Failure> {
    let path = config_path()?;
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::Config(format!("not logged in ({} is missing): run `gpugate login API_URL`", path.display())))
        }
        Err(e) => return Err(Failure::Config(format!("reading {}: {e}", path.display()))),
    };
    serde_json::from_str(&text).map_err(|e| Failure::Config(format!("{} is not a gpugate configuration: {e}", path.display())))
}

/// Stores `cfg` (the directory 0700, the file 0600, replaced in one step).
pub fn save(cfg: &Config) -> Result<PathBuf, Failure> {
    let path = config_path()?;
    let text = serde_json::to_string_pretty(cfg).map_err(|e| Failure::Config(e.to_string()))?;
    write_private(&path, &format!("{text}\n"))?;
    Ok(path)
}

/// Writes `text` to `path` readable by the user alone, through a temporary file and a rename
/// (a reader never sees half a file); makes the directory (0700) if missing.
pub fn write_private(path: &Path, text: &str) -> Result<(), Failure> {
    let failed = |e: std::io::Error| Failure::Config(format!("writing {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(failed)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(failed)?;
    f.write_all(text.as_bytes()).map_err(failed)?;
    f.sync_all().map_err(failed)?;
    fs::rename(&tmp, path).map_err(failed)
}
