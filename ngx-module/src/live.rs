//! The live-session timer: every `gpugate_flush_interval` each open session adds the bytes it
//! moved since its last flush to its route's counters, and is closed if its port's revoke
//! epoch moved on since it opened. One timer per session, allocated from the session's pool,
//! cancelable (a worker shutting down gracefully does not wait for it) and deleted when the
//! session ends; the log phase makes the last flush, so the totals are exact.

use std::ffi::c_void;

use ngx::ffi::{
    ngx_add_timer, ngx_close_connection, ngx_current_msec, ngx_del_timer, ngx_event_t, ngx_msec_t,
    ngx_resolve_name_done, ngx_stream_finalize_session, ngx_stream_session_t, NGX_LOG_INFO,
    NGX_STREAM_OK,
};
use ngx::ngx_log_error;

use crate::conf::{session_main_conf, session_srv_conf};
use crate::ffi::pool_alloc;
use crate::session::{session_ctx, Live, SessionCtx};
use crate::route_source::grid_delay;

/// Arms `ev` for the next tick.
///
/// # Safety
/// `ev` must be a live event of a live session.
unsafe fn arm(ev: *mut ngx_event_t, interval: ngx_msec_t) {
    // SAFETY: nginx's cached time, read on its only thread; the caller's contract for `ev`.
    unsafe { ngx_add_timer(ev, grid_delay(ngx_current_msec as u64, interval as u64) as ngx_msec_t) };
}

/// Bytes the session moved since its last flush, marked as flushed.
///
/// # Safety
/// `s` must be a live session.
pub unsafe fn take_pending(s: *mut ngx_stream_session_t, live: &Live) -> (u64, u64) {
    // SAFETY: a live session and its connection; `received` counts bytes from the client,
    // the connection's `sent` bytes to it.
    let (rx, tx) = unsafe { ((*s).received, (*(*s).connection).sent) };
    let (rx, tx) = (u64::try_from(rx).unwrap_or(0), u64::try_from(tx).unwrap_or(0));
    let d_in = rx.saturating_sub(live.flushed_in.replace(rx));
    let d_out = tx.saturating_sub(live.flushed_out.replace(tx));
    (d_in, d_out)
}

/// Starts the session's timer (a session of a live route, `interval` > 0). `false` if the
/// pool is out of memory (the session then runs without live flushes).
///
/// # Safety
/// `s` must be a live session whose context is `ctx`.
pub unsafe fn start(s: *mut ngx_stream_session_t, ctx: &SessionCtx, interval: ngx_msec_t) -> bool {
    // SAFETY: an all-zero ngx_event_t is nginx's own idea of a fresh event (it callocs them).
    let ev: ngx_event_t = unsafe { std::mem::zeroed() };
    // SAFETY: a live session's connection and pool; ngx_event_t needs no Drop.
    let Some(ev) = (unsafe { pool_alloc((*(*s).connection).pool, ev) }) else { return false };
    // SAFETY: `ev` is the event just allocated; the connection's log lives as long as it.
    unsafe {
        (*ev).handler = Some(on_tick);
        (*ev).data = s as *mut c_void;
        (*ev).log = (*(*s).connection).log;
        (*ev).set_cancelable(1);
        arm(ev, interval);
    }
    ctx.live.timer.set(ev);
    true
}

/// Stops the session's timer (the session is ending).
///
/// # Safety
/// `ctx` must be the context of a live session.
pub unsafe fn stop(ctx: &SessionCtx) {
    let ev = ctx.live.timer.replace(std::ptr::null_mut());
    // SAFETY: a non-null timer is the session's event, in its still-live pool.
    if !ev.is_null() && unsafe { (*ev).timer_set() } != 0 {
        // SAFETY: as above; the event is in the timer tree.
        unsafe { ngx_del_timer(ev) };
    }
}

unsafe extern "C" fn on_tick(ev: *mut ngx_event_t) {
    // SAFETY: nginx runs the handler of an expired timer with the event we armed; its data is
    // the session, alive while its timer is set (the log phase deletes it).
    let s = unsafe { (*ev).data } as *mut ngx_stream_session_t;
    // SAFETY: as above.
    unsafe { (*ev).set_timedout(0) };
    // SAFETY: a live session of our configuration.
    let (Some(ctx), mcf, scf) = (unsafe { session_ctx(s) }, unsafe { session_main_conf(s) }, unsafe {
        session_srv_conf(s)
    }) else {
        return;
    };
    // SAFETY: the source lives as long as the configuration.
    let Some(source) = (unsafe { mcf.source.as_ref() }) else { return };
    crate::notices::log_notices(source.tick(crate::ffi::monotonic_ms()));
    let d = ctx.decision();
    // SAFETY: a live session.
    let (d_in, d_out) = unsafe { take_pending(s, &ctx.live) };
    source.flush(&d, d_in, d_out, gpugate_routes::now_ms());
    if source.revoked(&d) {
        ctx.live.revoked.set(true);
        ctx.live.timer.set(std::ptr::null_mut());
        // SAFETY: a live session's connection log.
        let log = unsafe { (*(*s).connection).log };
        ngx_log_error!(
            NGX_LOG_INFO,
            log,
            "gpugate: session revoked, closing it (env {}, {} {})",
            ctx.env_id,
            ctx.service,
            ctx.key
        );
        // SAFETY: a live session in the proxy module's hands; closed the way it closes one.
        unsafe { close_session(s) };
        return;
    }
    // SAFETY: the event is the session's, which lives on.
    unsafe { arm(ev, scf.flush_interval) };
}

/// Ends a proxied session from outside the proxy module, as the proxy's own finalize does:
/// upstream state recorded, the peer freed, the upstream connection closed, then the session
/// finalized (which runs the log phase and closes the client connection).
///
/// # Safety
/// `s` must be a live session whose content handler is the stream proxy.
unsafe fn close_session(s: *mut ngx_stream_session_t) {
    // SAFETY: the caller's contract; every pointer is checked before use and belongs to the
    // session's upstream, which the proxy allocated from the session's pool.
    unsafe {
        let u = (*s).upstream;
        if !u.is_null() {
            let u = &mut *u;
            if !u.resolved.is_null() && !(*u.resolved).ctx.is_null() {
                ngx_resolve_name_done((*u.resolved).ctx);
                (*u.resolved).ctx = std::ptr::null_mut();
            }
            let pc = u.peer.connection;
            if !u.state.is_null() {
                if (*u.state).response_time == ngx_msec_t::MAX {
                    (*u.state).response_time = ngx_current_msec.wrapping_sub(u.start_time);
                }
                if !pc.is_null() {
                    (*u.state).bytes_received = u.received;
                    (*u.state).bytes_sent = (*pc).sent;
                }
            }
            if let (Some(free), false) = (u.peer.free, u.peer.sockaddr.is_null()) {
                free(&mut u.peer, u.peer.data, 0);
                u.peer.sockaddr = std::ptr::null_mut();
            }
            if !pc.is_null() {
                ngx_close_connection(pc);
                u.peer.connection = std::ptr::null_mut();
            }
        }
        ngx_stream_finalize_session(s, NGX_STREAM_OK as usize);
    }
}
