//! Byte layout of the two table files: the routes file and the counters file.
//!
//! The routes file is written by the one writer and mapped read-only by everyone else:
//!
//! ```text
//! routes file (mode 0644, owned by the writer's user)
//! offset 0          Header (4096 bytes, one page)
//!   0  magic            u64  "GPUGATE\x01" little-endian; written last at init
//!   8  version          u32  LAYOUT_VERSION (3)
//!  12  header_size      u32  4096
//!  16  port_slots       u32  65536 (one per TCP port, index = local port)
//!  20  slot_size        u32  192
//!  24  counter_size     u32  64 (of the counters file, so both sides agree)
//!  28  host_slots       u32  hostname slots (0, or a power of two from 1024 to 2^22)
//!  32  ports_offset     u64  4096
//!  40  counters_offset  u64  0 (counters live in their own file since version 2)
//!  48  hosts_offset     u64  ports_offset + 65536 * 192 (0 without hostname slots)
//!  56  file_size        u64  total bytes the layout needs
//!  64  generation       u64  bumped by the writer on every change
//!  72  heartbeat_ms     u64  writer's last sign of life, unix milliseconds
//!  80  writer_pid       u32  pid of the process holding the writer lock
//!  84  clean            u32  1 while no writer is inside the table (set at a clean close)
//!  88  host_probe_max   u32  longest probe any hostname key was stored at (readers stop there)
//!
//! ports_offset       PortSlot[65536]       (192 bytes each: sequence, two copies of the route,
//!                                           revoke epoch at 136, padding)
//! hosts_offset       PortSlot[host_slots]  open-addressing hash table keyed by (environment
//!                                           id, service): same slot format, see [`crate::hosts`]
//! ```
//!
//! A route is found by its [`SlotKey`]: a port (`0..=65535`) or a hostname slot (`65536 + i`).
//! Counters and open-session cells are indexed by the same key, so a hostname route is counted
//! and revoked exactly like a port route.
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
//!  28  host_slots     u32  as in the routes file (keys = 65536 + host_slots)
//!  32  counters_offset u64 4096
//!  40  workers_offset  u64 counters_offset + keys * 64
//!  48  cells_offset    u64 workers_offset + MAX_WORKERS * 64
//!  56  file_size       u64
//!  64  owners          u64  highest owner stamp handed out (stamps are per slot)
//!  72  name_refused    [u64; 8]  connections refused by name routing, per [`NameRefusal`]
//! counters_offset  CounterSlot[keys]            per-key totals, tagged with the route owner:
//!                  0 connections_total, 8 refused_total, 16 upstream_failed_total,
//!                  24 bytes_in, 32 bytes_out, 40 last_activity_ms, 48 owner, 56 revoked_total
//! workers_offset   WorkerSlot[MAX_WORKERS]      which process owns each row of cells:
//!                  0 owner, 8 pid_ns, 16 claimed_ms, 24 liveness (1: the owner holds an
//!                  exclusive OFD lock on the row's first byte), 32.. reserved
//! cells_offset     [u64; keys][MAX_WORKERS]     open sessions per worker and key
//! ```
//!
//! Every field is an atomic so that several processes may map the same bytes without data
//! races in the Rust sense; the protocols over them are in [`crate::seqlock`] (routes) and
//! [`crate::counters`] (counters). Version 3 added the hostname region and keyed the counters
//! by [`SlotKey`]; any change to what is here bumps [`LAYOUT_VERSION`], and readers refuse a
//! version they do not know (fail closed).

use std::sync::atomic::{AtomicU32, AtomicU64};

/// `b"GPUGATE\x01"` read as a little-endian u64: the routes file.
pub const MAGIC: u64 = u64::from_le_bytes(*b"GPUGATE\x01");
/// `b"GPUGCNT\x01"` read as a little-endian u64: the counters file.
pub const COUNTERS_MAGIC: u64 = u64::from_le_bytes(*b"GPUGCNT\x01");
/// Version of this byte layout (both files); readers refuse any other.
pub const LAYOUT_VERSION: u32 = 3;
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
/// Offset of the hostname region (when the table has one).
pub const HOSTS_OFFSET: usize = PORTS_OFFSET + PORT_SLOTS * SLOT_SIZE;
/// Size of the routes file without hostname slots.
pub const FILE_SIZE: usize = HOSTS_OFFSET;
/// Hostname slots of a table made with no other wish: room for 100,000+ name routes at a
/// load that keeps probes short (the file is sparse until slots are used).
pub const DEFAULT_HOST_SLOTS: u32 = 262_144;
/// Fewest hostname slots a table with a hostname region has.
pub const MIN_HOST_SLOTS: u32 = 1024;
/// Most hostname slots a table can have.
pub const MAX_HOST_SLOTS: u32 = 1 << 22;

