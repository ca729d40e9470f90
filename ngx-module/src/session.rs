//! What a session keeps of its lookup (the context in its pool) and the typed accessors over
//! it: the preread handler creates it, the live-session timer, the balancer, the variables
//! and the log phase read it.

use std::cell::Cell;
use std::io::Write;
use std::net::SocketAddr;

use gpugate_routes::{EnvId, Service, SlotKey, WorkerRow};
use ngx::ffi::{ngx_event_t, ngx_stream_session_t, ngx_str_t, socklen_t};

use crate::ffi::{ctx_index, pool_alloc, pool_str, session_entry, set_session_ctx, RawSockaddr, SessionArray};
use crate::hello_scan::HelloScan;
use crate::route_source::{Decision, RouteStatus};

/// What a session keeps of its lookup: a valid Rust value moved into the connection's pool
/// (no Drop).
pub struct SessionCtx {
    /// The slot the session was routed by: its local port, or its name route's slot.
    pub key: SlotKey,
    pub status: RouteStatus,
    pub service: Service,
    pub env_id: EnvId,
    /// The route's owner stamp (tags the counters) and where the close is counted.
    pub owner: u64,
    pub sink: *const crate::route_source::CounterSink,
    /// The worker row its open was counted in.
    pub row: Option<WorkerRow>,
    /// The upstream, for `$gpugate_upstream` and the balancer's peer name.
    pub upstream: Option<SocketAddr>,
    /// The upstream as a socket address, for the balancer.
    pub sockaddr: RawSockaddr,
    pub socklen: socklen_t,
    /// The port's revoke epoch at open and the table mapping it came from.
    pub epoch: u64,
    pub table_serial: u32,
    /// The live-session timer's state.
    pub live: Live,
    /// Non-null only in a context that stands in while a passthrough ClientHello is still
    /// arriving: where its reading stands (in the session's pool). Such a context holds no
    /// decision and [`session_ctx`] does not return it.
    pub hello: *mut HelloScan,
}

/// The connection pool's blocks are 256 bytes, of which 176 serve small allocations; the
/// context stays below that so it is carved from a block, not malloc'ed on its own.
pub const SESSION_CTX_SIZE: usize = std::mem::size_of::<SessionCtx>();
const _: () = assert!(SESSION_CTX_SIZE <= 176);

impl SessionCtx {
    pub fn new(d: &Decision) -> SessionCtx {
        let (sockaddr, socklen) = match (d.status, d.route) {
            (RouteStatus::Ok, Some(r)) => RawSockaddr::new(r.upstream),
            _ => RawSockaddr::new(SocketAddr::from(([0, 0, 0, 0], 0))),
        };
        SessionCtx {
            key: d.key,
            status: d.status,
            service: d.route.map_or(Service::Other, |r| r.service),
            env_id: d.route.map_or(EnvId::default(), |r| r.env_id),
            owner: d.owner,
            sink: d.sink,
            row: d.row,
            upstream: d.route.filter(|_| d.status == RouteStatus::Ok).map(|r| r.upstream),
            sockaddr,
            socklen,
            epoch: d.epoch,
            table_serial: d.table_serial,
            live: Live::new(),
            hello: std::ptr::null_mut(),
        }
    }

    /// The stand-in context of a session whose ClientHello is still arriving.
    pub fn pending(hello: *mut HelloScan) -> SessionCtx {
        SessionCtx { hello, ..SessionCtx::new(&Decision::pending()) }
    }

    /// Whether the lookup found a route (live or expired): env id and service are known.
    pub fn has_route(&self) -> bool {
        matches!(self.status, RouteStatus::Ok | RouteStatus::Expired)
    }

    /// The decision again, for counting, flushing and revoke checks.
    pub fn decision(&self) -> Decision {
        Decision {
            status: self.status,
            key: self.key,
            route: None,
            owner: self.owner,
            sink: self.sink,
            row: self.row,
            epoch: self.epoch,
            table_serial: self.table_serial,
        }
    }
}

