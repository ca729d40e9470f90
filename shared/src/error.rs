//! Errors of the route table, worded so that nginx and the CLI can print them as they are.

use std::path::PathBuf;

/// Everything that can go wrong opening, reading or writing a route table.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file does not exist (yet).
    #[error("route table file \"{}\" does not exist", path.display())]
    Missing { path: PathBuf },
    /// An I/O error while opening, sizing, locking or mapping the file.
    #[error("route table file \"{}\": {op} failed: {source}", path.display())]
    Io { path: PathBuf, op: &'static str, #[source] source: std::io::Error },
    /// The file is shorter than its layout needs.
    #[error("route table file \"{}\" is {len} bytes, expected at least {need}", path.display())]
    TooShort { path: PathBuf, len: u64, need: u64 },
    /// The file does not start with the gpugate magic number.
    #[error("route table file \"{}\" is not a gpugate route table (magic {found:#018x}); \
        remove it and let the writer create the table", path.display())]
    BadMagic { path: PathBuf, found: u64 },
    /// The path is a symbolic link; tables are never opened through one.
    #[error("route table file \"{}\" is a symbolic link; refusing to follow it \
        (remove the link and let the writer create the file)", path.display())]
    Symlink { path: PathBuf },
    /// The table's directory or file could be changed by someone other than the writer.
    #[error("route table {what} \"{}\" {why}", path.display())]
    Unsafe { path: PathBuf, what: &'static str, why: String },
    /// The writer's file was deleted or replaced by another file while it held the lock.
    #[error("route table file \"{}\" was deleted or replaced under the writer", path.display())]
    Replaced { path: PathBuf },
    /// The file has a layout version this build does not understand.
    #[error("route table file \"{}\" has layout version {found}, expected {expected}", path.display())]
    Version { path: PathBuf, found: u32, expected: u32 },
    /// The header's sizes and offsets disagree with the layout of its version.
    #[error("route table file \"{}\" has an inconsistent header ({what})", path.display())]
    Geometry { path: PathBuf, what: &'static str },
    /// Another process holds the writer lock.
    #[error("route table file \"{}\" is locked by another writer{}", path.display(),
        match holder { Some(pid) => format!(" (pid {pid})"), None => String::new() })]
    Locked { path: PathBuf, holder: Option<u32> },
    /// A route that cannot be stored (bad port, id or service).
    #[error("{0}")]
    InvalidRoute(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &std::path::Path, op: &'static str, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::Missing { path: path.to_owned() }
        } else {
            Error::Io { path: path.to_owned(), op, source }
        }
    }

    /// A short, stable name for the kind of failure (used to log each cause once).
    pub fn cause(&self) -> &'static str {
        match self {
            Error::Missing { .. } => "missing",
            Error::Io { .. } => "io",
            Error::TooShort { .. } => "short",
            Error::BadMagic { .. } => "magic",
            Error::Version { .. } => "version",
            Error::Geometry { .. } => "geometry",
            Error::Locked { .. } => "locked",
            Error::Symlink { .. } => "symlink",
            Error::Unsafe { .. } => "unsafe",
            Error::Replaced { .. } => "replaced",
            Error::InvalidRoute(_) => "invalid",
        }
    }
}