/// Checks a hostname slot count: 0 (no hostname region) or a power of two in
/// [`MIN_HOST_SLOTS`]..=[`MAX_HOST_SLOTS`].
pub fn check_host_slots(n: u32) -> Result<u32, String> {
    if n == 0 || (n.is_power_of_two() && (MIN_HOST_SLOTS..=MAX_HOST_SLOTS).contains(&n)) {
        Ok(n)
    } else {
        Err(format!(
            "{n} hostname slots: expected 0 or a power of two from {MIN_HOST_SLOTS} to {MAX_HOST_SLOTS}"
        ))
    }
}

/// Size of a routes file with `host_slots` hostname slots.
pub const fn routes_file_size(host_slots: u32) -> usize {
    HOSTS_OFFSET + host_slots as usize * SLOT_SIZE
}

/// Where a route lives: a port slot (`0..=65535`, the local port) or a hostname slot
/// (`65536 + i`). Counters and session cells use the same index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SlotKey(u32);

impl SlotKey {
    /// The key of local port `port`.
    pub const fn port(port: u16) -> SlotKey {
        SlotKey(port as u32)
    }

    /// The key of hostname slot `i`.
    pub const fn host(i: u32) -> SlotKey {
        SlotKey(PORT_SLOTS as u32 + i)
    }

    /// The port, for a port key.
    pub const fn as_port(self) -> Option<u16> {
        if self.0 < PORT_SLOTS as u32 { Some(self.0 as u16) } else { None }
    }

    /// The hostname slot, for a hostname key.
    pub const fn host_index(self) -> Option<u32> {
        if self.0 >= PORT_SLOTS as u32 { Some(self.0 - PORT_SLOTS as u32) } else { None }
    }

    /// The index into counters and cells.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

impl From<u16> for SlotKey {
    fn from(port: u16) -> SlotKey {
        SlotKey::port(port)
    }
}

impl std::fmt::Display for SlotKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.as_port() {
            Some(p) => write!(f, "port {p}"),
            None => write!(f, "hostname slot {}", self.0 - PORT_SLOTS as u32),
        }
    }
}

/// Why name routing refused a connection (counted per reason in the counters header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NameRefusal {
    /// No server name (a TLS client that sent no SNI, or not TLS at all in passthrough).
    NoName = 0,
    /// A name outside the configured domain.
    OtherDomain = 1,
    /// A name in the domain that is not `<env-id>.<service>.<domain>`.
    BadName = 2,
    /// A service label that is not ssh, jupyter, code or rdp.
    UnknownService = 3,
    /// A well-formed name with no live hostname route.
    NoRoute = 4,
    /// Passthrough: the first bytes were not a TLS ClientHello.
    NotTls = 5,
}

impl NameRefusal {
    /// Every reason, in code order.
    pub const ALL: [NameRefusal; 6] = [
        NameRefusal::NoName,
        NameRefusal::OtherDomain,
        NameRefusal::BadName,
        NameRefusal::UnknownService,
        NameRefusal::NoRoute,
        NameRefusal::NotTls,
    ];

    /// The reason as logs, variables and metrics spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            NameRefusal::NoName => "no_name",
            NameRefusal::OtherDomain => "other_domain",
            NameRefusal::BadName => "bad_name",
            NameRefusal::UnknownService => "unknown_service",
            NameRefusal::NoRoute => "no_route",
            NameRefusal::NotTls => "not_tls",
        }
    }
}

/// How many nginx worker processes can count open sessions at once (`worker_processes`
/// above this still route and count totals; their open sessions are not in the gauge).
pub const MAX_WORKERS: usize = 128;
/// Size of a [`WorkerSlot`].
pub const WORKER_SLOT_SIZE: usize = 64;
/// Offset of the first counter slot in the counters file.
pub const COUNTERS_OFFSET: usize = HEADER_SIZE;

