//! The FFI floor: raw-pointer plumbing over nginx's structs. It knows nothing of the module's
//! own types (the typed accessors live beside those types, in `conf.rs` and `handler.rs`), so
//! imports flow one way: they import this, this imports nothing of ours.

use std::ffi::c_void;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use ngx::ffi::{
    ngx_conf_t, ngx_connection_t, ngx_current_msec, ngx_cycle, ngx_cycle_t, ngx_palloc, ngx_pool_t,
    SSL_get_servername, TLSEXT_NAMETYPE_host_name,
    ngx_stream_conf_ctx_t, ngx_stream_module, ngx_stream_session_t, ngx_str_t, sockaddr_in,
    sockaddr_in6, socklen_t, AF_INET, AF_INET6,
};

/// This module's slot in the stream contexts. nginx numbers the modules while loading them,
/// before any stream callback runs; the module wiring records the number at the first one of
/// each configuration (`create_main_conf`), so code below the wiring reads it here without
/// importing the wiring back.
static CTX_INDEX: AtomicUsize = AtomicUsize::new(0);

/// Records this module's `ctx_index` (the wiring, at the start of each configuration).
pub fn record_ctx_index(index: usize) {
    CTX_INDEX.store(index, Ordering::Relaxed);
}

/// This module's `ctx_index`, as [`record_ctx_index`] recorded it.
pub fn ctx_index() -> usize {
    CTX_INDEX.load(Ordering::Relaxed)
}

/// Which of a session's per-module arrays to read.
#[derive(Clone, Copy)]
pub enum SessionArray {
    MainConf,
    SrvConf,
    Ctx,
}

/// Entry `idx` of one of a session's per-module arrays.
///
/// # Safety
/// `s` must be a live session and `idx` a stream module's `ctx_index`.
pub unsafe fn session_entry(s: *mut ngx_stream_session_t, which: SessionArray, idx: usize) -> *mut c_void {
    // SAFETY: the caller guarantees a live session; each array has one entry per stream
    // module, so `idx` is in bounds.
    unsafe {
        match which {
            SessionArray::MainConf => *(*s).main_conf.add(idx),
            SessionArray::SrvConf => *(*s).srv_conf.add(idx),
            SessionArray::Ctx => *(*s).ctx.add(idx),
        }
    }
}

/// Sets entry `idx` of a session's module context array.
///
/// # Safety
/// As for [`session_entry`]; `p` must live as long as the session (its pool).
pub unsafe fn set_session_ctx(s: *mut ngx_stream_session_t, idx: usize, p: *mut c_void) {
    // SAFETY: the caller's contract, as above.
    unsafe { *(*s).ctx.add(idx) = p };
}

/// Main configuration entry `idx` of the `stream {}` block being parsed.
///
/// # Safety
/// `cf` must be the configuration being parsed inside a `stream {}` block.
pub unsafe fn conf_main_conf(cf: *mut ngx_conf_t, idx: usize) -> *mut c_void {
    // SAFETY: inside the stream block, cf->ctx is the block's ngx_stream_conf_ctx_t, whose
    // main_conf array has one entry per stream module.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
        *(*ctx).main_conf.add(idx)
    }
}

/// Main configuration entry `idx` of a cycle's `stream {}` block; null without one.
///
/// # Safety
/// `cycle` must be a live cycle whose configuration was parsed.
pub unsafe fn cycle_main_conf(cycle: *mut ngx_cycle_t, idx: usize) -> *mut c_void {
    // SAFETY: conf_ctx has one entry per module (indexed by the module's `index`); the
    // stream module's entry is null or the stream block's ngx_stream_conf_ctx_t.
    unsafe {
        let stream = *(*cycle).conf_ctx.add((*std::ptr::addr_of!(ngx_stream_module)).index);
        if stream.is_null() {
            return std::ptr::null_mut();
        }
        *(*(stream as *mut ngx_stream_conf_ctx_t)).main_conf.add(idx)
    }
}

