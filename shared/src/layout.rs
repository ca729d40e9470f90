//! Byte layout of the two table files: the routes file and the counters file.
//!
//! The routes file is written by the one writer and mapped read-only by everyone else:
//!
//! ```text
//! routes file (mode 0644, owned by the writer's user)
//! offset 0          Header (4096 bytes, one page)
//!   0  magic            u64  "GPUGATE\x01" little-endian; written last at init
//!   8  version          u32  LAYOUT_VERSION (2)
//!  12  header_size      u32  4096
//!  16  port_slots       u32  65536 (one per TCP port, index = local port)
//!  20  slot_size        u32  192
//!  24  counter_size     u32  64 (of the counters file, so both sides agree)
//!  28  host_slots       u32  0 (reserved: hostname-keyed region for TLS SNI routing)
//!  32  ports_offset     u64  4096
//!  40  counters_offset  u64  0 (counters live in their own file since version 2)
//!  48  hosts_offset     u64  0 (reserved, see host_slots)
//!  56  file_size        u64  total bytes the layout needs
//!  64  generation       u64  bumped by the writer on every change
//!  72  heartbeat_ms     u64  writer's last sign of life, unix milliseconds
//!  80  writer_pid       u32  pid of the process holding the writer lock
//!  84  clean            u32  1 while no writer is inside the table (set at a clean close)
//!
//! ports_offset       PortSlot[65536]   (192 bytes each: sequence, two copies of the route,
//!                                       revoke epoch at 136, padding)
//! ```
//!
//! The counters file (`<routes>.counters`) is written by nginx workers as well, so that a
//! worker that may count can still never change a route:
//!
//! ```text
//! counters file (mode 0664, group of nginx's workers)
//! offset 0                CountersHeader (4096 bytes)
//!   0  magic          u64  "GPUGCNT\x01"; written last at init
//!   8  version        u32  LAYOUT_VERSION
//!  12  header_size    u32  4096
//!  16  port_slots     u32  65536
//!  20  counter_size   u32  64
//!  24  worker_slots   u32  MAX_WORKERS (128)
//!  28  (reserved)     u32
//!  32  counters_offset u64 4096
//!  40  workers_offset  u64 counters_offset + 65536 * 64
//!  48  cells_offset    u64 workers_offset + MAX_WORKERS * 64
//!  56  file_size       u64
//!  64  owners          u64  last owner stamp handed out by the writer
//! counters_offset  CounterSlot[65536]           per-port totals, tagged with the route owner:
//!                  0 connections_total, 8 refused_total, 16 upstream_failed_total,
//!                  24 bytes_in, 32 bytes_out, 40 last_activity_ms, 48 owner, 56 revoked_total
//! workers_offset   WorkerSlot[MAX_WORKERS]      which process owns each row of cells
//! cells_offset     [u64; 65536][MAX_WORKERS]    open sessions per worker and port
//! ```
//!
//! Every field is an atomic so that several processes may map the same bytes without data
//! races in the Rust sense; the protocols over them are in [`crate::seqlock`] (routes) and
//! [`crate::counters`] (counters). A new region (the SNI host table) is added by appending it
//! and setting `host_slots` and `hosts_offset`; readers of this version ignore it. A change to
//! anything already here bumps [`LAYOUT_VERSION`], and readers refuse a version they do not
//! know.

use std::sync::atomic::{AtomicU32, AtomicU64};

/// `b"GPUGATE\x01"` read as a little-endian u64: the routes file.
pub const MAGIC: u64 = u64::from_le_bytes(*b"GPUGATE\x01");
/// `b"GPUGCNT\x01"` read as a little-endian u64: the counters file.
pub const COUNTERS_MAGIC: u64 = u64::from_le_bytes(*b"GPUGCNT\x01");
/// Version of this byte layout (both files); readers refuse any other.
pub const LAYOUT_VERSION: u32 = 2;
/// Size of each file's header page.
pub const HEADER_SIZE: usize = 4096;
/// One slot per TCP port number, indexed by the port itself (slot 0 is never used).
pub const PORT_SLOTS: usize = 65536;
/// Size of a [`PortSlot`]: three cache lines.
pub const SLOT_SIZE: usize = 192;
/// Size of a [`CounterSlot`]: one cache line.
pub const COUNTER_SIZE: usize = 64;
/// Offset of the first port slot in the routes file.
pub const PORTS_OFFSET: usize = HEADER_SIZE;
/// Total size of the routes file.
pub const FILE_SIZE: usize = PORTS_OFFSET + PORT_SLOTS * SLOT_SIZE;

