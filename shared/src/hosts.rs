//! The hostname region: an open-addressing hash table of routes keyed by (environment id,
//! service), for routing by TLS server name (`<env-id>.<service>.<domain>`).
//!
//! Slots have the port slots' format and latch seqlock ([`crate::seqlock`]); the key is the
//! route's own env id and service, so a slot says which key it holds without extra words.
//!
//! - Home slot: `hash(key) & (host_slots - 1)`; a key lives at its home slot or a later one
//!   (linear probing, wrapping), never further than the header's `host_probe_max` slots.
//! - A slot is *empty* (never keyed: `meta` without [`META_KEYED`]), *live* (keyed and live),
//!   or a *tombstone* (keyed, not live): a removed route keeps its key so that probes for
//!   other keys go on past it.
//! - Lookup (any reader): walk at most `host_probe_max` slots from home; stop at an empty
//!   slot (the key is absent) or at the slot keyed with this key (its route, or a tombstone:
//!   absent). A busy slot on the way fails the lookup closed.
//! - Write (the writer only): a key already keyed somewhere is rewritten in place; a new key
//!   takes the first tombstone or empty slot of its probe sequence, after the whole sequence
//!   up to `host_probe_max` showed it absent, and raises `host_probe_max` first (Release) when
//!   it lands further out, so no reader can stop short of it. A key is keyed in at most one
//!   slot, so a reader that finds it has found the only one.
//! - Slots are never moved: a reader in the middle of a probe never misses a key that stays.
//!
//! The environment ids are the control plane's random ids, so keys cannot be chosen to
//! collide; the probe bound caps what an unknown name costs a worker regardless.

use crate::layout::{is_keyed, unpack_meta, META_KEYED};
use crate::route::{EnvId, RawRoute, Route, Service};

/// The key of a hostname route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostKey {
    pub env_id: EnvId,
    pub service: Service,
}

impl HostKey {
    pub fn new(env_id: EnvId, service: Service) -> HostKey {
        HostKey { env_id, service }
    }

    /// The key a route is stored under.
    pub fn of(route: &Route) -> HostKey {
        HostKey { env_id: route.env_id, service: route.service }
    }

    /// FNV-1a (64-bit) over the zero-padded id and the service code: cheap, and spreads the
    /// control plane's random ids evenly. Fixed: the writer and every reader must agree.
    pub fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.env_id.bytes().into_iter().chain([self.service as u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    /// The slot index of probe step `step` in a region of `slots` (a power of two) slots.
    pub fn probe(&self, step: u32, slots: u32) -> u32 {
        debug_assert!(slots.is_power_of_two());
        (self.hash() as u32).wrapping_add(step) & (slots - 1)
    }
}

/// What a hostname slot holds, as far as probing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// Never keyed: the end of every probe sequence through it.
    Empty,
    /// Keyed with this key (live or tombstone).
    Keyed(HostKey),
}

/// Reads the probing state of a slot's words.
pub(crate) fn state(raw: &RawRoute) -> SlotState {
    if !is_keyed(raw.meta) {
        return SlotState::Empty;
    }
    let (_, service, _) = unpack_meta(raw.meta);
    SlotState::Keyed(HostKey { env_id: EnvId::from_words(raw.env_id), service: Service::from_code(service) })
}

/// The words of a live hostname route.
pub(crate) fn keyed(route: &Route, owner: u64) -> RawRoute {
    let mut raw = RawRoute::encode(route, owner);
    raw.meta |= META_KEYED;
    raw
}

/// The words of a tombstone for `key`: keyed, not live, no route.
pub(crate) fn tombstone(key: HostKey) -> RawRoute {
    RawRoute {
        meta: crate::layout::pack_meta(false, key.service as u8, 0) | META_KEYED,
        env_id: key.env_id.to_words(),
        ..RawRoute::EMPTY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, svc: Service) -> HostKey {
        HostKey::new(id.parse().unwrap(), svc)
    }

    #[test]
    fn the_hash_tells_services_and_ids_apart_and_is_stable() {
        let a = key("6hiflzwte2xnkroq", Service::Jupyter);
        assert_eq!(a.hash(), key("6hiflzwte2xnkroq", Service::Jupyter).hash());
        assert_ne!(a.hash(), key("6hiflzwte2xnkroq", Service::Code).hash());
        assert_ne!(a.hash(), key("6hiflzwte2xnkroo", Service::Jupyter).hash());
        // The writer and readers of other builds must agree: pin one value.
        assert_eq!(key("a", Service::Ssh).hash(), {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in [b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1] {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
            h
        });
    }

    #[test]
    fn probes_wrap_inside_the_region() {
        let k = key("x", Service::Code);
        let home = k.probe(0, 1024);
        assert!(home < 1024);
        assert_eq!(k.probe(1024, 1024), home);
        assert_eq!(k.probe(1, 1024), (home + 1) % 1024);
    }

    #[test]
    fn random_ids_spread_over_the_slots() {
        // 100,000 ids of the control plane's shape over 262,144 slots: no home slot crowded.
        let mut counts = vec![0u16; 262_144];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
        for _ in 0..100_000 {
            let mut id = String::new();
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                id.push(alphabet[(x % 36) as usize] as char);
            }
            counts[key(&id, Service::Jupyter).probe(0, 262_144) as usize] += 1;
        }
        assert!(*counts.iter().max().unwrap() <= 8, "a home slot got {} keys", counts.iter().max().unwrap());
    }

    #[test]
    fn slot_states_round_trip() {
        let route = Route {
            upstream: "127.0.0.1:8888".parse().unwrap(),
            env_id: "abc".parse().unwrap(),
            service: Service::Jupyter,
            generation: 3,
            expires_ms: None,
        };
        let k = HostKey::of(&route);
        assert_eq!(state(&RawRoute::EMPTY), SlotState::Empty);
        let live = keyed(&route, 9);
        assert_eq!(state(&live), SlotState::Keyed(k));
        assert_eq!(live.decode(), Some(route));
        let dead = tombstone(k);
        assert_eq!(state(&dead), SlotState::Keyed(k));
        assert_eq!(dead.decode(), None, "a tombstone is no route");
        // A port route (never keyed) reads as empty for probing.
        assert_eq!(state(&RawRoute::encode(&route, 1)), SlotState::Empty);
    }
}