/// The counters file's geometry for a table with `host_slots` hostname slots: counter slots
/// and cells for every key (`65536 + host_slots`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CountersGeometry {
    pub keys: usize,
    pub workers_offset: usize,
    pub cells_offset: usize,
    /// Bytes of cells per worker: one u64 per key.
    pub cells_per_worker: usize,
    /// Total size (sparse: a worker's cells are touched only for the keys it serves).
    pub file_size: usize,
}

impl CountersGeometry {
    pub const fn new(host_slots: u32) -> CountersGeometry {
        let keys = PORT_SLOTS + host_slots as usize;
        let workers_offset = COUNTERS_OFFSET + keys * COUNTER_SIZE;
        let cells_offset = workers_offset + MAX_WORKERS * WORKER_SLOT_SIZE;
        let cells_per_worker = keys * 8;
        CountersGeometry {
            keys,
            workers_offset,
            cells_offset,
            cells_per_worker,
            file_size: cells_offset + MAX_WORKERS * cells_per_worker,
        }
    }
}

/// Size of a counters file without hostname slots.
pub const COUNTERS_FILE_SIZE: usize = CountersGeometry::new(0).file_size;

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
    /// The longest probe sequence (in slots) any hostname key was stored at; readers look no
    /// further, so an unknown name costs at most this many slot reads. Only grows.
    pub host_probe_max: AtomicU32,
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
    /// Owner stamp chosen by the writer: a new value whenever the slot changes hands (another
    /// environment or generation), one more than any the slot carried. Counters are tagged
    /// with it, so a session of an earlier owner can never be charged to the next one.
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
    pub host_slots: AtomicU32,
    pub counters_offset: AtomicU64,
    pub workers_offset: AtomicU64,
    pub cells_offset: AtomicU64,
    pub file_size: AtomicU64,
    /// The highest owner stamp the writer handed out (see [`RouteWords::owner`]); for tools
    /// only: stamps are a sequence per slot, kept in each [`CounterSlot::owner`].
    pub owners: AtomicU64,
    /// Connections refused by name routing, per [`NameRefusal`] code (plain counts).
    pub name_refused: [AtomicU64; 8],
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
    /// 1 when the owner holds the row's liveness lock (an exclusive OFD lock on the byte at
    /// this row's offset in the counters file, see [`crate::counters`]): whether it lives is
    /// then told by that lock, in any pid namespace. 0: judged by `pid_ns` and the pid.
    pub liveness: AtomicU64,
    pub reserved: [AtomicU64; 4],
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
    assert!(std::mem::offset_of!(Header, host_probe_max) == 88);
    assert!(std::mem::offset_of!(CountersHeader, name_refused) == 72);
    assert!(HOSTS_OFFSET % 64 == 0);
    assert!(CountersGeometry::new(0).cells_offset % 4096 == 0);
    assert!(CountersGeometry::new(MIN_HOST_SLOTS).cells_offset % 4096 == 0);
    assert!(std::mem::size_of::<RouteWords>() == 64);
    assert!(std::mem::offset_of!(PortSlot, copies) == 8);
    assert!(std::mem::offset_of!(PortSlot, revoke_epoch) == 136);
    assert!(std::mem::offset_of!(RouteWords, addr) == 8);
    assert!(std::mem::offset_of!(RouteWords, env_id) == 24);
    assert!(std::mem::offset_of!(RouteWords, expires_ms) == 48);
    assert!(std::mem::offset_of!(RouteWords, owner) == 56);
};

/// Bit 0 of `meta`: the slot holds a route.
pub const META_LIVE: u32 = 1;
/// Bit 1 of `meta` (hostname slots only): the slot belongs to the key in its env id and
/// service, live or not. A keyed slot that is not live is a tombstone: probes go past it.
pub const META_KEYED: u32 = 2;

/// Packs the `meta` word of a slot.
pub const fn pack_meta(live: bool, service: u8, family: u8) -> u32 {
    (live as u32) | ((service as u32) << 8) | ((family as u32) << 16)
}

/// Whether a `meta` word marks a keyed (hostname) slot.
pub const fn is_keyed(meta: u32) -> bool {
    meta & META_KEYED != 0
}

/// Unpacks `meta` into (live, service code, family).
pub const fn unpack_meta(meta: u32) -> (bool, u8, u8) {
    (meta & META_LIVE != 0, (meta >> 8) as u8, (meta >> 16) as u8)
}
