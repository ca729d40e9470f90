//! `gpugate-routes`: the route table shared by the gpugate control plane and nginx module.
//!
//! One fixed-size file (default `/dev/shm/gpugate/routes`) maps every local TCP port to the
//! workspace it reaches. One process writes it ([`Writer`], holding the file's `flock`); nginx
//! workers and tools read it without locks ([`Table`]) and add to per-port counters.
//!
//! - [`layout`]: the byte layout and its version (the contract; see the diagram there).
//! - [`seqlock`]: the read and write protocol of a slot, with the argument for its orderings.
//! - [`route`]: what a route is in plain Rust, and its encoding.
//! - [`reader`] / [`writer`]: the two sides.
//!
//! The file is only ever changed in place and only ever grows: nginx maps it once, so a file
//! replaced by rename would be invisible to it and a truncated one would kill its workers.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod error;
pub mod layout;
mod mapping;
pub mod reader;
pub mod route;
pub mod seqlock;
pub mod writer;

pub use error::{Error, Result};
pub use reader::{now_ms, Counters, HeaderInfo, Lookup, Table};
pub use route::{parse_upstream, EnvId, Route, Service};
pub use writer::{LockMode, SyncReport, Writer};

/// Where the table lives unless configured otherwise.
pub const DEFAULT_TABLE_PATH: &str = "/dev/shm/gpugate/routes";
