//! Environment lifecycle: create, stop, start, delete. Each step is undone in reverse when a
//! later one fails; routes are removed before a container is stopped or removed; released
//! ports go into quarantine. Every environment has a home volume, made before its first
//! container and removed after its last.
//!
//! One module per operation (`create`, `delete`, `stop_start`, `hold`, `sessions`), the steps
//! they share in `steps`; this file only names what the rest of the crate uses.

mod create;
mod delete;
pub mod hold;
mod quota;
pub mod sessions;
mod steps;
mod stop_start;
mod validate;

pub use create::{create, undo_create};
pub use delete::{delete, finish_delete};
pub(crate) use steps::name_services;
pub use steps::{ClaimLost, Outcome};
pub use stop_start::{start, stop, stop_env, undo_start};
pub use validate::{CreateSpec, IdempotencyKey};