/// How many nginx worker processes can count open sessions at once (`worker_processes`
/// above this still route and count totals; their open sessions are not in the gauge).
pub const MAX_WORKERS: usize = 128;
/// Size of a [`WorkerSlot`].
pub const WORKER_SLOT_SIZE: usize = 64;
/// Offset of the first counter slot in the counters file.
pub const COUNTERS_OFFSET: usize = HEADER_SIZE;
/// Offset of the worker slots in the counters file.
pub const WORKERS_OFFSET: usize = COUNTERS_OFFSET + PORT_SLOTS * COUNTER_SIZE;
/// Offset of the per-worker session cells in the counters file.
pub const CELLS_OFFSET: usize = WORKERS_OFFSET + MAX_WORKERS * WORKER_SLOT_SIZE;
/// Bytes of cells per worker: one u64 per port.
pub const CELLS_PER_WORKER: usize = PORT_SLOTS * 8;
/// Total size of the counters file (sparse: a worker's cells are touched only for the ports
/// it serves).
pub const COUNTERS_FILE_SIZE: usize = CELLS_OFFSET + MAX_WORKERS * CELLS_PER_WORKER;

/// The routes file header. See the module docs for the byte diagram.
#[repr(C, align(64))]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub header_size: AtomicU32,
    pub port_slots: AtomicU32,
    pub slot_size: AtomicU32,
    pub counter_size: AtomicU32,
    pub host_slots: AtomicU32,
    pub ports_offset: AtomicU64,
    pub counters_offset: AtomicU64,
    pub hosts_offset: AtomicU64,
    pub file_size: AtomicU64,
    pub generation: AtomicU64,
    pub heartbeat_ms: AtomicU64,
    pub writer_pid: AtomicU32,
    /// 1 when the last writer closed cleanly (no slot can be half-written); 0 while a writer
    /// is inside or after one died.
    pub clean: AtomicU32,
}

/// The words of one route. `meta` packs: bit 0 = live, bits 8..16 = service code,
/// bits 16..24 = address family (4 or 6).
#[repr(C)]
pub struct RouteWords {
    pub meta: AtomicU32,
    /// Upstream TCP port (low 16 bits).
    pub upstream_port: AtomicU32,
    /// Upstream address, network byte order; IPv4 uses the first four bytes.
    pub addr: [AtomicU32; 4],
    /// Environment id, ASCII, zero-padded to 16 bytes.
    pub env_id: [AtomicU64; 2],
    /// Route generation chosen by the writer's caller (the control plane's generation).
    pub generation: AtomicU64,
    /// Expiry, unix milliseconds; 0 = never.
    pub expires_ms: AtomicU64,
    /// Owner stamp chosen by the writer: a new value whenever the port changes hands (another
    /// environment or generation). Counters are tagged with it, so a session of an earlier
    /// owner can never be charged to the next one.
    pub owner: AtomicU64,
}

/// One port's route: a sequence number and two copies of the route (a "latch" seqlock, see
/// [`crate::seqlock`]): readers read the copy the sequence's low bit names, so a writer
/// stalled or killed mid-write never makes readers wait.
#[repr(C, align(64))]
pub struct PortSlot {
    /// Sequence: bumped twice per write; its low bit names the copy readers use.
    pub seq: AtomicU64,
    pub copies: [RouteWords; 2],
    /// Revoke epoch, outside the latch: bumped by the writer to end every session opened on
    /// this port before the bump. A session remembers the epoch it opened under; nginx closes
    /// it within one flush interval once the epoch moved on. Re-pointing does not bump it.
    pub revoke_epoch: AtomicU64,
}

