//! Configuration of the module: the structs of each block and the directive handlers.
//!
//! ```nginx
//! stream {
//!     gpugate_route_table /dev/shm/gpugate/routes;   # MainConf
//!     gpugate_flush_interval 1s;                     # SrvConf (stream or server level)
//!     upstream gpugate { gpugate_balancer; }          # balancer.rs
//!     server {
//!         listen 20000-20999;
//!         gpugate_route on;                           # SrvConf
//!         proxy_pass gpugate;                         # or $gpugate_upstream
//!     }
//!     server {
//!         listen 8443 ssl;                            # ssl_certificate ... (stream ssl)
//!         gpugate_name_route terminate;               # SrvConf; or passthrough
//!         gpugate_name_domain gpu.example.com;        # SrvConf (stream or server level)
//!         proxy_pass gpugate;
//!     }
//! }
//! ```

use std::ffi::{c_char, c_void};
use std::path::PathBuf;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_full_name, ngx_conf_t, ngx_cycle_t, ngx_flag_t, ngx_msec_t,
    ngx_pool_cleanup_add, ngx_str_t, ngx_stream_session_t, ngx_uint_t, NGX_CONF_UNSET,
    NGX_LOG_EMERG, NGX_LOG_WARN, NGX_OK,
};
use ngx::ngx_conf_log_error;

use crate::ffi::{
    conf_args, conf_main_conf, ctx_index, cycle_main_conf, pool_alloc, pool_str, session_entry, str_bytes, SessionArray,
};
use crate::route_source::RouteSource;

/// `stream {}`-level configuration.
#[repr(C)]
pub struct MainConf {
    /// `gpugate_route_table` path (resolved against the prefix); empty if not set.
    pub table_path: ngx_str_t,
    /// The process's view of the table; null when no table is configured. Owned by the
    /// configuration pool (freed by a pool cleanup).
    pub source: *mut RouteSource,
}

/// `server {}`-level configuration (also allocated, unused, for `upstream {}` blocks;
/// `gpugate_flush_interval` at `stream {}` level is inherited by every server).
#[repr(C)]
pub struct SrvConf {
    /// `gpugate_route on|off`.
    pub route: ngx_flag_t,
    /// `gpugate_flush_interval`, milliseconds (0: off); `NGX_CONF_UNSET_MSEC` until merged.
    pub flush_interval: ngx_msec_t,
    /// `gpugate_name_route`: one of the `NAME_*` values; `NGX_CONF_UNSET_UINT` until merged.
    pub name_route: ngx_uint_t,
    /// `gpugate_name_domain`, lowercased, without a trailing dot; empty until set.
    pub name_domain: ngx_str_t,
}

/// `gpugate_name_route off`.
pub const NAME_OFF: ngx_uint_t = 0;
/// `gpugate_name_route terminate`: nginx's stream `ssl` terminates TLS; the name is the
/// handshake's server name.
pub const NAME_TERMINATE: ngx_uint_t = 1;
/// `gpugate_name_route passthrough`: the module reads the name from the ClientHello and the
/// workspace terminates TLS itself.
pub const NAME_PASSTHROUGH: ngx_uint_t = 2;
const UNSET_UINT: ngx_uint_t = ngx_uint_t::MAX;

impl SrvConf {
    /// The configured domain (valid UTF-8: [`cmd_set_name_domain`] checked it).
    pub fn domain(&self) -> &str {
        std::str::from_utf8(str_bytes(&self.name_domain)).unwrap_or("")
    }
}

/// Default `gpugate_flush_interval`: one second.
pub const DEFAULT_FLUSH_MS: ngx_msec_t = 1000;
const UNSET_MSEC: ngx_msec_t = ngx_msec_t::MAX;


/// This module's main configuration of a session's server.
///
/// # Safety
/// `s` must be a live session of a configuration this module is part of.
pub unsafe fn session_main_conf<'a>(s: *mut ngx_stream_session_t) -> &'a MainConf {
    // SAFETY: the entry is the MainConf create_main_conf allocated from the configuration
    // pool, which outlives every session of that configuration.
    unsafe { &*(session_entry(s, SessionArray::MainConf, ctx_index()) as *const MainConf) }
}

/// This module's server configuration of a session.
///
/// # Safety
/// As for [`session_main_conf`].
pub unsafe fn session_srv_conf<'a>(s: *mut ngx_stream_session_t) -> &'a SrvConf {
    // SAFETY: as above, for the SrvConf of the session's server.
    unsafe { &*(session_entry(s, SessionArray::SrvConf, ctx_index()) as *const SrvConf) }
}

/// The route source of a cycle's configuration, if it has a `stream {}` block with a table.
///
/// # Safety
/// `cycle` must be a live cycle whose configuration was parsed.
pub unsafe fn cycle_source<'a>(cycle: *mut ngx_cycle_t) -> Option<&'a RouteSource> {
    // SAFETY: the entry is null or our MainConf; its source is null or a live box owned by
    // the configuration pool.
    unsafe {
        let mcf = (cycle_main_conf(cycle, ctx_index()) as *const MainConf).as_ref()?;
        mcf.source.as_ref()
    }
}

