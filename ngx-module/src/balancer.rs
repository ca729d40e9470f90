//! `gpugate_balancer`: an `upstream {}` whose peer is the session's route, taken as a socket
//! address straight from the preread snapshot — no address text is parsed per connection,
//! unlike `proxy_pass $gpugate_upstream`.
//!
//! ```nginx
//! upstream gpugate { gpugate_balancer; }
//! server { listen 20000-20999; gpugate_route on; proxy_pass gpugate; }
//! ```

use std::ffi::{c_char, c_void};

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_array_push, ngx_command_t, ngx_conf_t, ngx_event_get_peer_pt, ngx_int_t,
    ngx_peer_connection_t, ngx_stream_conf_ctx_t, ngx_stream_session_t,
    ngx_stream_upstream_module, ngx_stream_upstream_server_t, ngx_stream_upstream_srv_conf_t,
    ngx_uint_t, NGX_BUSY, NGX_LOG_EMERG, NGX_OK, NGX_STREAM_UPSTREAM_CREATE,
};
use ngx::ngx_conf_log_error;

use crate::ffi::str_bytes;
use crate::session::{peer_of, session_ctx, upstream_name};

/// `gpugate_balancer;` inside `upstream {}`.
pub unsafe extern "C" fn cmd_set_balancer(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: the directive is registered for NGX_STREAM_UPS_CONF, so cf->ctx is the upstream
    // block's ngx_stream_conf_ctx_t and its srv_conf holds the upstream module's srv conf.
    let uscf = unsafe {
        let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
        let idx = (*std::ptr::addr_of!(ngx_stream_upstream_module)).ctx_index;
        &mut *(*(*ctx).srv_conf.add(idx) as *mut ngx_stream_upstream_srv_conf_t)
    };
    if uscf.peer.init_upstream.is_some() {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"gpugate_balancer\" is duplicate or combined with another balancing method in \
             upstream \"{}\"",
            String::from_utf8_lossy(str_bytes(&uscf.host))
        );
        return NGX_CONF_ERROR;
    }
    uscf.peer.init_upstream = Some(init_upstream);
    uscf.flags = NGX_STREAM_UPSTREAM_CREATE as ngx_uint_t;
    // nginx requires a server in every upstream block; the peer comes from the route table,
    // so add a placeholder with no addresses instead of making operators write a fake one.
    // SAFETY: `servers` is the block's array of ngx_stream_upstream_server_t.
    let placeholder = unsafe { ngx_array_push(uscf.servers) } as *mut ngx_stream_upstream_server_t;
    if placeholder.is_null() {
        return NGX_CONF_ERROR;
    }
    // SAFETY: the element was just pushed; all-zero is a valid server record (no addresses).
    unsafe { std::ptr::write_bytes(placeholder, 0, 1) };
    NGX_CONF_OK
}

unsafe extern "C" fn init_upstream(
    cf: *mut ngx_conf_t,
    us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: nginx passes the upstream's srv conf whose init_upstream we set.
    let us = unsafe { &mut *us };
    // SAFETY: `servers` is an array of ngx_stream_upstream_server_t.
    let servers = unsafe {
        let a = &*us.servers;
        std::slice::from_raw_parts(a.elts as *const ngx_stream_upstream_server_t, a.nelts)
    };
    if servers.iter().any(|s| s.naddrs != 0 || s.name.len != 0) {
        ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"gpugate_balancer\" upstream \"{}\" must not contain \"server\" directives: \
             the peer of each connection comes from the route table",
            String::from_utf8_lossy(str_bytes(&us.host))
        );
        return ngx::ffi::NGX_ERROR as ngx_int_t;
    }
    us.peer.init = Some(init_peer);
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn init_peer(
    s: *mut ngx_stream_session_t,
    _us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: called by the proxy module with a live session whose upstream is allocated.
    let pc = unsafe { &mut (*(*s).upstream).peer };
    pc.data = s as *mut c_void;
    pc.get = GET_PEER;
    pc.free = Some(free_peer);
    pc.tries = 1;
    NGX_OK as ngx_int_t
}

const GET_PEER: ngx_event_get_peer_pt = Some(get_peer);

unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    let s = data as *mut ngx_stream_session_t;
    // SAFETY: `data` is the session set by init_peer, alive while it connects; `pc` is its
    // upstream's peer connection.
    let (ctx, pc) = unsafe { (session_ctx(s), &mut *pc) };
    let Some(ctx) = ctx else { return NGX_BUSY as ngx_int_t };
    match peer_of(ctx) {
        Some((sockaddr, socklen)) => {
            // The peer's name (logs, $upstream_addr), formatted into the session's pool.
            // SAFETY: a live session; the name lives in its pool, as long as the peer.
            let Some(name) = (unsafe { upstream_name(s, ctx) }) else {
                return ngx::ffi::NGX_ERROR as ngx_int_t;
            };
            // SAFETY: as above: a pool allocation for the ngx_str_t itself.
            let Some(name) = (unsafe { crate::ffi::pool_alloc((*(*s).connection).pool, name) }) else {
                return ngx::ffi::NGX_ERROR as ngx_int_t;
            };
            pc.sockaddr = sockaddr;
            pc.socklen = socklen;
            pc.name = name;
            NGX_OK as ngx_int_t
        }
        // Used in a server without `gpugate_route on`, or (never, since preread finalises
        // such sessions) without a live route: the proxy logs "no live upstreams".
        None => NGX_BUSY as ngx_int_t,
    }
}

unsafe extern "C" fn free_peer(pc: *mut ngx_peer_connection_t, _data: *mut c_void, _state: ngx_uint_t) {
    // SAFETY: `pc` is the peer connection get_peer filled; one try only.
    unsafe { (*pc).tries = 0 };
}
