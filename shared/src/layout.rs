//! Byte layout of the route-table file: header, port slots, counter slots.
//!
//! ```text
//! offset 0          Header (4096 bytes, one page)
//!   0  magic            u64  "GPUGATE\x01" little-endian; written last at init
//!   8  version          u32  LAYOUT_VERSION
//!  12  header_size      u32  4096
//!  16  port_slots       u32  65536 (one per TCP port, index = local port)
//!  20  slot_size        u32  128
//!  24  counter_size     u32  64
//!  28  host_slots       u32  0 (reserved: hostname-keyed region for TLS SNI routing)
//!  32  ports_offset     u64  4096
//!  40  counters_offset  u64  4096 + 65536 * 128
//!  48  hosts_offset     u64  0 (reserved, see host_slots)
//!  56  file_size        u64  total bytes the layout needs
//!  64  generation       u64  bumped by the writer on every change
//!  72  heartbeat_ms     u64  writer's last sign of life, unix milliseconds
//!  80  writer_pid       u32  pid of the process holding the writer lock
//!  84  (reserved, zero)
//!
//! ports_offset       PortSlot[65536]     (128 bytes each: sequence + two copies of the route)
//! counters_offset    CounterSlot[65536]  (64 bytes each, atomics added by nginx workers)
//! ```
//!
//! Every field is an atomic so that several processes may map the same bytes without data
//! races in the Rust sense; the protocol over them is in [`crate::seqlock`]. A new region (the
//! SNI host table) is added by appending it after the counters and setting `host_slots` and
//! `hosts_offset`; readers of this version ignore it. A change to anything already here bumps
//! [`LAYOUT_VERSION`], and readers refuse a version they do not know.

use std::sync::atomic::{AtomicU32, AtomicU64};

/// `b"GPUGATE\x01"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"GPUGATE\x01");
/// Version of this byte layout; readers refuse any other.
pub const LAYOUT_VERSION: u32 = 1;
/// Size of the header page.
pub const HEADER_SIZE: usize = 4096;
/// One slot per TCP port number, indexed by the port itself (slot 0 is never used).
pub const PORT_SLOTS: usize = 65536;
/// Size of a [`PortSlot`]: two cache lines.
pub const SLOT_SIZE: usize = 128;
/// Size of a [`CounterSlot`]: one cache line.
pub const COUNTER_SIZE: usize = 64;
/// Offset of the first port slot.
pub const PORTS_OFFSET: usize = HEADER_SIZE;
/// Offset of the first counter slot.
pub const COUNTERS_OFFSET: usize = PORTS_OFFSET + PORT_SLOTS * SLOT_SIZE;
/// Total size of a version-1 file.
pub const FILE_SIZE: usize = COUNTERS_OFFSET + PORT_SLOTS * COUNTER_SIZE;

/// The file header. See the module docs for the byte diagram.
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
    pub reserved: AtomicU32,
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
    /// Route generation chosen by the writer (the control plane's generation).
    pub generation: AtomicU64,
    /// Expiry, unix milliseconds; 0 = never.
    pub expires_ms: AtomicU64,
}

/// One port's route: a sequence number and two copies of the route (a "latch" seqlock, see
/// [`crate::seqlock`]): readers read the copy the sequence's low bit names, so a writer
/// stalled or killed mid-write never makes readers wait.
#[repr(C, align(64))]
pub struct PortSlot {
    /// Sequence: bumped twice per write; its low bit names the copy readers use.
    pub seq: AtomicU64,
    pub copies: [RouteWords; 2],
}

/// Per-port traffic counters, added to by nginx workers (never seqlock-guarded: each field is
/// an independent monotonic or gauge value).
#[repr(C, align(64))]
pub struct CounterSlot {
    /// Connections proxied since the route was set.
    pub connections_total: AtomicU64,
    /// Connections currently open on this port (a gauge; survives route changes).
    pub connections_active: AtomicU64,
    /// Connections closed at once because the port had no live route.
    pub refused_total: AtomicU64,
    /// Bytes received from clients (client -> workspace), added when a connection closes.
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients (workspace -> client), added when a connection closes.
    pub bytes_out: AtomicU64,
    /// Last connection start or close on this port, unix milliseconds.
    pub last_activity_ms: AtomicU64,
    /// Generation of the route these counters belong to; the writer resets the
    /// cumulative counters when a different route takes the port.
    pub route_generation: AtomicU64,
    pub reserved: AtomicU64,
}

const _: () = {
    assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);
    assert!(std::mem::size_of::<Header>() == 128);
    assert!(std::mem::size_of::<PortSlot>() == SLOT_SIZE);
    assert!(std::mem::align_of::<PortSlot>() == 64);
    assert!(std::mem::size_of::<CounterSlot>() == COUNTER_SIZE);
    assert!(std::mem::offset_of!(Header, generation) == 64);
    assert!(std::mem::offset_of!(Header, writer_pid) == 80);
    assert!(std::mem::size_of::<RouteWords>() == 56);
    assert!(std::mem::offset_of!(PortSlot, copies) == 8);
    assert!(std::mem::offset_of!(RouteWords, addr) == 8);
    assert!(std::mem::offset_of!(RouteWords, env_id) == 24);
    assert!(std::mem::offset_of!(RouteWords, expires_ms) == 48);
    assert!(PORTS_OFFSET % 64 == 0 && COUNTERS_OFFSET % 64 == 0);
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