pub unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    let value = MainConf { table_path: ngx_str_t { len: 0, data: std::ptr::null_mut() }, source: std::ptr::null_mut() };
    // SAFETY: cf->pool is the configuration pool; MainConf has no Drop.
    match unsafe { pool_alloc((*cf).pool, value) } {
        Some(p) => p as *mut c_void,
        None => std::ptr::null_mut(),
    }
}

pub unsafe extern "C" fn init_main_conf(cf: *mut ngx_conf_t, conf: *mut c_void) -> *mut c_char {
    // SAFETY: nginx passes back the MainConf that create_main_conf allocated.
    let mcf = unsafe { &mut *(conf as *mut MainConf) };
    if mcf.table_path.len == 0 {
        return NGX_CONF_OK;
    }
    let path = PathBuf::from(String::from_utf8_lossy(str_bytes(&mcf.table_path)).into_owned());
    let source = Box::into_raw(Box::new(RouteSource::new(path)));
    // SAFETY: cf->pool is the configuration pool, alive for the whole cycle.
    let cln = unsafe { ngx_pool_cleanup_add((*cf).pool, 0) };
    if cln.is_null() {
        // SAFETY: `source` came from Box::into_raw just above and was handed to no one.
        drop(unsafe { Box::from_raw(source) });
        return NGX_CONF_ERROR;
    }
    // SAFETY: `cln` is a fresh cleanup record of the configuration pool.
    unsafe {
        (*cln).handler = Some(drop_source);
        (*cln).data = source as *mut c_void;
    }
    mcf.source = source;
    // A table file that shrinks under a process must not kill it (SIGBUS): installed in the
    // master, inherited by every worker it forks.
    if let Err(e) = gpugate_routes::install_sigbus_guard() {
        ngx_conf_log_error!(NGX_LOG_WARN, cf, "gpugate: cannot install the SIGBUS guard: {e}");
    }
    // Map the table now, in the master, so that workers inherit the mapping. A missing or
    // unusable table is a warning, not an error: nginx starts and refuses until it is valid.
    // SAFETY: `source` is the live box just stored.
    for notice in unsafe { &*source }.refresh(crate::ffi::monotonic_ms()) {
        if let crate::route_source::Notice::Unusable(e) = notice {
            ngx_conf_log_error!(
                NGX_LOG_WARN,
                cf,
                "gpugate: {e}; connections to gpugate_route servers are refused until it is valid"
            );
        }
    }
    NGX_CONF_OK
}

unsafe extern "C" fn drop_source(data: *mut c_void) {
    // SAFETY: registered only by init_main_conf with a pointer from Box::into_raw; the pool
    // runs each cleanup once, when the configuration is destroyed.
    drop(unsafe { Box::from_raw(data as *mut RouteSource) });
}

pub unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    let value = SrvConf {
        route: NGX_CONF_UNSET as ngx_flag_t,
        flush_interval: UNSET_MSEC,
        name_route: UNSET_UINT,
        name_domain: ngx_str_t { len: 0, data: std::ptr::null_mut() },
    };
    // SAFETY: cf->pool is the configuration pool; SrvConf is plain data.
    match unsafe { pool_alloc((*cf).pool, value) } {
        Some(p) => p as *mut c_void,
        None => std::ptr::null_mut(),
    }
}

pub unsafe extern "C" fn merge_srv_conf(
    cf: *mut ngx_conf_t,
    prev: *mut c_void,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the server's SrvConf created by create_srv_conf, and the one of
    // the enclosing level (the stream block's) as `prev`.
    let (scf, prev) = unsafe { (&mut *(conf as *mut SrvConf), &*(prev as *const SrvConf)) };
    if scf.route == NGX_CONF_UNSET as ngx_flag_t {
        scf.route = 0;
    }
    if scf.flush_interval == UNSET_MSEC {
        scf.flush_interval =
            if prev.flush_interval == UNSET_MSEC { DEFAULT_FLUSH_MS } else { prev.flush_interval };
    }
    // SAFETY: merging runs inside the stream block, after the whole block was parsed, so
    // the main configuration is final.
    let mcf = unsafe { &*(conf_main_conf(cf, ctx_index()) as *const MainConf) };
    if scf.route == 1 && mcf.table_path.len == 0 {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"gpugate_route\" is on but \"gpugate_route_table\" is not set in the stream block"
        );
        return NGX_CONF_ERROR;
    }
    if scf.name_route == UNSET_UINT {
        scf.name_route = NAME_OFF;
    }
    if scf.name_domain.len == 0 {
        scf.name_domain = prev.name_domain;
    }
    if scf.name_route != NAME_OFF {
        let problem = if scf.route == 1 {
            Some("\"gpugate_name_route\" and \"gpugate_route on\" cannot be used in the same server: \
                  a server routes by port or by name")
        } else if mcf.table_path.len == 0 {
            Some("\"gpugate_name_route\" is set but \"gpugate_route_table\" is not set in the stream block")
        } else if scf.name_domain.len == 0 {
            Some("\"gpugate_name_route\" needs \"gpugate_name_domain\" (the domain of <env-id>.<service>.<domain>)")
        } else {
            None
        };
        if let Some(why) = problem {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{why}");
            return NGX_CONF_ERROR;
        }
    }
    NGX_CONF_OK
}

