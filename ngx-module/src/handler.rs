//! The per-connection work: the preread lookup (by local port, or by TLS server name: from
//! the handshake nginx terminated, or from the ClientHello in passthrough), the log-phase
//! counters, the variables, and the worker start and exit hooks.
//!
//! Preread asks the table once where the connection's local port goes and keeps the answer
//! in the session context; everything later (variables, the balancer, the counters at close)
//! reads that snapshot, so a route changed mid-session never splits one connection's view.

use gpugate_routes::{NameRefusal, Outcome};
use ngx::ffi::{
    ngx_array_push, ngx_conf_t, ngx_cycle_t, ngx_inet_get_port, ngx_int_t, ngx_stream_add_variable, NGX_AGAIN,
    ngx_stream_core_main_conf_t, ngx_stream_core_module, ngx_stream_handler_pt,
    ngx_stream_phases_NGX_STREAM_LOG_PHASE, ngx_stream_phases_NGX_STREAM_PREREAD_PHASE,
    ngx_stream_session_t, ngx_stream_variable_value_t, ngx_str_t, NGX_DECLINED,
    NGX_ERROR, NGX_OK, NGX_STREAM_BAD_GATEWAY,
    NGX_STREAM_FORBIDDEN, NGX_STREAM_VAR_NOCACHEABLE,
};

use crate::conf::{cycle_source, session_main_conf, session_srv_conf, NAME_OFF, NAME_TERMINATE};
use crate::ffi::{ctx_index, monotonic_ms, pool_alloc, preread_bytes, preread_room, set_session_ctx, tls_server_name, TlsName};
use crate::live;
use crate::notices::log_notices;
use crate::route_source::RouteStatus;
use crate::session::{hello_scan, session_ctx, upstream_name, SessionCtx};
use crate::sni::Hello;

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

unsafe extern "C" fn preread_handler(s: *mut ngx_stream_session_t) -> ngx_int_t {
    // SAFETY: nginx calls phase handlers with a live session of a configured server.
    let (scf, mcf) = unsafe { (session_srv_conf(s), session_main_conf(s)) };
    let by_port = scf.route == 1;
    // SAFETY: as above.
    if !(by_port || scf.name_route != NAME_OFF) || mcf.source.is_null() || unsafe { session_ctx(s) }.is_some() {
        return NGX_DECLINED as ngx_int_t;
    }
    // SAFETY: a non-null source lives as long as the configuration (pool cleanup).
    let source = unsafe { &*mcf.source };
    // SAFETY: a live session has a live connection.
    let c = unsafe { (*s).connection };
    let (mono, wall) = (monotonic_ms(), gpugate_routes::now_ms());
    let (decision, notices) = if by_port {
        // SAFETY: the connection's local_sockaddr is the listening address (for `listen PORT`
        // on a wildcard address too: the port is what matters).
        let port = unsafe { ngx_inet_get_port((*c).local_sockaddr) };
        source.decide(port, mono, wall)
    } else if scf.name_route == NAME_TERMINATE {
        // SAFETY: a live connection; its TLS state (if any) was set up by the ssl phase.
        match unsafe { tls_server_name(c) } {
            TlsName::Name(name) => source.decide_name(name, scf.domain(), mono, wall),
            TlsName::NoName => source.refuse_name(NameRefusal::NoName, mono),
            // `gpugate_name_route terminate` on a listen without `ssl`.
            TlsName::NotTls => source.refuse_name(NameRefusal::NotTls, mono),
        }
    } else {
        // SAFETY: a live connection; its preread buffer (if any) holds what the client sent.
        let Some(sent) = (unsafe { preread_bytes(c) }) else { return NGX_AGAIN as ngx_int_t };
        // SAFETY: a live session without a decided context (checked above).
        let Some(scan) = (unsafe { hello_scan(s) }) else { return NGX_ERROR as ngx_int_t };
        // Resumes where the last wake-up stopped: a hello dribbled byte by byte is not
        // parsed again at every byte.
        match scan.feed(sent) {
            // Read on while the buffer has room (`preread_buffer_size`); nginx's
            // `preread_timeout` ends a client that stops sending.
            // SAFETY: a live connection with a preread buffer.
            Hello::Incomplete if sent.len() < PREREAD_FULL && unsafe { preread_room(c) } > 0 => {
                return NGX_AGAIN as ngx_int_t;
            }
            Hello::Incomplete | Hello::NotTls => source.refuse_name(NameRefusal::NotTls, mono),
            Hello::NoName => source.refuse_name(NameRefusal::NoName, mono),
            Hello::Name(name) => source.decide_name(name.as_bytes(), scf.domain(), mono, wall),
        }
    };
    log_notices(notices);
    // SAFETY: a live connection's pool.
    let pool = unsafe { (*c).pool };
    // SAFETY: the connection's pool lives as long as the session; SessionCtx needs no Drop.
    let Some(ctx) = (unsafe { pool_alloc(pool, SessionCtx::new(&decision)) }) else {
        // Out of memory: the session never reaches the log phase's count, so undo the open.
        source.close(&decision, Outcome::UpstreamFailed, 0, 0, gpugate_routes::now_ms());
        return NGX_ERROR as ngx_int_t;
    };
    // SAFETY: `ctx` was allocated from this session's connection pool.
    unsafe { set_session_ctx(s, ctx_index(), ctx as *mut std::ffi::c_void) };
    if decision.status == RouteStatus::Ok {
        if scf.flush_interval > 0 {
            // SAFETY: a live session whose context was just set; without memory for the timer
            // the session runs with its bytes counted at close only.
            let _ = unsafe { live::start(s, &*ctx, scf.flush_interval) };
        }
        NGX_DECLINED as ngx_int_t
    } else {
        // Fail closed: finalize the session now; the log phase still runs (access log shows
        // 403 and $gpugate_route_status).
        NGX_STREAM_FORBIDDEN as ngx_int_t
    }
}

