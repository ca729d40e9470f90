//! The per-connection work: the preread lookup, the log-phase counters and the variables.
//!
//! Preread asks the table once where the connection's local port goes and keeps the answer
//! in the session context; everything later (variables, the balancer, the counters at close)
//! reads that snapshot, so a route changed mid-session never splits one connection's view.

use ngx::ffi::{
    ngx_array_push, ngx_conf_t, ngx_inet_get_port, ngx_int_t, ngx_stream_add_variable,
    ngx_stream_core_main_conf_t, ngx_stream_core_module, ngx_stream_handler_pt,
    ngx_stream_phases_NGX_STREAM_LOG_PHASE, ngx_stream_phases_NGX_STREAM_PREREAD_PHASE,
    ngx_stream_session_t, ngx_stream_variable_value_t, ngx_str_t, socklen_t, NGX_DECLINED,
    NGX_ERROR, NGX_LOG_ERR, NGX_LOG_NOTICE, NGX_LOG_WARN, NGX_OK, NGX_STREAM_FORBIDDEN,
    NGX_STREAM_VAR_NOCACHEABLE,
};
use std::io::Write;

use ngx::ngx_log_error;

use crate::ffi::{cycle_log, pool_alloc, RawSockaddr, SessionExt};
use crate::route_source::{count_close, Decision, Notice, RouteStatus};

/// Longest "ip:port" text: "[" + 39-char IPv6 + "%" scope + "]:" + 5 digits, rounded up.
const NAME_CAP: usize = 64;

/// What a session keeps of its lookup. Allocated zeroed from the connection's pool; plain
/// data, no Drop.
pub struct SessionCtx {
    pub port: u16,
    pub decision: Decision,
    /// The upstream as a socket address, for the balancer.
    pub sockaddr: RawSockaddr,
    pub socklen: socklen_t,
    /// The upstream as text ("10.0.0.5:22", "[::1]:22"), for `$gpugate_upstream` and the
    /// balancer's peer name; `name.data` points into `name_buf`.
    pub name: ngx_str_t,
    pub name_buf: [u8; NAME_CAP],
}

/// The variables, in the order of `VAR_*` indices passed as the handler's `data`.
const VARIABLES: [&str; 4] =
    ["gpugate_upstream", "gpugate_env_id", "gpugate_service", "gpugate_route_status"];
const VAR_UPSTREAM: usize = 0;
const VAR_ENV_ID: usize = 1;
const VAR_SERVICE: usize = 2;
const VAR_STATUS: usize = 3;

pub unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    for (i, name) in VARIABLES.iter().enumerate() {
        let mut s = ngx_str_t { len: name.len(), data: name.as_ptr() as *mut u8 };
        // SAFETY: called by nginx with the stream block's configuration; the name is copied
        // by nginx into the configuration pool.
        let v = unsafe { ngx_stream_add_variable(cf, &mut s, NGX_STREAM_VAR_NOCACHEABLE as _) };
        if v.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        // SAFETY: `v` is the variable record nginx just created for us.
        unsafe {
            (*v).get_handler = Some(variable_get);
            (*v).data = i;
        }
    }
    NGX_OK as ngx_int_t
}

pub unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: inside the stream block cf->ctx is its ngx_stream_conf_ctx_t; the core module's
    // main configuration is an ngx_stream_core_main_conf_t.
    let cmcf = unsafe {
        let ctx = (*cf).ctx as *mut ngx::ffi::ngx_stream_conf_ctx_t;
        let idx = (*std::ptr::addr_of!(ngx_stream_core_module)).ctx_index;
        &mut *(*(*ctx).main_conf.add(idx) as *mut ngx_stream_core_main_conf_t)
    };
    let phases: [(u32, ngx_stream_handler_pt); 2] = [
        (ngx_stream_phases_NGX_STREAM_PREREAD_PHASE, Some(preread_handler)),
        (ngx_stream_phases_NGX_STREAM_LOG_PHASE, Some(log_handler)),
    ];
    for (phase, handler) in phases {
        // SAFETY: the phase arrays are arrays of ngx_stream_handler_pt, initialised by the
        // core module before postconfiguration.
        let slot = unsafe { ngx_array_push(&mut cmcf.phases[phase as usize].handlers) }
            as *mut ngx_stream_handler_pt;
        if slot.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        // SAFETY: `slot` is the element just pushed.
        unsafe { *slot = handler };
    }
    NGX_OK as ngx_int_t
}

/// Logs a change of the table's state on the cycle's log (once per cause, by construction
/// of [`Notice`]).
fn log_notice(notice: Notice) {
    match notice {
        Notice::Opened { path, replaced, counters } => {
            let how = if replaced { "re-mapped (the file was replaced)" } else { "mapped" };
            let level = if counters { NGX_LOG_NOTICE } else { NGX_LOG_WARN };
            let note = if counters {
                ""
            } else {
                " read-only: counters are not recorded; give the worker user write access \
                 (group of the file)"
            };
            ngx_log_error!(
                level,
                cycle_log(),
                "gpugate: route table file \"{}\" {how}{note}",
                path.display()
            );
        }
        Notice::Unusable(e) => {
            ngx_log_error!(NGX_LOG_ERR, cycle_log(), "gpugate: {e}; refusing connections");
        }
    }
}