/// `gpugate_name_route off | terminate | passthrough;`
pub unsafe extern "C" fn cmd_set_name_route(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: registered with NGX_STREAM_SRV_CONF_OFFSET, so `conf` is a SrvConf.
    let scf = unsafe { &mut *(conf as *mut SrvConf) };
    if scf.name_route != UNSET_UINT {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    // SAFETY: NGX_CONF_TAKE1 guarantees two arguments.
    let value = unsafe { conf_args(cf) }[1];
    scf.name_route = match str_bytes(&value) {
        b"off" => NAME_OFF,
        b"terminate" => NAME_TERMINATE,
        b"passthrough" => NAME_PASSTHROUGH,
        other => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "\"gpugate_name_route\" \"{}\" is not a mode (expected off, terminate or passthrough)",
                String::from_utf8_lossy(other)
            );
            return NGX_CONF_ERROR;
        }
    };
    NGX_CONF_OK
}

/// `gpugate_name_domain DOMAIN;`
pub unsafe extern "C" fn cmd_set_name_domain(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: registered with NGX_STREAM_SRV_CONF_OFFSET, so `conf` is a SrvConf.
    let scf = unsafe { &mut *(conf as *mut SrvConf) };
    if scf.name_domain.len != 0 {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    // SAFETY: NGX_CONF_TAKE1 guarantees two arguments.
    let value = unsafe { conf_args(cf) }[1];
    match crate::route_source::check_domain(str_bytes(&value)) {
        Ok(domain) => {
            // SAFETY: cf->pool is the configuration pool, alive as long as this SrvConf.
            match unsafe { pool_str((*cf).pool, domain.as_bytes()) } {
                Some(s) => {
                    scf.name_domain = s;
                    NGX_CONF_OK
                }
                None => NGX_CONF_ERROR,
            }
        }
        Err(why) => {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "\"gpugate_name_domain\" \"{}\" {why}",
                String::from_utf8_lossy(str_bytes(&value))
            );
            NGX_CONF_ERROR
        }
    }
}

/// `gpugate_flush_interval TIME;`
pub unsafe extern "C" fn cmd_set_flush_interval(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: registered with NGX_STREAM_SRV_CONF_OFFSET, so `conf` is a SrvConf.
    let scf = unsafe { &mut *(conf as *mut SrvConf) };
    if scf.flush_interval != UNSET_MSEC {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    // SAFETY: called as a directive handler; NGX_CONF_TAKE1 guarantees two arguments.
    let mut value = unsafe { conf_args(cf) }[1];
    let text = String::from_utf8_lossy(str_bytes(&value)).into_owned();
    // SAFETY: parses the argument nginx holds for the duration of the call.
    let ms = unsafe { ngx::ffi::ngx_parse_time(&mut value, 0) };
    if ms < 0 {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"gpugate_flush_interval\" \"{text}\" is not a time (expected e.g. 1s or 500ms)"
        );
        return NGX_CONF_ERROR;
    }
    match crate::route_source::check_flush_interval(ms as u64) {
        Ok(ms) => {
            scf.flush_interval = ms as ngx_msec_t;
            NGX_CONF_OK
        }
        Err(why) => {
            ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"gpugate_flush_interval\" \"{text}\" {why}");
            NGX_CONF_ERROR
        }
    }
}

/// `gpugate_route_table PATH;`
pub unsafe extern "C" fn cmd_set_route_table(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: registered with NGX_STREAM_MAIN_CONF_OFFSET, so `conf` is our MainConf.
    let mcf = unsafe { &mut *(conf as *mut MainConf) };
    if mcf.table_path.len != 0 {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    // SAFETY: called as a directive handler; NGX_CONF_TAKE1 guarantees two arguments.
    let mut value = unsafe { conf_args(cf) }[1];
    let raw = str_bytes(&value);
    if raw.is_empty() {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"gpugate_route_table\" needs a file path");
        return NGX_CONF_ERROR;
    }
    if std::str::from_utf8(raw).is_err() || raw.contains(&0) {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"gpugate_route_table\" path is not valid text");
        return NGX_CONF_ERROR;
    }
    if raw.ends_with(b"/") {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"gpugate_route_table\" \"{}\" names a directory, expected a file",
            String::from_utf8_lossy(raw)
        );
        return NGX_CONF_ERROR;
    }
    // SAFETY: resolves a relative path against the prefix, allocating from the cycle pool.
    if unsafe { ngx_conf_full_name((*cf).cycle, &mut value, 0) } != NGX_OK as isize {
        return NGX_CONF_ERROR;
    }
    mcf.table_path = value;
    NGX_CONF_OK
}
