//! How a command fails, and the exit code each failure gives a script (the README lists them).

use std::fmt;

/// A failed command.
#[derive(Debug)]
pub enum Failure {
    /// The API answered with an error (exit 1).
    Api { status: u16, code: u64, message: String },
    /// No configuration, or a configuration or local file that cannot be used (exit 3).
    Config(String),
    /// The API or the gateway could not be reached (exit 4).
    Unreachable(String),
    /// No workspace by that name or id (exit 5).
    NoSuchWorkspace(String),
    /// Anything else that went wrong here (exit 1).
    Other(String),
}

impl Failure {
    /// The process exit code.
    pub fn code(&self) -> i32 {
        match self {
            Failure::Api { .. } | Failure::Other(_) => 1,
            Failure::Config(_) => 3,
            Failure::Unreachable(_) => 4,
            Failure::NoSuchWorkspace(_) => 5,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Api { status, code, message } => write!(f, "{message} (HTTP {status}, code {code})"),
            Failure::Config(m) | Failure::Unreachable(m) | Failure::Other(m) => f.write_str(m),
            Failure::NoSuchWorkspace(name) => write!(f, "no workspace named {name:?} (gpugate ls lists yours)"),
        }
    }
}