/// A ClientHello this long that still is not whole is refused rather than waited for.
const PREREAD_FULL: usize = 16 * 1024 + 1024;

unsafe extern "C" fn log_handler(s: *mut ngx_stream_session_t) -> ngx_int_t {
    // SAFETY: nginx runs log handlers with the session still alive.
    let Some(ctx) = (unsafe { session_ctx(s) }) else { return NGX_OK as ngx_int_t };
    // SAFETY: as above.
    let mcf = unsafe { session_main_conf(s) };
    // SAFETY: a session with a context had a source when preread ran; the source lives as
    // long as the configuration.
    let Some(source) = (unsafe { mcf.source.as_ref() }) else { return NGX_OK as ngx_int_t };
    // SAFETY: the session's context; its timer (if any) is in its live pool.
    unsafe { live::stop(ctx) };
    // SAFETY: as above; `status` is the session's final status (502 when the upstream could
    // not be connected).
    let (status, (bytes_in, bytes_out)) = unsafe { ((*s).status, live::take_pending(s, &ctx.live)) };
    let outcome = if ctx.live.revoked.get() {
        Outcome::Revoked
    } else if status == NGX_STREAM_BAD_GATEWAY as usize {
        Outcome::UpstreamFailed
    } else {
        Outcome::Proxied
    };
    source.close(&ctx.decision(), outcome, bytes_in, bytes_out, gpugate_routes::now_ms());
    NGX_OK as ngx_int_t
}

/// `init_process`: a worker maps the table and claims its counter row, clearing the rows of
/// workers that died (the master respawns a killed worker at once).
pub unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the live cycle whose configuration the worker runs.
    if let Some(source) = unsafe { cycle_source(cycle) } {
        log_notices(source.worker_start(monotonic_ms()));
    }
    NGX_OK as ngx_int_t
}

/// `exit_process`: a worker gives its counter row back (its open sessions end with it).
pub unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    // SAFETY: as above.
    if let Some(source) = unsafe { cycle_source(cycle) } {
        source.worker_exit();
    }
}

unsafe extern "C" fn variable_get(
    s: *mut ngx_stream_session_t,
    v: *mut ngx_stream_variable_value_t,
    data: usize,
) -> ngx_int_t {
    // SAFETY: nginx passes a live session and a value record to fill.
    let (ctx, v) = unsafe { (session_ctx(s), &mut *v) };
    let value: Option<&[u8]> = ctx.and_then(|ctx| match data {
        VAR_UPSTREAM => {
            // SAFETY: a live session; the name lives in its pool.
            let name = unsafe { upstream_name(s, ctx) }?;
            // SAFETY: `name` points at `len` bytes in the session's pool.
            Some(unsafe { std::slice::from_raw_parts(name.data, name.len) })
        }
        // Borrowed from the context in the session's pool, not from a copy.
        VAR_ENV_ID if ctx.has_route() => Some(ctx.env_id.as_str().as_bytes()),
        VAR_SERVICE if ctx.has_route() => Some(ctx.service.as_str().as_bytes()),
        // A session the writer revoked says so in the access log (read in the log phase).
        VAR_STATUS if ctx.live.revoked.get() => Some(b"revoked".as_slice()),
        VAR_STATUS => Some(ctx.status.as_str().as_bytes()),
        _ => None,
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
