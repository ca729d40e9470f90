//! `gpugate-routes`: the route table shared by the gpugate control plane and nginx module.
//!
//! Two fixed-size files in a directory of their own (default `/dev/shm/gpugate/`): `routes`
//! maps every local TCP port to the workspace it reaches, and every (environment id, service)
//! name route to its workspace ([`hosts`]), and `routes.counters` holds their traffic
//! counters. One process writes routes ([`Writer`], holding the directory's
//! `flock`); nginx workers and tools map `routes` read-only and read it without locks
//! ([`Table`]); workers add to the counters ([`CounterFile`]), which live apart so that a
//! process allowed to count can never change a route.
//!
//! - [`layout`]: the byte layout and its version (the contract; see the diagrams there).
//! - [`seqlock`]: the read and write protocol of a slot, the argument for its orderings and
//!   how a writer's crash is repaired.
//! - [`route`]: what a route is in plain Rust, and its encoding.
//! - [`reader`] / [`writer`]: the two sides; [`counters`]: tagged totals and per-worker gauges.
//!
//! Files are only ever changed in place: nginx maps them once, so a file replaced by rename is
//! only seen at the readers' next re-check, and a truncated one is caught by
//! [`install_sigbus_guard`] instead of killing the process that maps it.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

mod clock;
pub mod counters;
pub mod error;
mod files;
mod guard;
pub mod hosts;
pub mod layout;
mod mapping;
mod port_set;
pub mod reader;
pub mod route;
mod rows;
pub mod seqlock;
pub mod writer;

pub use clock::now_ms;
pub use counters::{counters_path, CounterFile, Counters, CountingRows, Outcome, WorkerRow};
pub use error::{Error, Result};
pub use guard::install_sigbus_guard;
pub use hosts::HostKey;
pub use layout::{NameRefusal, SlotKey, DEFAULT_HOST_SLOTS};
pub use reader::{HeaderInfo, Lookup, Table};
pub use route::{parse_upstream, EnvId, Route, Service};
pub use writer::{HostWrite, LockMode, OpenReport, SyncReport, Writer};

/// Where the table lives unless configured otherwise.
pub const DEFAULT_TABLE_PATH: &str = "/dev/shm/gpugate/routes";