/// Moves `value` into memory allocated from `pool`; `None` if nginx is out of memory.
///
/// # Safety
/// `pool` must be a live pool; `T` must need no `Drop` (the pool frees the bytes only).
pub unsafe fn pool_alloc<T>(pool: *mut ngx_pool_t, value: T) -> Option<*mut T> {
    const { assert!(std::mem::align_of::<T>() <= 8, "nginx pools align to 8 bytes") };
    // SAFETY: the caller passes a live pool; ngx_palloc returns memory aligned to
    // NGX_ALIGNMENT (8), enough for T (checked above).
    let p = unsafe { ngx_palloc(pool, std::mem::size_of::<T>()) } as *mut T;
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a fresh, suitably sized and aligned allocation: written, not read.
    unsafe { p.write(value) };
    Some(p)
}

/// Copies `bytes` into memory allocated from `pool`, as an nginx string.
///
/// # Safety
/// `pool` must be a live pool.
pub unsafe fn pool_str(pool: *mut ngx_pool_t, bytes: &[u8]) -> Option<ngx_str_t> {
    // SAFETY: a live pool; the allocation is sized for `bytes`.
    let p = unsafe { ngx_palloc(pool, bytes.len().max(1)) } as *mut u8;
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` has room for `bytes`, which do not overlap a fresh allocation.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len()) };
    Some(ngx_str_t { len: bytes.len(), data: p })
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

/// nginx's cached monotonic time in milliseconds (updated once per event-loop turn).
pub fn monotonic_ms() -> u64 {
    // SAFETY: a plain integer nginx updates from its single event-loop thread, which is the
    // thread every module callback runs on.
    unsafe { ngx_current_msec as u64 }
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
                // Routes never carry a scope id (the table refuses them).
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

/// What a connection's TLS state says about the server name the client asked for.
pub enum TlsName<'a> {
    /// The connection has no TLS (a listen without `ssl`).
    NotTls,
    /// TLS without a server name (no SNI).
    NoName,
    /// The name, as sent.
    Name(&'a [u8]),
}

/// The server name of the TLS handshake nginx terminated on `c`.
///
/// # Safety
/// `c` must be a live connection whose handshake (if any) is complete (the ssl phase ran).
pub unsafe fn tls_server_name<'a>(c: *mut ngx_connection_t) -> TlsName<'a> {
    // SAFETY: a live connection; `ssl` is null or nginx's TLS state of it.
    let ssl = unsafe { (*c).ssl };
    if ssl.is_null() {
        return TlsName::NotTls;
    }
    // SAFETY: a live TLS connection after its handshake; the name is owned by the SSL object,
    // which lives as long as the connection.
    let name = unsafe { SSL_get_servername((*ssl).connection, TLSEXT_NAMETYPE_host_name as i32) };
    if name.is_null() {
        return TlsName::NoName;
    }
    // SAFETY: OpenSSL returns a NUL-terminated string.
    TlsName::Name(unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes())
}

/// What the client sent so far (`None` before nginx made the preread buffer).
///
/// # Safety
/// `c` must be a live connection.
pub unsafe fn preread_bytes<'a>(c: *mut ngx_connection_t) -> Option<&'a [u8]> {
    // SAFETY: a live connection; its buffer is null or nginx's preread buffer.
    let b = unsafe { (*c).buffer };
    if b.is_null() {
        return None;
    }
    // SAFETY: pos..last of a temp buffer are the bytes read into it.
    unsafe {
        let len = usize::try_from((*b).last.offset_from((*b).pos)).ok()?;
        Some(std::slice::from_raw_parts((*b).pos, len))
    }
}

/// Free room left in the preread buffer (`preread_buffer_size`); 1 before there is one.
///
/// # Safety
/// `c` must be a live connection.
pub unsafe fn preread_room(c: *mut ngx_connection_t) -> usize {
    // SAFETY: as for preread_bytes.
    unsafe {
        let b = (*c).buffer;
        if b.is_null() {
            return 1;
        }
        usize::try_from((*b).end.offset_from((*b).last)).unwrap_or(0)
    }
}
