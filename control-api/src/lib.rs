//! `gpugate-api`: the gpugate control plane.
//!
//! - [`config`]: typed configuration (file + environment).
//! - [`db`]: PostgreSQL, the source of truth (pools, environments, routes, users, events).
//! - [`docker`]: the workspace containers.
//! - [`fleet`]: the GPU hosts: one Docker client per host, placement's data;
//!   [`host_health`]: the loop that pings their engines and marks a host that stops answering.
//! - [`gpu`]: a GPU host's device passing (checked against its engine) and inventory discovery.
//! - [`publisher`]: the route table's one writer; [`table_view`]: the API's read view of it.
//! - [`registry`]: the active publisher's row in the gateway registry.
//! - [`publisher_status`]: what the publisher is doing (read by the registry and the probes).
//! - [`lifecycle`]: create / stop / start / delete, each undone in reverse on failure.
//! - [`ops`]: runs accepted operations to completion in their own tasks.
//! - [`idle`]: the idle task (warning, then stop) over [`idle_clock`]'s rule, with GPU
//!   utilisation sampled by [`gpu_activity`].
//! - [`reconcile`]: converges Docker and the table to the database.
//! - [`key_sync`]: brings each running workspace its owner's account keys and password
//!   setting; [`ssh_public_key`] vets the keys users hand in, [`ssh_identity`] is the
//!   workspaces' host identity.
//! - [`readiness`]: probes each service after a start until it answers like itself.
//! - [`ready_log`]: what `/readyz` last logged per dependency (each failure once per change).
//! - [`http`]: the REST API; [`error`]: its error type and envelope.
//! - [`app`]: start-up, used by `main.rs` and the tests; [`cli`]: the admin commands.
#![forbid(unsafe_code)]

pub mod activity;
pub mod activity_report;
pub mod app;
pub mod cli;
pub mod config;
pub mod db;
pub mod docker;
pub mod error;
pub mod fleet;
pub mod gpu;
pub mod gpu_activity;
pub mod host_exec;
pub mod host_health;
pub mod http;
pub mod ids;
pub mod key_sync;
pub mod idle;
pub mod idle_clock;
pub mod lifecycle;
pub mod metrics;
pub mod ops;
pub mod publisher;
pub mod publisher_status;
pub mod readiness;
pub mod ready_log;
pub mod reconcile;
pub mod registry;
pub mod revokes;
pub mod ssh_identity;
pub mod ssh_public_key;
pub mod state;
pub mod table_view;
