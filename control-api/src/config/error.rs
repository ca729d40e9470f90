//! What is wrong with a configuration, worded for the operator who has to fix it.

use std::path::PathBuf;

/// A configuration problem, worded for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file \"{}\": {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("configuration file \"{}\": {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// An environment variable has a value that cannot be used.
    #[error("environment variable {name}: {message}")]
    Env { name: &'static str, message: String },
    /// The values parse but do not make a working setup.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}
