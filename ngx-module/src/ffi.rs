//! Raw-pointer plumbing between nginx's stream structs and the module's typed state.
//! Every accessor of nginx memory is here; the handlers above it work on references.

use std::ffi::c_void;
use std::net::SocketAddr;

use ngx::ffi::{
    ngx_conf_t, ngx_cycle, ngx_pcalloc, ngx_pool_t, ngx_stream_conf_ctx_t, ngx_stream_session_t,
    ngx_str_t, sockaddr_in, sockaddr_in6, socklen_t, AF_INET, AF_INET6,
};

use crate::conf::{MainConf, SrvConf};
use crate::ngx_stream_gpugate_module;

/// Index of this module's slot in the stream contexts (fixed once modules are loaded).
fn ctx_index() -> usize {
    // SAFETY: nginx writes ctx_index while loading modules, before any configuration or
    // session callback of this module runs; afterwards it is only read.
    unsafe { (*std::ptr::addr_of!(ngx_stream_gpugate_module)).ctx_index }
}

/// Extension methods on a stream session pointer.
pub trait SessionExt {
    /// This module's main configuration.
    ///
    /// # Safety
    /// `self` must be a live session of a server in a configuration this module is part of.
    unsafe fn gpugate_main_conf<'a>(self) -> &'a MainConf;
    /// This module's server configuration.
    ///
    /// # Safety
    /// As for `gpugate_main_conf`.
    unsafe fn gpugate_srv_conf<'a>(self) -> &'a SrvConf;
    /// The session's route context, if the preread handler set one.
    ///
    /// # Safety
    /// `self` must be a live session.
    unsafe fn gpugate_ctx<'a>(self) -> Option<&'a crate::handler::SessionCtx>;
    /// Stores the route context.
    ///
    /// # Safety
    /// `self` must be a live session; `ctx` must be allocated from its connection's pool.
    unsafe fn set_gpugate_ctx(self, ctx: *mut crate::handler::SessionCtx);
}

impl SessionExt for *mut ngx_stream_session_t {
    unsafe fn gpugate_main_conf<'a>(self) -> &'a MainConf {
        // SAFETY: the caller guarantees a live session; its main_conf array holds one entry
        // per stream module, ours created by `create_main_conf` and living as long as the
        // configuration cycle, which outlives every session.
        unsafe { &*(*(*self).main_conf.add(ctx_index()) as *const MainConf) }
    }

    unsafe fn gpugate_srv_conf<'a>(self) -> &'a SrvConf {
        // SAFETY: as above, for the server configuration array.
        unsafe { &*(*(*self).srv_conf.add(ctx_index()) as *const SrvConf) }
    }

    unsafe fn gpugate_ctx<'a>(self) -> Option<&'a crate::handler::SessionCtx> {
        // SAFETY: the ctx array of a live session has one entry per stream module; ours is
        // null or a SessionCtx allocated from the session's pool by the preread handler.
        unsafe { (*(*self).ctx.add(ctx_index()) as *const crate::handler::SessionCtx).as_ref() }
    }

    unsafe fn set_gpugate_ctx(self, ctx: *mut crate::handler::SessionCtx) {
        // SAFETY: see `gpugate_ctx`; the caller allocated `ctx` from the session's pool.
        unsafe { *(*self).ctx.add(ctx_index()) = ctx as *mut c_void };
    }
}

/// The main configuration of this module while a stream block is being parsed.
///
/// # Safety
/// `cf` must be the configuration being parsed inside a `stream {}` block.
pub unsafe fn conf_main_conf<'a>(cf: *mut ngx_conf_t) -> &'a mut MainConf {
    // SAFETY: inside the stream block, cf->ctx is the block's ngx_stream_conf_ctx_t, whose
    // main_conf array holds our MainConf (created by create_main_conf).
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
        &mut *(*(*ctx).main_conf.add(ctx_index()) as *mut MainConf)
    }
}

/// Allocates a zeroed `T` from `pool`; `None` if nginx is out of memory.
///
/// # Safety
/// `pool` must be a live pool; `T` must be valid when all-zero and need no `Drop`.
pub unsafe fn pool_alloc<T>(pool: *mut ngx_pool_t) -> Option<*mut T> {
    // SAFETY: the caller passes a live pool; ngx_pcalloc returns zeroed memory aligned for
    // any type up to NGX_ALIGNMENT, enough for the module's structs (no over-aligned fields).
    let p = unsafe { ngx_pcalloc(pool, std::mem::size_of::<T>()) } as *mut T;
    (!p.is_null()).then_some(p)
}

/// The string arguments of the directive being parsed (the directive name first).
///
/// # Safety
/// `cf` must be a configuration in the middle of a directive handler.
pub unsafe fn conf_args<'a>(cf: *mut ngx_conf_t) -> &'a [ngx_str_t] {
    // SAFETY: during a directive handler cf->args is an array of ngx_str_t with at least
    // the directive's name.
    unsafe {
        let args = &*(*cf).args;
        std::slice::from_raw_parts(args.elts as *const ngx_str_t, args.nelts)
    }
}

/// The bytes of an nginx string.
pub fn str_bytes(s: &ngx_str_t) -> &[u8] {
    if s.len == 0 || s.data.is_null() {
        return &[];
    }
    // SAFETY: a non-empty ngx_str_t points at `len` readable bytes for its lifetime.
    unsafe { std::slice::from_raw_parts(s.data, s.len) }
}

/// The cycle's log, for messages about the table rather than about one connection.
pub fn cycle_log() -> *mut ngx::ffi::ngx_log_t {
    // SAFETY: ngx_cycle is set before any module callback runs and is only replaced by the
    // master between configurations; workers read it from a single thread.
    unsafe { (*ngx_cycle).log }
}

/// A socket address in the form nginx's connect code takes.
#[derive(Clone, Copy)]
#[repr(C)]
pub union RawSockaddr {
    v4: sockaddr_in,
    v6: sockaddr_in6,
}

impl RawSockaddr {
    /// Encodes `addr`; returns the storage and its length.
    pub fn new(addr: SocketAddr) -> (RawSockaddr, socklen_t) {
        match addr {
            SocketAddr::V4(a) => {
                // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
                let mut sa: sockaddr_in = unsafe { std::mem::zeroed() };
                sa.sin_family = AF_INET as _;
                sa.sin_port = a.port().to_be();
                sa.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                (RawSockaddr { v4: sa }, std::mem::size_of::<sockaddr_in>() as socklen_t)
            }
            SocketAddr::V6(a) => {
                // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value.
                let mut sa: sockaddr_in6 = unsafe { std::mem::zeroed() };
                sa.sin6_family = AF_INET6 as _;
                sa.sin6_port = a.port().to_be();
                sa.sin6_scope_id = a.scope_id();
                let octets = a.ip().octets();
                // SAFETY: in6_addr is exactly 16 bytes of address in network order.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        octets.as_ptr(),
                        std::ptr::addr_of_mut!(sa.sin6_addr) as *mut u8,
                        16,
                    )
                };
                (RawSockaddr { v6: sa }, std::mem::size_of::<sockaddr_in6>() as socklen_t)
            }
        }
    }
}
