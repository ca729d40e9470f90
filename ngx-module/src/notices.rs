//! The route table's state changes (mapped, re-mapped, unusable, counters read-only or full),
//! logged on the cycle's log each once, by construction of [`Notice`]: by the worker start
//! hook, the preread handler and the live-session timer alike.

use ngx::ffi::{NGX_LOG_ERR, NGX_LOG_NOTICE, NGX_LOG_WARN};
use ngx::ngx_log_error;

use crate::ffi::cycle_log;
use crate::route_source::Notice;

/// Logs changes of the table's state on the cycle's log (each cause once, by construction
/// of [`Notice`]).
pub(crate) fn log_notices(notices: Vec<Notice>) {
    for notice in notices {
        match notice {
            Notice::Opened { path, replaced } => {
                let how = if replaced { "re-mapped (the file was replaced)" } else { "mapped" };
                ngx_log_error!(NGX_LOG_NOTICE, cycle_log(), "gpugate: route table file \"{}\" {how}", path.display());
            }
            Notice::Counting { path, writable: true } => {
                ngx_log_error!(NGX_LOG_NOTICE, cycle_log(), "gpugate: counters file \"{}\" mapped", path.display());
            }
            Notice::Counting { path, writable: false } => {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    cycle_log(),
                    "gpugate: counters file \"{}\" mapped read-only: counters are not recorded; \
                     give the worker user write access (group of the file)",
                    path.display()
                );
            }
            Notice::Unusable(e) => {
                ngx_log_error!(NGX_LOG_ERR, cycle_log(), "gpugate: {e}; refusing connections");
            }
            Notice::NoRow { path } => {
                ngx_log_error!(
                    NGX_LOG_WARN,
                    cycle_log(),
                    "gpugate: counters file \"{}\": every worker row is held; this worker's open \
                     sessions are not in connections_active until one frees",
                    path.display()
                );
            }
            Notice::CountersUnusable(e) => {
                ngx_log_error!(NGX_LOG_WARN, cycle_log(), "gpugate: {e}; connections are routed but not counted");
            }
        }
    }
}
