//! Keeps a table file that shrinks under a process from killing it.
//!
//! A shared mapping of a file that is truncated raises SIGBUS on the next access past the new
//! end of file, and nginx workers inherit the master's mappings, so one `: > routes` would
//! crash-loop every worker. The routes file can only be truncated by its owner (root, as a
//! rule) and workers re-check its size every second, but that leaves a window. This guard
//! closes it: every mapping registers its address range here, and the SIGBUS handler, for a
//! fault inside a registered range, maps an anonymous zero page over the faulting page, marks
//! the range poisoned and returns. The access is retried and reads zeros (an empty slot, a
//! header without magic): the reader fails closed, sees the poison mark on its next check and
//! drops the mapping. A fault anywhere else restores the previous disposition and returns, so
//! it faults again and behaves exactly as without the guard.
//!
//! The handler only reads atomics and calls `mmap`/`sigaction` (plain system calls): it
//! allocates nothing and takes no lock.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

const MAX_RANGES: usize = 64;

struct Range {
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Range =
    Range { start: AtomicUsize::new(0), len: AtomicUsize::new(0), poisoned: AtomicBool::new(false) };
static RANGES: [Range; MAX_RANGES] = [EMPTY; MAX_RANGES];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The disposition before ours: handler address and flags.
static OLD_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static OLD_FLAGS: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

/// Registers a mapping; returns its slot, or `None` when every slot is taken (the mapping
/// then works unguarded).
pub(crate) fn register(start: usize, len: usize) -> Option<usize> {
    for (i, r) in RANGES.iter().enumerate() {
        // The start word claims the slot; len follows. A handler that sees start but len 0
        // matches nothing, which is only wrong for the instant of registration.
        if r.start.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            r.poisoned.store(false, Ordering::Relaxed);
            r.len.store(len, Ordering::Release);
            return Some(i);
        }
    }
    None
}

/// Forgets a mapping before it is unmapped.
pub(crate) fn unregister(slot: usize) {
    if let Some(r) = RANGES.get(slot) {
        r.len.store(0, Ordering::Release);
        r.start.store(0, Ordering::Release);
    }
}

/// Whether a SIGBUS hit this mapping (its file shrank under it).
pub(crate) fn poisoned(slot: usize) -> bool {
    RANGES.get(slot).is_some_and(|r| r.poisoned.load(Ordering::Acquire))
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; for SIGBUS the
    // fault address is set.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for r in RANGES.iter() {
        let start = r.start.load(Ordering::Acquire);
        let len = r.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= start.saturating_add(len) {
            continue;
        }
        let at = addr & !(page - 1);
        // SAFETY: `at` is a page inside a mapping this process made and still holds (it is
        // unregistered before it is unmapped); replacing that page with anonymous zeros
        // affects only this mapping, which its owner drops once it sees the poison mark.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            r.poisoned.store(true, Ordering::Release);
            return;
        }
        break;
    }
    // Not ours (or the page could not be replaced): hand the signal to what was there before.
    let old = OLD_HANDLER.load(Ordering::Relaxed);
    let flags = OLD_FLAGS.load(Ordering::Relaxed) as libc::c_int;
    if old != libc::SIG_DFL && old != libc::SIG_IGN {
        if flags & libc::SA_SIGINFO != 0 {
            // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this type.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(old) };
            f(sig, info, ctx);
        } else {
            // SAFETY: a handler installed without SA_SIGINFO takes the signal number only.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(old) };
            f(sig);
        }
        return;
    }
    // SAFETY: restoring the default disposition; the faulting access then repeats and the
    // process ends as it would have without the guard.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// Installs the SIGBUS guard for this process (once; later calls do nothing). Processes that
/// map a table another process may truncate call it at start: nginx's master before forking
/// workers, the publisher.
pub fn install_sigbus_guard() -> std::io::Result<()> {
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is a valid starting value; the handler has the
        // SA_SIGINFO signature; `old` receives the previous disposition.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &sa, &mut old) != 0 {
                result = Err(std::io::Error::last_os_error());
                return;
            }
            OLD_HANDLER.store(old.sa_sigaction, Ordering::Relaxed);
            OLD_FLAGS.store(old.sa_flags as usize, Ordering::Relaxed);
        }
    });
    result
}