/// The session's route context, if the preread handler decided one.
///
/// # Safety
/// `s` must be a live session of a configuration this module is part of.
pub unsafe fn session_ctx<'a>(s: *mut ngx_stream_session_t) -> Option<&'a SessionCtx> {
    // SAFETY: our entry of the session's ctx array is null or a SessionCtx moved into the
    // session's pool by the preread handler.
    let ctx = unsafe { (session_entry(s, SessionArray::Ctx, ctx_index()) as *const SessionCtx).as_ref() };
    ctx.filter(|c| c.hello.is_null())
}

/// Where the reading of the session's ClientHello stands, allocated (with a stand-in
/// context) at the first call; `None` when the pool is out of memory.
///
/// # Safety
/// `s` must be a live session of a configuration this module is part of, with no decided
/// context.
pub unsafe fn hello_scan<'a>(s: *mut ngx_stream_session_t) -> Option<&'a mut HelloScan> {
    // SAFETY: as in `session_ctx`.
    let ctx = unsafe { session_entry(s, SessionArray::Ctx, ctx_index()) } as *mut SessionCtx;
    // SAFETY: a non-null entry is a context in the session's pool; a pending one's `hello`
    // points at a HelloScan in the same pool, used by this session only.
    if let Some(ctx) = unsafe { ctx.as_mut() } {
        // SAFETY: as above.
        return unsafe { ctx.hello.as_mut() };
    }
    // SAFETY: a live session's connection pool; neither type needs Drop.
    let pool = unsafe { (*(*s).connection).pool };
    // SAFETY: as above.
    let scan = unsafe { pool_alloc(pool, HelloScan::default()) }?;
    // SAFETY: as above.
    let ctx = unsafe { pool_alloc(pool, SessionCtx::pending(scan)) }?;
    // SAFETY: `ctx` lives in this session's pool.
    unsafe { set_session_ctx(s, ctx_index(), ctx as *mut std::ffi::c_void) };
    // SAFETY: `scan` was just allocated in the pool and nothing else refers to it yet.
    unsafe { scan.as_mut() }
}

/// What a session keeps for its timer.
pub struct Live {
    /// The timer event (in the session's pool); null when live accounting is off.
    pub timer: Cell<*mut ngx_event_t>,
    /// Bytes already flushed: client to workspace, workspace to client.
    pub flushed_in: Cell<u64>,
    pub flushed_out: Cell<u64>,
    /// Set when the timer closed the session for a revoke.
    pub revoked: Cell<bool>,
}

impl Live {
    pub fn new() -> Live {
        Live {
            timer: Cell::new(std::ptr::null_mut()),
            flushed_in: Cell::new(0),
            flushed_out: Cell::new(0),
            revoked: Cell::new(false),
        }
    }
}

/// Formats the session's upstream ("10.0.0.5:22", "[::1]:22") into the connection's pool.
///
/// # Safety
/// `s` must be a live session.
pub unsafe fn upstream_name(s: *mut ngx_stream_session_t, ctx: &SessionCtx) -> Option<ngx_str_t> {
    let up = ctx.upstream?;
    let mut buf = [0u8; 64];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    write!(cur, "{up}").ok()?;
    let n = usize::try_from(cur.position()).ok()?;
    // SAFETY: a live session's connection pool.
    unsafe { pool_str((*(*s).connection).pool, &buf[..n]) }
}

/// The upstream of a session whose lookup found a live route, as the balancer hands it to
/// nginx's connect code: (sockaddr, length). Nginx only reads through the pointer.
pub fn peer_of(ctx: &SessionCtx) -> Option<(*mut ngx::ffi::sockaddr, socklen_t)> {
    (ctx.status == RouteStatus::Ok).then_some((
        &ctx.sockaddr as *const RawSockaddr as *mut ngx::ffi::sockaddr,
        ctx.socklen,
    ))
}