/// The counters file header.
#[repr(C, align(64))]
pub struct CountersHeader {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub header_size: AtomicU32,
    pub port_slots: AtomicU32,
    pub counter_size: AtomicU32,
    pub worker_slots: AtomicU32,
    pub reserved: AtomicU32,
    pub counters_offset: AtomicU64,
    pub workers_offset: AtomicU64,
    pub cells_offset: AtomicU64,
    pub file_size: AtomicU64,
    /// The last owner stamp the writer handed out (see [`RouteWords::owner`]). Kept here, not
    /// in the routes file, so stamps never repeat while these counters exist.
    pub owners: AtomicU64,
}

/// Per-port totals. Each word but `refused_total` and `owner` is *tagged*: its top 16 bits
/// hold the low 16 bits of the owner stamp it counts for, its low 48 bits the value; a worker
/// adds only while the tag is its session's (see [`crate::counters`]).
#[repr(C, align(64))]
pub struct CounterSlot {
    /// Sessions proxied to the workspace, counted when they end (tagged).
    pub connections_total: AtomicU64,
    /// Connections closed at once because the port had no live route (plain count; reset
    /// when the port changes hands).
    pub refused_total: AtomicU64,
    /// Sessions whose upstream could not be connected (tagged).
    pub upstream_failed_total: AtomicU64,
    /// Bytes received from clients (client -> workspace), tagged.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients (workspace -> client), tagged.
    pub bytes_out: AtomicU64,
    /// Last session start or end, unix milliseconds (tagged).
    pub last_activity_ms: AtomicU64,
    /// The full owner stamp these counters were last reset for (written by the writer).
    pub owner: AtomicU64,
    /// Sessions closed by a revoke (tagged; also in `connections_total`).
    pub revoked_total: AtomicU64,
}

/// One row of session cells: which process owns it.
#[repr(C, align(64))]
pub struct WorkerSlot {
    /// 0 = free; else the owning process: pid (bits 0..32) | start time (bits 32..63), with
    /// bit 63 set while a process clears the row of a dead owner.
    pub owner: AtomicU64,
    /// Inode of the owner's pid namespace: only a process in the same namespace can tell
    /// whether the owner still lives.
    pub pid_ns: AtomicU64,
    /// When the row was claimed, unix milliseconds.
    pub claimed_ms: AtomicU64,
    pub reserved: [AtomicU64; 5],
}

const _: () = {
    assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);
    assert!(std::mem::size_of::<Header>() == 128);
    assert!(std::mem::size_of::<CountersHeader>() <= HEADER_SIZE);
    assert!(std::mem::size_of::<PortSlot>() == SLOT_SIZE);
    assert!(std::mem::align_of::<PortSlot>() == 64);
    assert!(std::mem::size_of::<CounterSlot>() == COUNTER_SIZE);
    assert!(std::mem::size_of::<WorkerSlot>() == WORKER_SLOT_SIZE);
    assert!(std::mem::offset_of!(Header, generation) == 64);
    assert!(std::mem::offset_of!(Header, writer_pid) == 80);
    assert!(std::mem::offset_of!(Header, clean) == 84);
    assert!(std::mem::size_of::<RouteWords>() == 64);
    assert!(std::mem::offset_of!(PortSlot, copies) == 8);
    assert!(std::mem::offset_of!(PortSlot, revoke_epoch) == 136);
    assert!(std::mem::offset_of!(RouteWords, addr) == 8);
    assert!(std::mem::offset_of!(RouteWords, env_id) == 24);
    assert!(std::mem::offset_of!(RouteWords, expires_ms) == 48);
    assert!(std::mem::offset_of!(RouteWords, owner) == 56);
    assert!(PORTS_OFFSET % 64 == 0 && WORKERS_OFFSET % 64 == 0 && CELLS_OFFSET % 4096 == 0);
};

/// Bit 0 of `meta`: the slot holds a route.
pub const META_LIVE: u32 = 1;

/// Packs the `meta` word of a slot.
pub const fn pack_meta(live: bool, service: u8, family: u8) -> u32 {
    (live as u32) | ((service as u32) << 8) | ((family as u32) << 16)
}

/// Unpacks `meta` into (live, service code, family).
pub const fn unpack_meta(meta: u32) -> (bool, u8, u8) {
    (meta & META_LIVE != 0, (meta >> 8) as u8, (meta >> 16) as u8)
}