unsafe extern "C" fn preread_handler(s: *mut ngx_stream_session_t) -> ngx_int_t {
    // SAFETY: nginx calls phase handlers with a live session of a configured server.
    let (scf, mcf) = unsafe { (s.gpugate_srv_conf(), s.gpugate_main_conf()) };
    // SAFETY: as above.
    if scf.route != 1 || mcf.source.is_null() || unsafe { s.gpugate_ctx() }.is_some() {
        return NGX_DECLINED as ngx_int_t;
    }
    // SAFETY: a non-null source lives as long as the configuration (pool cleanup).
    let source = unsafe { &*mcf.source };
    // SAFETY: a live session has a live connection whose local_sockaddr is the listening
    // address (for `listen PORT` on a wildcard address too: the port is what matters).
    let (c, port) = unsafe {
        let c = (*s).connection;
        (c, ngx_inet_get_port((*c).local_sockaddr))
    };
    // Allocated before the lookup, which counts the connection as open: a failed allocation
    // after it would leave the active gauge counting a session that never closes in our books.
    // SAFETY: the connection's pool lives as long as the session; SessionCtx is valid
    // all-zero and needs no Drop.
    let ctx = match unsafe { pool_alloc::<SessionCtx>((*c).pool) } {
        Some(p) => p,
        None => return NGX_ERROR as ngx_int_t,
    };
    let now = gpugate_routes::now_ms();
    let (decision, notice) = source.decide(port, now);
    if let Some(n) = notice {
        log_notice(n);
    }
    // SAFETY: `ctx` is a fresh, exclusively owned allocation.
    let ctx_ref = unsafe { &mut *ctx };
    ctx_ref.port = port;
    ctx_ref.decision = decision;
    if let (RouteStatus::Ok, Some(route)) = (decision.status, decision.route) {
        let (sa, len) = RawSockaddr::new(route.upstream);
        ctx_ref.sockaddr = sa;
        ctx_ref.socklen = len;
        // Formatted into the context's own buffer: no allocation per connection.
        let mut cur = std::io::Cursor::new(&mut ctx_ref.name_buf[..]);
        let _ = write!(cur, "{}", route.upstream);
        let n = cur.position() as usize;
        ctx_ref.name = ngx_str_t { len: n, data: ctx_ref.name_buf.as_mut_ptr() };
    }
    // SAFETY: `ctx` was allocated from this session's connection pool.
    unsafe { s.set_gpugate_ctx(ctx) };
    if decision.status == RouteStatus::Ok {
        NGX_DECLINED as ngx_int_t
    } else {
        // Fail closed: finalize the session now; the log phase still runs (access log shows
        // 403 and $gpugate_route_status).
        NGX_STREAM_FORBIDDEN as ngx_int_t
    }
}

unsafe extern "C" fn log_handler(s: *mut ngx_stream_session_t) -> ngx_int_t {
    // SAFETY: nginx runs log handlers with the session still alive.
    let Some(ctx) = (unsafe { s.gpugate_ctx() }) else { return NGX_OK as ngx_int_t };
    // SAFETY: as above; `received` counts bytes from the client, `sent` bytes to it.
    let (bytes_in, bytes_out) = unsafe { ((*s).received, (*(*s).connection).sent) };
    // SAFETY: the decision's table belongs to the configuration's RouteSource, which lives
    // longer than any session of that configuration.
    unsafe {
        count_close(
            &ctx.decision,
            ctx.port,
            u64::try_from(bytes_in).unwrap_or(0),
            u64::try_from(bytes_out).unwrap_or(0),
            gpugate_routes::now_ms(),
        )
    };
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn variable_get(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes a live session and a value record to fill.
    let (ctx, v) = unsafe { (s.gpugate_ctx(), &mut *v) };
    let value: Option<&[u8]> = ctx.and_then(|ctx| {
        let d = &ctx.decision;
        match data {
            VAR_UPSTREAM if d.status == RouteStatus::Ok => {
                // SAFETY: name points into ctx.name_buf, which lives in the session's pool.
                Some(unsafe { std::slice::from_raw_parts(ctx.name.data, ctx.name.len) })
            }
            VAR_UPSTREAM => None,
            // Borrowed from the context in the session's pool, not from a copy.
            VAR_ENV_ID => d.route.as_ref().map(|r| r.env_id.as_str().as_bytes()),
            VAR_SERVICE => d.route.as_ref().map(|r| r.service.as_str().as_bytes()),
            VAR_STATUS => Some(d.status.as_str().as_bytes()),
            _ => None,
        }
    });
    match value {
        Some(bytes) => {
            v.set_len(bytes.len() as u32);
            v.set_valid(1);
            v.set_no_cacheable(0);
            v.set_not_found(0);
            v.data = bytes.as_ptr() as *mut u8;
        }
        None => {
            v.set_not_found(1);
        }
    }
    NGX_OK as ngx_int_t
}

/// The upstream of a session whose lookup found a live route, as the balancer hands it to
/// nginx's connect code: (sockaddr, length, name). Nginx only reads through these pointers.
pub fn peer_of(ctx: &SessionCtx) -> Option<(*mut ngx::ffi::sockaddr, socklen_t, *mut ngx_str_t)> {
    (ctx.decision.status == RouteStatus::Ok).then_some((
        &ctx.sockaddr as *const RawSockaddr as *mut ngx::ffi::sockaddr,
        ctx.socklen,
        &ctx.name as *const ngx_str_t as *mut ngx_str_t,
    ))
}
